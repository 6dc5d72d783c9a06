"""cerberus import-dataset qupath: QuPath GeoJSON (hand-written as QuPath writes it) on a tile and a small slide."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_clean_error, run_cli

from cerberus_histo.data.dataset import load_dataset
from cerberus_histo.data.formats import import_dataset
from cerberus_histo.data.formats.qupath import qupath_import, read_report
from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.tasks import GLAND, NUCLEI, TISSUE


def square(x0, y0, x1, y1):
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def feature(coords, object_type="detection", cls=None, kind="Polygon", **extra):
    props = {"objectType": object_type, "isLocked": False}
    if cls is not None:
        props["classification"] = cls if isinstance(cls, str) else {"name": cls[0], "color": [255, 0, 0]}
    return {"type": "Feature", "id": "0c6a", "geometry": {"type": kind, "coordinates": coords}, "properties": props,
            **extra}


def write_tile(folder: Path, name: str, size=(256, 256)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / name), image)
    return folder / name


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


TILE_FEATURES = [
    feature(square(0, 0, 199, 255), "annotation", ("Region*",)),                     # 0 the labelled region
    feature(square(10, 10, 20, 20), cls=("epithelial",)),                            # 1 nucleus
    feature(square(15, 15, 25, 25), cls="lymphocyte"),                                # 2 overlaps 1 (plain string)
    feature(square(40, 40, 50, 50)),                                                  # 3 unclassified: untyped
    feature([30, 30], kind="Point", cls=("epithelial",)),                            # 4 centroid only: skipped
    feature(square(60, 60, 120, 120) + [[[80, 80], [100, 80], [100, 100], [80, 100], [80, 80]]],
            "annotation", ("gland",)),                                                # 5 gland with a hole
    feature([square(130, 10, 140, 20), square(150, 10, 160, 20)], "annotation", ("surface-epi",),
            kind="MultiPolygon"),                                                     # 6 one instance, two parts
    feature([[[130, 130], [150, 150], [150, 130], [130, 150], [130, 130]]], cls=("connective",)),  # 7 bow-tie
    feature(square(0, 150, 99, 250), "annotation", ("stroma",)),                     # 8 tissue
    feature(square(100, 150, 199, 250), "annotation", ("inflammatory",)),            # 9 tissue
    feature(square(85, 85, 95, 95), "annotation", ("lumen",)),                       # 10 lumen in the gland's hole
    feature(square(0, 0, 255, 255), "tile"),                                          # 11 a tile object: skipped
    feature(square(220, 10, 230, 20), cls=("epithelial",)),                          # 12 outside the region
    {**feature(square(170, 170, 190, 190), "cell", ("plasma",)),                     # 13 a cell: its nucleus
     "nucleusGeometry": {"type": "Polygon", "coordinates": square(175, 175, 185, 185)}},
    feature(square(185, 0, 199, 20), "annotation", ("Ignore*",)),                   # 14 cut out of the region
]


@pytest.fixture
def tile_src(tmp_path) -> Path:
    src = tmp_path / "src"
    write_tile(src, "tile1.png")
    write_json(src / "tile1.geojson", {"type": "FeatureCollection", "features": TILE_FEATURES})
    write_tile(src, "nolabels.png")
    return src


def test_tile_labels_region_and_report(tile_src, tmp_path):
    report = qupath_import(tile_src, tmp_path / "dst", progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.names() == ["tile1"] and spec.tasks == ("nuclei", "gland", "lumen", "tissue")
    assert spec.region_dir == "regions" and spec.mpp == 0.5
    shape = (256, 256)
    nuclei = spec.read_annotation("tile1", "nuclei", shape)
    # epithelial, lymphocyte (drawn over part of it), untyped, the repaired bow-tie, the cell's nucleus
    assert list(nuclei.ids) == [1, 2, 3, 4, 5]
    assert list(nuclei.classes) == [NUCLEI.class_names.index(n) for n in
                                    ("epithelial", "lymphocyte", "nolabel", "connective", "plasma")]
    inst = nuclei.inst_map
    assert inst[12, 12] == 1 and inst[20, 20] == 2 and inst[45, 45] == 3
    assert inst[140, 133] == 4 and inst[140, 147] == 4 and inst[133, 140] == 0  # two triangles, one instance
    assert inst[172, 172] == 0 and inst[180, 180] == 5  # the cell's nucleus, not its outline
    assert inst[15, 225] == 0  # outside the region: left out
    assert (inst[10:21, 10:21] > 0).all() and (inst == 1).sum() == 11 * 11 - 6 * 6  # outlines included
    gland = spec.read_annotation("tile1", "gland", shape)
    assert list(gland.classes) == [GLAND.class_names.index("gland"), GLAND.class_names.index("surface-epi")]
    assert gland.inst_map[90, 90] == 0 and gland.inst_map[70, 70] == 1 and gland.inst_map[90, 80] == 1  # the hole
    assert (gland.inst_map[81:100, 81:100] == 0).all()
    assert gland.inst_map[15, 135] == gland.inst_map[15, 155] == 2
    lumen = spec.read_annotation("tile1", "lumen", shape)
    assert list(lumen.ids) == [1] and lumen.classes is None and lumen.inst_map[90, 90] == 1
    tissue = spec.read_annotation("tile1", "tissue", shape).class_map
    assert tissue[200, 50] == TISSUE.class_names.index("stroma")
    assert tissue[200, 150] == TISSUE.class_names.index("inflammatory") and tissue[50, 50] == 0
    region = spec.read_region("tile1", shape)
    assert region[10, 10] and region[255, 199] and not region[10, 200] and not region[0, 255]
    assert not region[10, 190] and region[30, 190] and report.ignored_areas == 1
    assert report.tiles == 1 and report.images == 1 and report.regions == 1 and report.rois == 1
    assert report.features["nuclei"] == {"epithelial": 1, "lymphocyte": 1, "untyped": 1, "connective": 1,
                                         "plasma": 1}
    assert report.features["tissue"] == {"stroma": 1, "inflammatory": 1}
    assert (report.repaired, report.holes, report.points, report.outside_regions) == (1, 1, 1, 1)
    assert report.overlaps == 1  # the lymphocyte over the epithelial nucleus (tissue 0..99 and 100..199 touch)
    assert report.skipped_objects == {"tile": 1} and report.unlabelled == ["nolabels.png"]
    assert read_report(tmp_path / "dst").to_dict() == report.to_dict()


def test_bare_list_whole_image_maps_and_cli(tmp_path):
    src = tmp_path / "src"
    write_tile(src, "a.jpg", (128, 160))
    write_json(src / "a.jpg.geojson", [
        feature(square(10, 10, 30, 30), "annotation", ("Tumor",)),
        feature(square(50, 50, 60, 60), "annotation"),                        # unclassified: --map '=gland'
        feature(square(70, 70, 80, 80), cls=("Nucleus",)),                      # --map Nucleus=nuclei: untyped
        feature(square(90, 90, 100, 100), cls=("Other",)),                      # skipped by the YAML map
        {"type": "Feature", "id": "PathCellObject",                              # QuPath 0.2: no objectType
         "geometry": {"type": "Polygon", "coordinates": square(100, 10, 110, 20)},
         "properties": {"classification": {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}}},
    ])
    (tmp_path / "map.yaml").write_text("Other: skip\n")
    proc = run_cli("import-dataset", "qupath", src, tmp_path / "dst", "--whole-image", "--mpp", "0.25",
                   "--map", "Tumor=gland:gland", "--map", "=gland", "--map", "Nucleus=nuclei",
                   "--map", tmp_path / "map.yaml", "--map", "Tumor: Positive=nuclei:epithelial")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 tiles" in proc.stdout and "gland 2 (gland 1, untyped 1)" in proc.stdout
    assert "1 mapped to skip" in proc.stdout
    spec = load_dataset(tmp_path / "dst")
    assert spec.region_dir is None and spec.tasks == ("nuclei", "gland") and spec.image_mpp("a") == 0.25
    assert spec.read_region("a", (128, 160)) is None
    gland = spec.read_annotation("a", "gland", (128, 160))
    assert list(gland.classes) == [1, 0]
    assert list(spec.read_annotation("a", "nuclei", (128, 160)).classes) == [0, 2]


def test_slide_tiles_around_regions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    slide = write_synthetic_slide(src / "s.tif", 1024, 768, mpp=0.25, seed=1, field=256, offset=128, n_fields=1,
                                  tile=256, progress=False)
    nuclei = [feature(square(x, y, x + 19, y + 19), cls=("epithelial",)) for x in range(120, 600, 60)
              for y in (150, 300)]
    write_json(src / "s.tif.geojson", {"type": "FeatureCollection", "features": [
        feature(square(100, 100, 700, 500), "annotation", ("Region*",)),
        feature(square(800, 600, 900, 700), "annotation", ("Region 2",)),
        *nuclei, feature(square(850, 650, 869, 669), cls=("lymphocyte",)),
        feature(square(0, 0, 1023, 767), "annotation", ("background",)),  # tissue, over both regions
    ]})
    report = qupath_import(src, tmp_path / "dst", progress=False, tile_size=128)
    spec = load_dataset(tmp_path / "dst")
    assert report.slides == 1 and report.regions == 2 and spec.mpp == 0.5 and spec.mpp_csv is None
    # region 1: 600 x 400 level-0 px -> 300 x 200 + 2 x 16 px at 0.5 um/px: 3 x 2 tiles; region 2: 1 tile
    names = spec.names()
    assert len(names) == report.tiles == 7 and all(n.startswith("s_x") for n in names)
    total = 0
    for name in names:
        image = spec.read_image(name)
        assert max(image.shape[:2]) <= 128
        ann = spec.read_annotation(name, "nuclei", image.shape[:2])
        region = spec.read_region(name, image.shape[:2])
        assert region is not None and region.any()
        total += len(ann.ids)
        for i in ann.ids:  # a 20-px level-0 square is about 10 x 10 px at 0.5 um/px
            assert (ann.inst_map == i).sum() <= 11 * 11
    assert total >= len(nuclei) + 1  # nuclei cut by tile borders count in each tile
    assert report.features["nuclei"] == {"epithelial": len(nuclei), "lymphocyte": 1}
    x, y = 800 - 32, 600 - 32  # region 2's tile: its corner is 16 px at 0.5 um/px (32 level-0 px) out
    ann = spec.read_annotation(f"s_x{x}_y{y}", "nuclei", spec.read_image(f"s_x{x}_y{y}").shape[:2])
    assert list(ann.classes) == [NUCLEI.class_names.index("lymphocyte")]
    assert ann.inst_map[16 + 25:16 + 35, 16 + 25:16 + 35].all() and (ann.inst_map > 0).sum() == 100
    assert slide.is_file()


def test_other_formats_refuse_qupath_options(tmp_path):
    with pytest.raises(Exception, match="qupath format only"):
        import_dataset("glas", tmp_path, tmp_path / "dst", maps=("a=b",), progress=False)
    assert_clean_error(run_cli("import-dataset", "glas", tmp_path, tmp_path / "dst", "--whole-image"),
                       "--whole-image", "qupath format only")


BAD = {
    "not json": ("{ nope", (), ("tile1.geojson", "not valid JSON")),
    "no features": ({"type": "Topology"}, (), ("no GeoJSON features",)),
    "outside": ([feature(square(100, 100, 900, 900), "annotation", ("Region*",))], (),
                ("features[0]", "outside", "0..256 x 0..256")),
    "unknown class": ([feature(square(0, 0, 99, 99), "annotation", ("Region*",)),
                       feature(square(1, 1, 9, 9), cls=("Tumor",))], (),
                      ("features[1]", "'Tumor'", "never guessed", "--map", "epithelial")),
    "no regions": ([feature(square(1, 1, 9, 9), cls=("epithelial",))], (),
                   ("no region annotations of class 'Region*'", "tile1.geojson", "--whole-image")),
    "unclassified annotation": ([feature(square(1, 1, 9, 9), "annotation")], ("--whole-image",),
                                ("features[0]", "unclassified annotation", "--map")),
    "bad map": ([feature(square(1, 1, 9, 9), cls=("Tumor",))], ("--map", "Tumor=nuclei:neoplastic"),
                ("neoplastic", "not a class of task nuclei")),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs_are_one_line_errors(tmp_path, case):
    content, args, words = BAD[case]
    src = tmp_path / "src"
    write_tile(src, "tile1.png")
    (src / "tile1.geojson").write_text(content if isinstance(content, str) else json.dumps(content))
    assert_clean_error(run_cli("import-dataset", "qupath", src, tmp_path / "dst", *args), *words)
    assert not (tmp_path / "dst" / "dataset.yaml").exists()


def test_geojson_without_image_and_missing_images(tmp_path):
    src = tmp_path / "src"
    write_tile(src, "tile1.png")
    write_json(src / "tile1.geojson", [])
    write_json(src / "tile2.geojson", [])
    assert_clean_error(run_cli("import-dataset", "qupath", src, tmp_path / "dst"), "tile2.geojson", "no image")
    (src / "tile2.geojson").unlink()
    (src / "tile1.geojson").unlink()
    assert_clean_error(run_cli("import-dataset", "qupath", src, tmp_path / "dst"), "no image with its QuPath GeoJSON")


def test_round_trip_of_our_own_export(tmp_path):
    """infer-tile's GeoJSON of a tile comes back as the same instances and classes (predict -> QuPath -> train)."""
    from cerberus_histo.config import ModelConfig
    from cerberus_histo.data.synthetic import synth_tile
    from cerberus_histo.data.targets import type_target
    from cerberus_histo.outputs.geojson import write_geojson
    from cerberus_histo.outputs.records import annotation_records
    from cerberus_histo.postproc import TaskResult
    from cerberus_histo.postproc.records import measure

    tile = synth_tile(192, seed=3)
    results = {}
    for task, inst, classes in (("nuclei", tile.nuclei_inst, tile.nuclei_class),
                                ("gland", tile.gland_inst, tile.gland_class)):
        ids = np.asarray(sorted(classes), np.int32)
        type_map = type_target(inst, ids, [classes[i] for i in ids])
        results[task] = TaskResult(inst, measure(inst, type_map, 7 if task == "nuclei" else 3), type_map)
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "t.png"), tile.image[..., ::-1])
    write_geojson(src / "t.geojson", annotation_records(results, ModelConfig.preset("original"), mpp=0.5))
    qupath_import(src, tmp_path / "dst", progress=False, whole_image=True)
    spec = load_dataset(tmp_path / "dst")
    for task, inst, classes in (("nuclei", tile.nuclei_inst, tile.nuclei_class),
                                ("gland", tile.gland_inst, tile.gland_class)):
        back = spec.read_annotation("t", task, inst.shape)
        assert len(back.ids) == len(classes) > 0
        back_class = dict(zip(back.ids.tolist(), back.classes.tolist(), strict=True))
        for i, cls in classes.items():  # pixel for pixel, with its class
            (j,) = np.unique(back.inst_map[inst == i])
            assert ((back.inst_map == j) == (inst == i)).all() and back_class[j] == cls
    assert spec.read_region("t", tile.image.shape[:2]) is None


