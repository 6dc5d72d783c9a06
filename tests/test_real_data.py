"""The importers on byte-for-byte samples of the released datasets (``../shared/data/real``: MoNuSeg training
images + XML, GlaS, Kather 2016 texture tiles; skipped where absent), and the release quirks they handle
reproduced on small files (these run everywhere).

Expected values are read from the source files independently of the importers (ElementTree, Pillow, raw bytes).
"""

import json
import shutil
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli
from PIL import Image

from cerberus_histo.data.dataset import load_dataset, read_rgb
from cerberus_histo.data.formats import import_dataset
from cerberus_histo.data.formats.glas import read_instance_map
from cerberus_histo.errors import CerberusError
from cerberus_histo.tasks import TISSUE

MONUSEG = "monuseg/MoNuSeg 2018 Training Data"
GLAS = "glas/Warwick QU Dataset (Released 2016_07_08)"
KATHER = "kather2016/Kather_texture_2016_image_tiles_5000"
KATHER_2016_CLASSES = {"01_TUMOR": "abnormal_epi", "02_STROMA": "stroma", "03_COMPLEX": "stroma",
                       "04_LYMPHO": "inflammatory", "05_DEBRIS": "debris", "06_MUCOSA": "normal_epi",
                       "07_ADIPOSE": "adipose", "08_EMPTY": "background"}


def _sample(real_data: Path, rel: str) -> Path:
    path = real_data / rel
    if not path.is_dir():
        pytest.skip(f"../shared/data/real/{rel} not found: this real dataset sample is absent")
    return path


def _pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---- MoNuSeg ---------------------------------------------------------------------------------------------


def _xml_facts(path: Path) -> tuple[int, float | None]:
    """(regions with >= 3 vertices, MicronsPerPixel or None), parsed here without the importer."""
    n = 0
    for _, element in ET.iterparse(path, events=("end",)):
        if element.tag == "Region":
            n += len(element.findall("Vertices/Vertex")) >= 3
            element.clear()
    mpp = element.get("MicronsPerPixel")  # the last element closed is the root
    return n, None if mpp is None else float(mpp)


@pytest.fixture(scope="module")
def monuseg(real_data, tmp_path_factory):
    """(source folder, imported DatasetSpec, {stem: (regions, MicronsPerPixel)})."""
    src = _sample(real_data, MONUSEG)
    facts = {p.stem: _xml_facts(p) for p in sorted((src / "Annotations").glob("*.xml"))}
    return src, import_dataset("monuseg", src, tmp_path_factory.mktemp("monuseg"), progress=False), facts


def test_monuseg_release_files(monuseg):
    # what the importer relies on: LZW TIFFs without resolution tags, XML root with MicronsPerPixel (or not)
    src, _, facts = monuseg
    for path in sorted((src / "Tissue Images").glob("*.tif")):
        with Image.open(path) as im:
            assert im.info["compression"] == "tiff_lzw" and im.size == (1000, 1000), path.name
            assert 282 not in im.tag_v2 and 283 not in im.tag_v2, path.name  # no XResolution / YResolution
    mpps = {stem: mpp for stem, (_, mpp) in facts.items()}
    assert [n for n, m in mpps.items() if m is None] == ["TCGA-NH-A8F7-01A-01-TS1"]
    assert all(0.2456 <= m <= 0.2527 for m in mpps.values() if m is not None)


def test_monuseg_real(monuseg):
    src, spec, facts = monuseg
    tifs = {p.stem: p for p in (src / "Tissue Images").glob("*.tif")}
    assert len(facts) == 13 and set(tifs) == set(facts)
    spec = load_dataset(spec.root)
    assert spec.check_files() == sorted(facts) and spec.mpp == 0.25 and spec.mpp_csv == "mpps.csv"
    table = spec.image_mpps()
    for name, (n_regions, xml_mpp) in sorted(facts.items()):
        if xml_mpp is None:  # no MicronsPerPixel: the dataset's default, no row in mpps.csv
            assert name not in table and spec.image_mpp(name) == 0.25
        else:
            assert spec.image_mpp(name) == pytest.approx(xml_mpp, abs=1e-9), name
        image = spec.read_image(name)
        assert np.array_equal(image, _pillow_rgb(tifs[name])), name  # LZW decoded as Pillow does
        ann = spec.read_annotation(name, "nuclei", image.shape[:2])
        assert ann.inst_map.shape == image.shape[:2] == (1000, 1000)
        present = np.unique(ann.inst_map)
        # no region is entirely overwritten by later ones: one instance per region, ids 1..N
        assert len(ann.ids) == n_regions, (name, len(ann.ids), n_regions)
        assert ann.ids.tolist() == present[present > 0].tolist() == list(range(1, n_regions + 1)), name


