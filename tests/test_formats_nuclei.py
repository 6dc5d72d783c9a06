"""The Lizard, CoNIC and PanNuke importers, on tiny files written in each release's layout and dtypes."""

import csv

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli
from scipy.io import savemat

from cerberus_histo.data.dataset import load_dataset, write_rgb
from cerberus_histo.data.formats import import_dataset
from cerberus_histo.errors import CerberusError
from cerberus_histo.tasks import TASKS

S = 32  # the real patches are 256 x 256; the importers must not assume it


def _nuclei(rng, shape, ids):
    """An instance map with one rectangle per id (disjoint), in a grid of 8 x 8 cells."""
    inst = np.zeros(shape, np.int32)
    cols = shape[1] // 8
    for j, i in enumerate(ids):
        r, c = divmod(j, cols)
        h, w = rng.integers(3, 7, 2)
        inst[r * 8 + 1: r * 8 + 1 + h, c * 8 + 1: c * 8 + 1 + w] = i
    return inst


def _import(fmt, src, dst):
    spec = import_dataset(fmt, src, dst, progress=False)
    spec = load_dataset(dst)
    spec.check_files()
    return spec


def _broken(fmt, src, dst, *words):
    with pytest.raises(CerberusError) as info:
        import_dataset(fmt, src, dst, progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert str(w) in msg, (w, msg)
    assert not (dst / "dataset.yaml").exists()
    return msg


# ---- Lizard -----------------------------------------------------------------------------------------------


def _lizard(root, info=True):
    """Three images over the two image folders, their .mat labels, an Overlay PNG and info.csv."""
    rng = np.random.default_rng(1)
    truth = {}
    labels = root / "lizard_labels" / "Lizard_Labels"
    for k, (name, folder) in enumerate([("consep_1", "lizard_images1/Lizard_Images1"),
                                        ("crag_2", "lizard_images1/Lizard_Images1"),
                                        ("glas_3", "lizard_images2/Lizard_Images2")]):
        shape = (S + 8 * k, S + 4)  # sizes differ between images, as in the release
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        write_rgb(root / folder / f"{name}.png", image)
        write_rgb(labels / "Overlay" / f"{name}.png", 255 - image)  # not an image of the dataset
        ids = np.array([3, 5, 8, 12])
        classes = np.array([1, 6, 3, 2]) if k else np.array([4, 5, 2, 1])
        inst = _nuclei(rng, shape, ids[:3])  # id 12 is listed but has no pixels: kept out
        (labels / "Labels").mkdir(parents=True, exist_ok=True)
        savemat(labels / "Labels" / f"{name}.mat", {
            "inst_map": inst.astype(np.float64), "id": ids[:, None].astype(np.int32),
            "class": classes[:, None].astype(np.uint8), "bbox": np.zeros((4, 4), np.int32),
            "centroid": np.zeros((4, 2))})
        truth[name] = (image, inst, ids[:3], classes[:3])
    if info:
        (labels / "info.csv").write_text("Filename,Source,Split\nconsep_1,consep,3\ncrag_2,crag,3\nglas_3,glas,1\n")
    return truth


def test_lizard(tmp_path):
    truth = _lizard(tmp_path / "src")
    spec = _import("lizard", tmp_path / "src", tmp_path / "dst")
    assert spec.name == "lizard" and spec.mpp == 0.5 and spec.num_splits == 3
    assert spec.splits() == {"consep_1": 3, "crag_2": 3, "glas_3": 1}
    assert spec.annotation("nuclei").class_names == TASKS["nuclei"].class_names
    for name, (image, inst, ids, classes) in truth.items():
        assert np.array_equal(spec.read_image(name), image)
        ann = spec.read_annotation(name, "nuclei", image.shape[:2])
        assert np.array_equal(ann.inst_map, inst)
        assert ann.ids.tolist() == ids.tolist() and ann.classes.tolist() == classes.tolist()


def test_lizard_without_info_is_round_robin(tmp_path):
    _lizard(tmp_path / "src", info=False)
    spec = _import("lizard", tmp_path / "src", tmp_path / "dst")
    assert spec.splits() == {"consep_1": 1, "crag_2": 2, "glas_3": 3}


def _mat(src, name="crag_2"):
    return src / "lizard_labels" / "Lizard_Labels" / "Labels" / f"{name}.mat"


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("inst_map"), ["inst_map"]),
    (lambda m: m.update({"id": m["id"][1:], "class": m["class"][1:]}), ["[3]", "not in the id list"]),
    (lambda m: m.update({"class": np.array([[7], [1], [1], [1]])}), ["outside 0..6"]),
    (lambda m: m.update(inst_map=m["inst_map"][:-2]), ["differs from its image", "crag_2.png"]),
])
def test_lizard_bad_labels_name_the_file(tmp_path, change, words):
    from scipy.io import loadmat

    src = tmp_path / "src"
    _lizard(src)
    raw = {k: v for k, v in loadmat(_mat(src)).items() if not k.startswith("__")}
    change(raw)
    savemat(_mat(src), raw)
    _broken("lizard", src, tmp_path / "dst", _mat(src), *words)