def test_model_class_names_and_a_name_of_two_tasks(tmp_path):
    """--model's class names are the defaults; a name of nuclei and tissue goes by objectType."""
    import yaml

    from cerberus_histo.config import ModelConfig

    d = ModelConfig.preset("original").to_dict()
    for t in d["tasks"]:
        if t["name"] == "nuclei":
            t.update(class_names=["nolabel", "neoplastic", "inflammatory"], class_colors=[[0, 0, 0]] * 3,
                     class_weights=None)
        if t["name"] == "tissue":
            t["class_names"] = ["background", "neoplastic"] + t["class_names"][2:]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.yaml").write_text(yaml.safe_dump({"format": "cerberus-histo model", "model": d}))
    src = tmp_path / "src"
    write_tile(src, "t.png", (64, 64))
    write_json(src / "t.geojson", [feature(square(0, 0, 63, 63), "annotation", ("neoplastic",)),
                                   feature(square(5, 5, 15, 15), cls=("neoplastic",)),
                                   feature(square(20, 20, 30, 30), cls=("inflammatory",))])
    report = qupath_import(src, tmp_path / "dst", progress=False, whole_image=True, model=tmp_path / "model")
    assert report.features == {"tissue": {"neoplastic": 1}, "nuclei": {"neoplastic": 1, "inflammatory": 1}}
    spec = load_dataset(tmp_path / "dst")
    assert spec.annotation("nuclei").class_names == ("nolabel", "neoplastic", "inflammatory")
    assert list(spec.read_annotation("t", "nuclei", (64, 64)).classes) == [1, 2]
    assert (spec.read_annotation("t", "tissue", (64, 64)).class_map == 1).all()
    with pytest.raises(Exception, match="unknown class 'epithelial'"):
        write_json(src / "t.geojson", [feature(square(5, 5, 15, 15), cls=("epithelial",))])
        qupath_import(src, tmp_path / "dst2", progress=False, whole_image=True, model=tmp_path / "model")
