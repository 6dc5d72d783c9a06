"""The GlaS, CRAG, MoNuSeg and Kather importers, on tiny files written in each dataset's released format."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_clean_error, run_cli

from cerberus_histo.data.dataset import load_dataset
from cerberus_histo.data.formats import import_dataset
from cerberus_histo.data.formats.crag import import_crag
from cerberus_histo.data.formats.glas import import_glas, read_instance_map
from cerberus_histo.data.formats.kather import import_kather
from cerberus_histo.data.formats.monuseg import import_monuseg
from cerberus_histo.errors import CerberusError
from cerberus_histo.tasks import TISSUE


def _rgb(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _write(path: Path, array: np.ndarray) -> Path:
    """Write with OpenCV (RGB arrays are given in RGB order); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array[..., ::-1] if array.ndim == 3 else array)
    return path


def _no_dataset(dst: Path) -> bool:
    return not (dst / "dataset.yaml").exists()


# ---- GlaS ------------------------------------------------------------------------------------------------


GRADE_CSV = """name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)
testA_2,4, malignant, adenomatous
testB_5,2, benign, healthy
train_1,1, malignant, moderately differentiated
train_99,1, benign, healthy
"""


def _glas(root: Path, shape=(32, 40)) -> dict:
    """Three GlaS images (train, testA, testB) with 8-bit greyscale BMP instance maps; returns what was drawn."""
    folder = root / "Warwick QU Dataset (Released 2016_07_08)"
    drawn = {}
    for i, name in enumerate(["train_1", "testA_2", "testB_5"]):
        image = _rgb(shape, i)
        inst = np.zeros(shape, np.uint8)
        if name != "testB_5":  # testB_5 has no glands
            inst[2:10, 3:12], inst[15:25, 20:30] = 3, 7 + i  # non-contiguous ids are kept
        _write(folder / f"{name}.bmp", image)
        _write(folder / f"{name}_anno.bmp", inst)
        drawn[name] = (image, inst)
    (folder / "Grade.csv").write_text(GRADE_CSV)
    return drawn


def test_glas(tmp_path):
    drawn = _glas(tmp_path / "src")
    spec = import_glas(tmp_path / "src", tmp_path / "dst", progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.name == "glas" and spec.mpp == 0.62005 and spec.num_splits == 3 and spec.tasks == ("gland",)
    assert spec.splits() == {"train_1": 1, "testA_2": 2, "testB_5": 3}
    assert spec.check_files() == ["testA_2", "testB_5", "train_1"]
    assert spec.annotation("gland").kinds == ("inst", "type")
    for name, (image, inst) in drawn.items():
        assert np.array_equal(spec.read_image(name), image)
        ann = spec.read_annotation(name, "gland", image.shape[:2])
        assert np.array_equal(ann.inst_map, inst)
        assert ann.ids.tolist() == sorted(set(np.unique(inst).tolist()) - {0})
        assert ann.classes.tolist() == [1] * len(ann.ids)  # every gland is "gland"
    assert spec.read_annotation("testA_2", "gland").ids.tolist() == [3, 8]
    assert (tmp_path / "dst" / "grades.csv").read_text() == (
        "Filename,Grade\ntestA_2,malignant\ntestB_5,benign\ntrain_1,malignant\n")


def test_glas_without_grades_and_with_mpp(tmp_path):
    _glas(tmp_path / "src")
    next((tmp_path / "src").rglob("Grade.csv")).unlink()
    spec = import_glas(tmp_path / "src", tmp_path / "dst", mpp=0.5, progress=False)
    assert load_dataset(tmp_path / "dst").mpp == 0.5 and len(spec.names()) == 3
    assert not (tmp_path / "dst" / "grades.csv").exists()


def test_instance_map_from_colour_file(tmp_path):
    # a colour-decoded instance map: equal channels are greyscale, distinct colours become instances
    grey = np.zeros((8, 9), np.uint8)
    grey[1:3, 1:3] = 5
    _write(tmp_path / "grey.bmp", np.repeat(grey[..., None], 3, axis=2))
    assert np.array_equal(read_instance_map(tmp_path / "grey.bmp", (8, 9)), grey)
    colour = np.zeros((8, 9, 3), np.uint8)
    colour[1:3, 1:3], colour[5:7, 4:8] = (255, 0, 0), (0, 0, 255)
    inst = read_instance_map(_write(tmp_path / "colour.bmp", colour), (8, 9))
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2] and (inst > 0).sum() == 4 + 8
    assert len(np.unique(inst[1:3, 1:3])) == 1 and len(np.unique(inst[5:7, 4:8])) == 1