def test_lizard_bad_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _broken("lizard", src, tmp_path / "dst", src, "no Lizard labels")
    _lizard(src)
    (src / "lizard_images1" / "Lizard_Images1" / "crag_2.png").unlink()
    _broken("lizard", src, tmp_path / "dst", _mat(src), "no image crag_2.png")
    _lizard(src, info=False)
    (src / "lizard_labels" / "Lizard_Labels" / "info.csv").write_text("Filename,Source,Split\nconsep_1,consep,4\n")
    _broken("lizard", src, tmp_path / "dst", "info.csv line 2", "Split")


# ---- CoNIC ------------------------------------------------------------------------------------------------

PATCHES = ["consep_1-0000", "consep_1-0001", "crag_2-0000", "glas_3-0000", "glas_3-0001", "pannuke_4-0000"]


def _conic(root, info=True, n=6):
    """images.npy, labels.npy (instance, class) and patch_info.csv; one nucleus per patch has mixed classes."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    labels = np.zeros((n, S, S, 2), np.int32)
    truth = []
    for i in range(n):
        ids = np.arange(1, 5)
        classes = rng.integers(1, 7, ids.size)
        inst = _nuclei(rng, (S, S), ids)
        class_map = np.zeros((S, S), np.int32)
        for j, c in zip(ids, classes, strict=True):
            class_map[inst == j] = c
        ys, xs = np.nonzero(inst == 1)
        class_map[ys[0], xs[0]] = classes[0] % 6 + 1  # a minority pixel of another class
        labels[i, ..., 0], labels[i, ..., 1] = inst, class_map
        truth.append((images[i], inst, ids, classes))
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    if info:
        (root / "patch_info.csv").write_text("patch_info\n" + "\n".join(PATCHES[:n]) + "\n")
    return truth


def test_conic(tmp_path):
    truth = _conic(tmp_path / "src" / "data")
    spec = _import("conic", tmp_path / "src", tmp_path / "dst")
    assert spec.name == "conic" and spec.mpp == 0.5 and spec.annotation("nuclei").class_names[6] == "connective"
    # groups (consep_1, crag_2, glas_3, pannuke_4) dealt round-robin: the patches of one image share a split
    assert spec.splits() == dict(zip(PATCHES, [1, 1, 2, 3, 3, 1], strict=True))
    for name, (image, inst, ids, classes) in zip(PATCHES, truth, strict=True):
        assert np.array_equal(spec.read_image(name), image)
        ann = spec.read_annotation(name, "nuclei", (S, S))
        assert np.array_equal(ann.inst_map, inst)
        assert ann.ids.tolist() == ids.tolist() and ann.classes.tolist() == classes.tolist()


def test_conic_without_patch_info(tmp_path):
    _conic(tmp_path / "src", info=False, n=4)
    spec = _import("conic", tmp_path / "src", tmp_path / "dst")
    assert spec.splits() == {"conic_00000": 1, "conic_00001": 2, "conic_00002": 3, "conic_00003": 1}


def test_conic_bad_inputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _broken("conic", src, dst, src, "images.npy")
    _conic(src)
    np.save(src / "labels.npy", np.zeros((5, S, S, 2), np.int32))  # one patch short
    _broken("conic", src, dst, src / "images.npy", src / "labels.npy")
    np.save(src / "labels.npy", np.zeros((6, S, S + 1, 2), np.int32))  # other size
    _broken("conic", src, dst, src / "images.npy", src / "labels.npy")
    np.save(src / "labels.npy", np.full((6, S, S, 2), 9, np.int32))  # class 9
    _broken("conic", src, dst, src / "labels.npy", "outside 0..6")
    np.save(src / "labels.npy", np.empty((6, S, S, 2), object), allow_pickle=True)  # never unpickled
    _broken("conic", src, dst, src / "labels.npy", "pickle")
    _conic(src)
    (src / "patch_info.csv").write_text("patch_info\nconsep_1-0000\n")
    _broken("conic", src, dst, src / "patch_info.csv", "1 patch names for 6")


def test_cli_import_conic(tmp_path):
    _conic(tmp_path / "src", n=3)
    proc = run_cli("import-dataset", "conic", tmp_path / "src", tmp_path / "dst")
    assert proc.returncode == 0, proc.stderr
    assert "imported 3 images" in proc.stdout
    assert load_dataset(tmp_path / "dst").check_files() == PATCHES[:3]
    np.save(tmp_path / "src" / "labels.npy", np.zeros((2, S, S, 2), np.int32))
    assert_clean_error(run_cli("import-dataset", "conic", tmp_path / "src", tmp_path / "dst2"),
                       "images.npy", "labels.npy")


# ---- PanNuke ----------------------------------------------------------------------------------------------

TYPES = ["Breast", "Colon", "Adrenal_gland"]


def _pannuke(root, folds=(1, 2), n=3, types_dtype=None):
    """Per fold: float64 images (with fractions), float64 masks with ids repeating across channels, types."""
    rng = np.random.default_rng(3)
    truth = {}
    for k in folds:
        images = rng.uniform(0, 255, (n, S, S, 3))
        images[0, 0, 0] = [-3.0, 255.4, 254.6]
        masks = np.zeros((n, S, S, 6))
        for i in range(n):
            regions = _nuclei(rng, (S, S), np.arange(1, 9))  # 8 nuclei shared out over channels 0..4
            for r in range(1, 9):
                masks[i, ..., r % 5][regions == r] = r % 3 + 1  # ids 1..3 repeat within and across channels
            masks[i, ..., 5] = (masks[i, ..., :5].sum(-1) == 0)
            truth[f"fold{k}_{i:05d}"] = (images[i], regions, k)
        base = root / f"Fold {k}"
        (base / "images" / f"fold{k}").mkdir(parents=True)
        (base / "masks" / f"fold{k}").mkdir(parents=True)
        np.save(base / "images" / f"fold{k}" / "images.npy", images)
        np.save(base / "masks" / f"fold{k}" / "masks.npy", masks)
        types = np.array([TYPES[i % 3] for i in range(n)], dtype=types_dtype)
        np.save(base / "images" / f"fold{k}" / "types.npy", types, allow_pickle=True)
    return truth


def test_pannuke(tmp_path):
    truth = _pannuke(tmp_path / "src")
    spec = _import("pannuke", tmp_path / "src", tmp_path / "dst")
    ann_spec = spec.annotation("nuclei")
    assert spec.name == "pannuke" and spec.mpp == 0.25 and spec.num_splits == 3
    assert ann_spec.class_names == ("nolabel", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
    assert len(ann_spec.class_colors) == 6
    assert spec.splits() == {name: k for name, (_, _, k) in truth.items()}
    for name, (image, regions, _) in truth.items():
        assert np.array_equal(spec.read_image(name), np.clip(np.rint(image), 0, 255).astype(np.uint8))
        ann = spec.read_annotation(name, "nuclei", (S, S))
        assert sorted(ann.ids.tolist()) == list(range(1, 9))  # new ids, unique within the image
        id_class = dict(zip(ann.ids.tolist(), ann.classes.tolist(), strict=True))
        for r in range(1, 9):  # each nucleus is one new id over exactly its pixels, class = channel + 1
            new = np.unique(ann.inst_map[regions == r])
            assert new.size == 1 and np.array_equal(ann.inst_map == new[0], regions == r)
            assert id_class[int(new[0])] == r % 5 + 1
        assert np.array_equal(ann.inst_map > 0, regions > 0)
    with open(tmp_path / "dst" / "tissue_types.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["Filename"]: r["Type"] for r in rows} == {f"fold{k}_{i:05d}": TYPES[i] for k in (1, 2) for i in range(3)}


def test_pannuke_one_fold_with_types_needing_pickle(tmp_path):
    _pannuke(tmp_path / "src", folds=(3,), n=2, types_dtype=object)
    with pytest.warns(UserWarning, match="types.npy"):  # src may be the fold folder itself
        spec = import_dataset("pannuke", tmp_path / "src" / "Fold 3", tmp_path / "dst", progress=False)
    assert spec.splits() == {"fold3_00000": 3, "fold3_00001": 3}
    assert not (tmp_path / "dst" / "tissue_types.csv").exists()


def test_pannuke_bad_inputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _broken("pannuke", src, dst, src, "no PanNuke images.npy")
    _pannuke(src, folds=(1,))
    images = src / "Fold 1" / "images" / "fold1" / "images.npy"
    masks = src / "Fold 1" / "masks" / "fold1" / "masks.npy"
    np.save(masks, np.zeros((2, S, S, 6)))
    _broken("pannuke", src, dst, images, masks)
    np.save(masks, np.zeros((3, S, S, 5)))
    _broken("pannuke", src, dst, masks, "x 6")
    np.save(masks, np.zeros((3, S, S, 6)))
    np.save(src / "Fold 1" / "images" / "fold1" / "types.npy", np.array(TYPES[:2]))
    _broken("pannuke", src, dst, "types.npy", images)
    masks.unlink()
    _broken("pannuke", src, dst, "masks.npy", src / "Fold 1")