def test_monuseg_regions_reaching_outside_are_clipped(monuseg):
    # TCGA-B0-5710 has vertices from -2.9 to 1002.1: its border nuclei touch the first and last rows/columns
    src, spec, _ = monuseg
    name = "TCGA-B0-5710-01Z-00-DX1"
    root = ET.parse(src / "Annotations" / f"{name}.xml").getroot()
    xy = np.array([(float(v.get("X")), float(v.get("Y"))) for v in root.iter("Vertex")])
    assert xy.min() < 0 and xy.max() > 1001
    inst = spec.read_annotation(name, "nuclei").inst_map
    assert inst[:, 0].any() and inst[:, -1].any() and inst[-1, :].any()


def test_monuseg_user_mpp_overrides_the_xml(real_data, tmp_path):
    src = tmp_path / "MoNuSeg 2018 Training Data"
    for stem in ("TCGA-B0-5710-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1"):  # with and without MicronsPerPixel
        for sub, ext in (("Tissue Images", ".tif"), ("Annotations", ".xml")):
            (src / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(_sample(real_data, MONUSEG) / sub / f"{stem}{ext}", src / sub)
    spec = import_dataset("monuseg", src, tmp_path / "dst", mpp=0.5, progress=False)
    assert spec.mpp == 0.5 and spec.mpp_csv is None and not (tmp_path / "dst" / "mpps.csv").exists()
    assert [spec.image_mpp(n) for n in spec.names()] == [0.5, 0.5]


# ---- GlaS ------------------------------------------------------------------------------------------------


def _bmp_header(path: Path) -> tuple[int, list[bytes]]:
    """(bits per pixel, palette entries as BGR bytes) from the raw BMP header."""
    data = path.read_bytes()
    offset, header_size = struct.unpack_from("<I", data, 10)[0], struct.unpack_from("<I", data, 14)[0]
    bpp = struct.unpack_from("<H", data, 28)[0]
    n = (offset - 14 - header_size) // 4
    return bpp, [data[14 + header_size + 4 * i: 14 + header_size + 4 * i + 3] for i in range(n)]


def test_glas_real(real_data, tmp_path):
    src = _sample(real_data, GLAS)
    annos = sorted(src.glob("*_anno.bmp"))
    assert len(annos) == 3
    for path in annos:  # 8-bit palettised with the identity grey palette: value = index = instance id
        bpp, palette = _bmp_header(path)
        assert bpp == 8 and palette == [bytes([i, i, i]) for i in range(256)], path.name
    raw = (src / "Grade.csv").read_bytes()
    assert b"\r" in raw and b"\n" not in raw  # old-Mac CR-only line endings
    rows = [[c.strip() for c in line.split(",")] for line in raw.decode().split("\r") if line.strip()]
    assert b", benign" in raw and rows[0][:3] == ["name", "patient ID", "grade (GlaS)"]
    grades = {r[0]: r[2] for r in rows[1:]}
    assert len(grades) == 165 and set(grades.values()) == {"benign", "malignant"}

    spec = import_dataset("glas", src, tmp_path / "dst", progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.check_files() == ["train_1", "train_12", "train_2"] and spec.mpp == 0.62005
    assert spec.splits() == {"train_1": 1, "train_12": 1, "train_2": 1}
    for name in spec.names():
        image = spec.read_image(name)
        assert np.array_equal(image, _pillow_rgb(src / f"{name}.bmp")), name
        with Image.open(src / f"{name}_anno.bmp") as im:
            values = np.asarray(im)
        ann = spec.read_annotation(name, "gland", image.shape[:2])
        distinct = np.unique(values)
        assert len(ann.ids) == np.count_nonzero(distinct) and ann.ids.tolist() == distinct[distinct > 0].tolist()
        assert np.array_equal(ann.inst_map, values) and (ann.classes == 1).all()
    text = (tmp_path / "dst" / "grades.csv").read_text()
    assert text == "Filename,Grade\n" + "".join(f"{n},{grades[n]}\n" for n in ["train_1", "train_12", "train_2"])
    assert text == "Filename,Grade\ntrain_1,malignant\ntrain_12,benign\ntrain_2,benign\n"


def test_instance_map_palette_indices(tmp_path):
    # a palettised map whose palette is not the grey ramp is read by its indices (the ids), not its colours
    ids = np.zeros((6, 7), np.uint8)
    ids[1:3, 1:3], ids[4:6, 2:6] = 1, 7
    im = Image.fromarray(ids, "P")
    im.putpalette([0, 0, 0] + [v for i in range(1, 256) for v in ((37 * i) % 256, (91 * i) % 256, 200)])
    im.save(tmp_path / "x_anno.bmp")
    with Image.open(tmp_path / "x_anno.bmp") as check:
        assert check.mode == "P"
    assert np.array_equal(read_instance_map(tmp_path / "x_anno.bmp", (6, 7)), ids)


# ---- Kather 2016 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["one level deeper", "directly"])
def test_kather2016_real(real_data, tmp_path, level):
    tiles_root = _sample(real_data, KATHER)
    src = tiles_root.parent if level == "one level deeper" else tiles_root
    tiles = sorted(tiles_root.glob("*/*.tif"))
    assert len(tiles) == 24 and {t.parent.name for t in tiles} == set(KATHER_2016_CLASSES)
    for tile in tiles:  # PackBits with a 72-dpi tag that is not the pixel size
        with Image.open(tile) as im:
            assert im.info["compression"] == "packbits" and im.info["dpi"] == (72.0, 72.0)
    import_dataset("kather", src, tmp_path / "dst", progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.mpp == 0.495 and spec.mpp_csv is None and spec.tasks == ("tissue",)
    names = {f"{t.parent.name}_{t.stem}": t for t in tiles}
    assert spec.check_files() == sorted(names)
    classes = spec.image_classes("tissue")
    assert {n: TISSUE.class_names[c] for n, c in classes.items()} == {
        n: KATHER_2016_CLASSES[t.parent.name] for n, t in names.items()}
    splits = spec.splits()
    for folder in KATHER_2016_CLASSES:  # round-robin within each class folder (3 tiles: splits 1, 2, 3)
        assert [splits[n] for n in sorted(names) if n.startswith(folder + "_")] == [1, 2, 3]
    for name, tile in names.items():
        image = spec.read_image(name)
        assert image.shape == (150, 150, 3) and np.array_equal(image, _pillow_rgb(tile)), name


def test_kather2016_without_complex_stroma(real_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(_sample(real_data, KATHER), src / "tiles", ignore=shutil.ignore_patterns("03_COMPLEX"))
    spec = import_dataset("kather", src, tmp_path / "dst", progress=False)
    assert len(spec.names()) == 21 and not any(n.startswith("03_COMPLEX") for n in spec.names())
    assert spec.mpp == 0.495


@pytest.mark.parametrize("layout", ["side by side", "nested side by side", "2019 direct, 2016 nested"])
def test_kather_both_sets_is_an_error(real_data, tmp_path, layout):
    tiles = _sample(real_data, KATHER)
    src = tmp_path / "src"
    old, new = {"side by side": ("", ""), "nested side by side": ("NCT-CRC-HE-100K/", "Kather_2016/"),
                "2019 direct, 2016 nested": ("", "Kather_2016/")}[layout]
    shutil.copytree(tiles / "01_TUMOR", src / f"{new}01_TUMOR")
    (src / f"{old}TUM").mkdir(parents=True)
    shutil.copy(next((tiles / "01_TUMOR").glob("*.tif")), src / f"{old}TUM" / "TUM-AAAA.tif")
    with pytest.raises(CerberusError, match="holds class folders of two Kather sets") as err:
        import_dataset("kather", src, tmp_path / "dst", progress=False)
    assert "\n" not in str(err.value) and "01_TUMOR" in str(err.value) and "TUM" in str(err.value)
    assert not (tmp_path / "dst" / "dataset.yaml").exists()


def test_cli_imports_kather2016(real_data, tmp_path):
    src = _sample(real_data, KATHER).parent
    proc = run_cli("import-dataset", "kather", src, tmp_path / "dst")
    assert proc.returncode == 0, proc.stderr
    line = f"imported 24 images (tissue) at 0.495 um/px into {tmp_path / 'dst' / 'dataset.yaml'}"
    assert line in proc.stdout.splitlines(), proc.stdout
    assert len(load_dataset(tmp_path / "dst").check_files()) == 24


# ---- the whole road on real files: import -> train -> infer-tile -> evaluate, with no glue code --------


def test_import_train_infer_evaluate_on_real_files(real_data, tmp_path, one_thread):
    """Three real MoNuSeg images (0.25 um/px, per-image mpp from the XML) train a tiny model at 0.5 um/px; its
    infer-tile output on the held-out image is scored against the truth at the truth's resolution."""
    import yaml

    src = _sample(real_data, MONUSEG)
    stems = sorted(p.stem for p in (src / "Annotations").glob("*.xml"))[:3]
    for stem in stems:  # a smaller copy of the release layout
        for sub, ext in (("Tissue Images", ".tif"), ("Annotations", ".xml")):
            (tmp_path / "src" / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / sub / f"{stem}{ext}", tmp_path / "src" / sub / f"{stem}{ext}")
    ds, run, pred = tmp_path / "ds", tmp_path / "run", tmp_path / "pred"
    assert run_cli("import-dataset", "monuseg", tmp_path / "src", ds).returncode == 0
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"batch_size": 2, "val_max_samples": 2, "model": {"encoder": "tiny",
                                                                                       "patch_shape": 128}}))
    proc = run_cli("train", "--nuclei", "--nuclei-dir", ds, "--config", params, "--max-steps", "2", "--fold", "1",
                   "--log-dir", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0.2468 um/px, 2.03x from the model's 0.5 um/px" in proc.stderr  # the farthest of the three images
    spec = load_dataset(ds)
    (held_out,) = spec.names(1)
    proc = run_cli("infer-tile", "--model", run / "model", "--input", spec.image_path(held_out), "--output", pred,
                   "--mpp", spec.image_mpp(held_out), "--formats", "npz,geojson")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("evaluate", "--task", "nuclei", "--pred", pred, "--true", ds, "--split", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((pred / "evaluation_nuclei.json").read_text())
    assert result["n_images"] == 1 and set(result["per_image"]) == {held_out}
    assert 0 <= result["summary"]["dice_mean"] <= 1 and "aji_mean" in result["summary"]


# ---- the releases' TIFF codecs and XML quirks, on small files ------------------------------------------


def test_tiff_codecs_of_the_releases_read_through_read_rgb(tmp_path):
    # MoNuSeg training: LZW with horizontal predictor, no resolution; MoNuSeg test, Kather 2016: PackBits, 72 dpi
    image = np.random.default_rng(0).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "lzw.tif", image, compression="lzw", predictor=True, photometric="rgb")
    tifffile.imwrite(tmp_path / "packbits.tif", image, compression="packbits", photometric="rgb",
                     resolution=(72, 72), resolutionunit="INCH")
    for name, compression in (("lzw.tif", "tiff_lzw"), ("packbits.tif", "packbits")):
        with Image.open(tmp_path / name) as im:
            assert im.info["compression"] == compression
        assert np.array_equal(read_rgb(tmp_path / name), image), name


def _tiny_monuseg(root: Path, stem: str, mpp_attr: str | None, regions) -> None:
    (root / "Tissue Images").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "Tissue Images" / f"{stem}.tif", np.full((20, 24, 3), 200, np.uint8),
                     compression="lzw", photometric="rgb")
    vertices = ["".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in pts) for pts in regions]
    body = "".join(f'<Region Id="{i + 1}"><Vertices>{v}</Vertices></Region>' for i, v in enumerate(vertices))
    attr = "" if mpp_attr is None else f' MicronsPerPixel="{mpp_attr}"'
    (root / "Annotations" / f"{stem}.xml").write_text(
        f"<Annotations{attr}><Annotation><Regions>{body}</Regions></Annotation></Annotations>")