def test_glas_bad_input(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    folder = src / "Warwick QU Dataset (Released 2016_07_08)"
    _glas(src)
    # an image without its instance map
    (folder / "testA_2_anno.bmp").unlink()
    with pytest.raises(CerberusError, match="testA_2.bmp: its instance map testA_2_anno.bmp was not found"):
        import_glas(src, dst, progress=False)
    assert _no_dataset(dst)
    # an instance map whose shape differs from its image
    _write(folder / "testA_2_anno.bmp", np.zeros((32, 41), np.uint8))
    with pytest.raises(CerberusError, match=r"testA_2_anno.bmp: annotation shape \(32, 41\) differs"):
        import_glas(src, dst, progress=False)
    assert _no_dataset(dst)
    _write(folder / "testA_2_anno.bmp", np.zeros((32, 40), np.uint8))
    # a corrupt image, after an earlier import left a dataset.yaml: no dataset.yaml afterwards
    import_glas(src, dst, progress=False)
    assert not _no_dataset(dst)
    (folder / "train_1.bmp").write_bytes(b"BM not really a bitmap")
    with pytest.raises(CerberusError, match="train_1.bmp is not a readable image"):
        import_glas(src, dst, progress=False)
    assert _no_dataset(dst)
    _write(folder / "train_1.bmp", _rgb((32, 40)))
    # a name that gives no split
    _write(folder / "extra_1.bmp", _rgb((32, 40)))
    with pytest.raises(CerberusError, match="extra_1.bmp: not a GlaS image name"):
        import_glas(src, dst, progress=False)
    (folder / "extra_1.bmp").unlink()
    # a Grade.csv without the grade column
    (folder / "Grade.csv").write_text("name,grade\ntrain_1,benign\n")
    with pytest.raises(CerberusError, match="Grade.csv: expected columns"):
        import_glas(src, dst, progress=False)
    assert _no_dataset(dst)


# ---- CRAG ------------------------------------------------------------------------------------------------


def test_crag(tmp_path):
    root = tmp_path / "src" / "CRAG"
    shape = (24, 30)
    drawn = {}
    for part, stem, dtype in [("train", "train_1", np.uint16), ("train", "train_2", np.uint8),
                              ("valid", "test_1", np.uint16)]:
        image = _rgb(shape, len(drawn))
        inst = np.zeros(shape, dtype)
        inst[1:6, 2:9] = 300 if dtype == np.uint16 else 4
        inst[10:20, 12:25] = 1000 if dtype == np.uint16 else 2
        _write(root / part / "Images" / f"{stem}.png", image)
        _write(root / part / "Annotation" / f"{stem}.png", inst)
        drawn[f"{part}_{stem}"] = (image, inst)
    import_crag(tmp_path / "src", tmp_path / "dst", mpp=0.5, progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.name == "crag" and spec.mpp == 0.5 and spec.num_splits == 2
    assert spec.splits() == {"train_train_1": 1, "train_train_2": 1, "valid_test_1": 2}
    assert spec.check_files() == sorted(drawn)
    for name, (image, inst) in drawn.items():
        assert np.array_equal(spec.read_image(name), image)
        ann = spec.read_annotation(name, "gland", shape)
        assert np.array_equal(ann.inst_map, inst) and ann.classes.tolist() == [1, 1]
    assert spec.read_annotation("valid_test_1", "gland").ids.tolist() == [300, 1000]
    assert import_crag(tmp_path / "src", tmp_path / "dst2", progress=False).mpp == 0.55


def test_crag_bad_input(tmp_path):
    root, dst = tmp_path / "src" / "CRAG", tmp_path / "dst"
    _write(root / "train" / "Images" / "train_1.png", _rgb((16, 16)))
    with pytest.raises(CerberusError, match="train_1.png: its annotation .*Annotation.train_1.png was not found"):
        import_crag(tmp_path / "src", dst, progress=False)
    _write(root / "train" / "Annotation" / "train_1.png", np.zeros((16, 17), np.uint16))
    with pytest.raises(CerberusError, match=r"Annotation.train_1.png: annotation shape \(16, 17\) differs"):
        import_crag(tmp_path / "src", dst, progress=False)
    (root / "train" / "Annotation" / "train_1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CerberusError, match="train_1.png is not a readable image"):
        import_crag(tmp_path / "src", dst, progress=False)
    assert _no_dataset(dst)


# ---- MoNuSeg ---------------------------------------------------------------------------------------------


def _region(rid: int, points) -> str:
    vertices = "\n".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in points)
    return (f'<Region Id="{rid}" Type="0" Zoom="0.5" Selected="0" ImageLocation="" ImageFocus="-1" Length="40.0" '
            f'Area="100.0" LengthMicrons="10.0" AreaMicrons="6.3" Text="" NegativeROA="0" InputRegionId="0" '
            f'Analyze="1" DisplayId="{rid}">\n<Attributes/>\n<Vertices>\n{vertices}\n</Vertices>\n</Region>')


def _monuseg_xml(regions) -> str:
    body = "\n".join(_region(i + 1, pts) for i, pts in enumerate(regions))
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.252100">
<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" Incremental="0" Type="4" \
LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" MacroName="">
<Attributes>
<Attribute Name="Description" Id="0" Value=""/>
</Attributes>
<Regions>
<RegionAttributeHeaders>
<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>
<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>
</RegionAttributeHeaders>
{body}
</Regions>
<Plots/>
</Annotation>
</Annotations>
"""


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_monuseg(tmp_path):
    src = tmp_path / "MoNuSeg 2018 Training Data"
    shape = (40, 48)
    regions = [
        _rect(2, 3, 10, 8),  # id 1: 9 x 6 = 54 pixels
        [(30, 30), (31, 31)],  # fewer than 3 vertices: dropped, takes no id
        _rect(20, 20, 25, 25),  # id 2: covered entirely by id 3, so not kept
        _rect(19, 19, 26, 26),  # id 3
        _rect(30.4, 2.6, 35.6, 6.4),  # id 4: rounds to x 30..36, y 3..6
        [(40, 30), (47, 30), (40, 37)],  # id 5: a right triangle, 8 + 7 + ... + 1 = 36 pixels
    ]
    expected = np.zeros(shape, np.int32)
    expected[3:9, 2:11] = 1
    expected[19:27, 19:27] = 3
    expected[3:7, 30:37] = 4
    for k in range(8):
        expected[30 + k, 40:48 - k] = 5
    images = {}
    for i, stem in enumerate(["TCGA-B0-5711-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"]):
        images[stem] = _write(src / "Tissue Images" / f"{stem}.tif", _rgb(shape, i))
        (src / "Annotations").mkdir(parents=True, exist_ok=True)
        (src / "Annotations" / f"{stem}.xml").write_text(_monuseg_xml(regions if i == 0 else regions[:1]))
    import_monuseg(src, tmp_path / "dst", progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.name == "monuseg" and spec.mpp == 0.25 and spec.num_splits == 3 and spec.tasks == ("nuclei",)
    assert spec.annotation("nuclei").kinds == ("inst",)
    names = sorted(images)
    assert spec.splits() == {names[0]: 1, names[1]: 2, names[2]: 3}  # round-robin over sorted names
    assert spec.check_files() == names
    for i, stem in enumerate(["TCGA-B0-5711-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"]):
        assert np.array_equal(spec.read_image(stem), _rgb(shape, i))
    ann = spec.read_annotation("TCGA-B0-5711-01Z-00-DX1", "nuclei", shape)
    assert (ann.inst_map == 1).sum() == 54 and (ann.inst_map == 5).sum() == 36
    assert np.array_equal(ann.inst_map, expected) and ann.ids.tolist() == [1, 3, 4, 5] and ann.classes is None


def test_monuseg_side_by_side(tmp_path):
    # the test-set layout: images (.tif or .png) and xml files in one folder
    src = tmp_path / "MoNuSegTestData"
    _write(src / "TCGA-2Z-A9J9-01A-01-TS1.tif", _rgb((20, 20), 1))
    _write(src / "TCGA-44-2665-01B-06-BS6.png", _rgb((20, 20), 2))
    for stem in ("TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6"):
        (src / f"{stem}.xml").write_text(_monuseg_xml([_rect(1, 1, 4, 4)]))
    spec = import_monuseg(src, tmp_path / "dst", mpp=0.5, progress=False)
    assert spec.splits() == {"TCGA-2Z-A9J9-01A-01-TS1": 1, "TCGA-44-2665-01B-06-BS6": 2} and spec.mpp == 0.5
    assert (spec.read_annotation("TCGA-44-2665-01B-06-BS6", "nuclei").inst_map == 1).sum() == 16


def test_monuseg_bad_input(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write(src / "Tissue Images" / "TCGA-A.tif", _rgb((16, 16)))
    with pytest.raises(CerberusError, match="TCGA-A.tif: its annotation TCGA-A.xml was not found"):
        import_monuseg(src, dst, progress=False)
    (src / "Annotations").mkdir()
    (src / "Annotations" / "TCGA-A.xml").write_text("<Annotations><Annotation><Regions>")
    with pytest.raises(CerberusError, match="TCGA-A.xml is not a readable XML file"):
        import_monuseg(src, dst, progress=False)
    (src / "Annotations" / "TCGA-A.xml").write_text(_monuseg_xml([[(1, 1), (2, "x"), (3, 1)]]))
    with pytest.raises(CerberusError, match="TCGA-A.xml: region 1 has a vertex without numeric X and Y"):
        import_monuseg(src, dst, progress=False)
    (src / "Annotations" / "TCGA-A.xml").write_text(_monuseg_xml([]))
    (src / "Tissue Images" / "TCGA-A.tif").write_bytes(b"II*\x00 truncated")
    with pytest.raises(CerberusError, match="TCGA-A.tif is not a readable image"):
        import_monuseg(src, dst, progress=False)
    assert _no_dataset(dst)


# ---- Kather ----------------------------------------------------------------------------------------------


def test_kather(tmp_path):
    src = tmp_path / "src"
    root = src / "NCT-CRC-HE-100K"
    files = {"ADI": ["ADI-AAAFLCLY", "ADI-AAAMHQMK", "ADI-AAANWKKC", "ADI-AAAQTKRL"], "TUM": ["TUM-AAAHFQYK",
             "TUM-AAACNWYS"], "LYM": ["LYM-AAAHGCQE"]}
    k = 0
    for folder, stems in files.items():
        for stem in stems:
            _write(root / folder / f"{stem}.tif", _rgb((16, 16), k))
            k += 1
    (root / "notes").mkdir()  # other folders are ignored
    import_kather(src, tmp_path / "dst", progress=False)
    spec = load_dataset(tmp_path / "dst")
    assert spec.name == "kather" and spec.mpp == 0.5 and spec.num_splits == 3
    assert spec.annotation("tissue").kinds == ("class",) and spec.annotation("tissue").csv == "classes.csv"
    assert spec.splits() == {  # round-robin within each class, over sorted names
        "ADI_ADI-AAAFLCLY": 1, "ADI_ADI-AAAMHQMK": 2, "ADI_ADI-AAANWKKC": 3, "ADI_ADI-AAAQTKRL": 1,
        "TUM_TUM-AAACNWYS": 1, "TUM_TUM-AAAHFQYK": 2, "LYM_LYM-AAAHGCQE": 1}
    assert len(spec.check_files()) == 7
    names = TISSUE.class_names
    expected = {"ADI": "adipose", "TUM": "abnormal_epi", "LYM": "inflammatory"}
    assert spec.image_classes("tissue") == {f"{f}_{s}": names.index(expected[f]) for f, ss in files.items() for s in ss}
    assert spec.read_annotation("TUM_TUM-AAACNWYS", "tissue").label == names.index("abnormal_epi")
    assert np.array_equal(spec.read_image("ADI_ADI-AAAMHQMK"), _rgb((16, 16), 1))
    assert "ADI_ADI-AAAFLCLY,adipose" in (tmp_path / "dst" / "classes.csv").read_text()


def test_kather_mapping_covers_the_nine_classes(tmp_path):
    from cerberus_histo.data.formats.kather import CLASSES

    assert sorted(CLASSES.values()) == sorted(TISSUE.class_names)
    for i, folder in enumerate(CLASSES):  # class folders directly under the source folder
        _write(tmp_path / "src" / folder / f"{folder}-X.tif", _rgb((8, 8), i))
    spec = import_kather(tmp_path / "src", tmp_path / "dst", progress=False)
    classes = spec.image_classes("tissue")
    assert {n: TISSUE.class_names[c] for n, c in classes.items()} == {f"{f}_{f}-X": c for f, c in CLASSES.items()}


def test_kather_bad_input(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "data" / "OTHER").mkdir(parents=True)
    with pytest.raises(CerberusError, match="src: no Kather class folders found"):
        import_kather(src, dst, progress=False)
    (src / "data" / "ADI").mkdir()
    with pytest.raises(CerberusError, match="class folders hold no images"):
        import_kather(src, dst, progress=False)
    (src / "data" / "ADI" / "ADI-A.tif").write_bytes(b"MM\x00* broken")
    with pytest.raises(CerberusError, match="ADI-A.tif is not a readable image"):
        import_kather(src, dst, progress=False)
    assert _no_dataset(dst)


# ---- all formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["glas", "crag", "monuseg", "kather"])
def test_empty_source(tmp_path, fmt):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "readme.txt").write_text("nothing here")
    with pytest.raises(CerberusError, match=f"{tmp_path / 'src'}: no "):
        import_dataset(fmt, tmp_path / "src", tmp_path / "dst", progress=False)
    assert _no_dataset(tmp_path / "dst")


def test_cli(tmp_path):
    _glas(tmp_path / "src")
    proc = run_cli("import-dataset", "glas", tmp_path / "src", tmp_path / "dst")
    assert proc.returncode == 0, proc.stderr
    assert "imported 3 images (gland) at 0.62005 um/px" in proc.stdout
    assert load_dataset(tmp_path / "dst").check_files() == ["testA_2", "testB_5", "train_1"]
    next((tmp_path / "src").rglob("train_1_anno.bmp")).unlink()
    proc = run_cli("import-dataset", "glas", tmp_path / "src", tmp_path / "dst2")
    assert_clean_error(proc, "train_1.bmp", "train_1_anno.bmp")
    assert _no_dataset(tmp_path / "dst2")