def test_monuseg_microns_per_pixel_fallback_and_clipping(tmp_path):
    src = tmp_path / "src"
    square = [(2, 2), (5, 2), (5, 5), (2, 5)]
    cases = {"a": "0.252100", "b": None, "c": "abc", "d": "-0.25", "e": "0", "f": "nan", "g": " 0.5 ", "h": ""}
    for stem, attr in cases.items():
        _tiny_monuseg(src, stem, attr, [square])
    # vertices outside the 24 x 20 image: clipped; a region entirely outside is dropped (no border line)
    _tiny_monuseg(src, "z", "0.2468", [[(-3, -2.9), (3, -2.9), (3, 3), (-3, 3)], [(30, 2), (40, 2), (40, 9)],
                                       [(20, 15), (26.4, 15), (26.4, 22), (20, 22)]])
    spec = import_dataset("monuseg", src, tmp_path / "dst", progress=False)
    assert spec.mpp == 0.25
    assert {n: spec.image_mpp(n) for n in spec.names()} == {
        "a": 0.2521, "b": 0.25, "c": 0.25, "d": 0.25, "e": 0.25, "f": 0.25, "g": 0.5, "h": 0.25, "z": 0.2468}
    inst = spec.read_annotation("z", "nuclei").inst_map
    expected = np.zeros((20, 24), np.int32)
    expected[0:4, 0:4] = 1
    expected[15:20, 20:24] = 2
    assert np.array_equal(inst, expected)
