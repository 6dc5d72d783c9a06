import numpy as np
import pytest
import yaml
from scipy.io import savemat

from cerberus_histo.data.dataset import (
    Annotation,
    AnnotationSpec,
    DatasetSpec,
    load_dataset,
    read_rgb,
    write_label,
    write_rgb,
    write_splits,
)
from cerberus_histo.errors import CerberusError


def _make(root, ext=".npz", n=3, shape=(32, 40)):
    """A small gland dataset written by hand: images, labels, splits, dataset.yaml."""
    spec = DatasetSpec(name="hand", root=root, annotations=(
        AnnotationSpec("gland", ("inst", "type"), dir="labels/gland", ext=ext),))
    rng = np.random.default_rng(0)
    for i in range(n):
        name = f"img{i}"
        write_rgb(spec.image_path(name), rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        inst = np.zeros(shape, np.int32)
        inst[2:10, 3:12], inst[15:25, 20:30] = 4, 9
        if ext == ".npz":
            write_label(spec.label_path(name, "gland"), Annotation(inst, np.array([4, 9]), np.array([1, 2])))
        else:  # the original Cerberus / Lizard layout: column vectors
            spec.label_path(name, "gland").parent.mkdir(parents=True, exist_ok=True)
            savemat(spec.label_path(name, "gland"), {"inst_map": inst, "id": np.array([[4], [9]]),
                                                     "class": np.array([[1], [2]])})
    write_splits(root / "splits.csv", {f"img{i}": i % 3 + 1 for i in range(n)})
    spec.save()
    return load_dataset(root)


@pytest.mark.parametrize("ext", [".npz", ".mat"])
def test_round_trip(tmp_path, ext):
    spec = _make(tmp_path, ext)
    assert spec.names() == ["img0", "img1", "img2"] and spec.names(1) == ["img0"]
    ann = spec.read_annotation("img1", "gland", (32, 40))
    assert ann.ids.tolist() == [4, 9] and ann.classes.tolist() == [1, 2] and ann.inst_map[20, 25] == 9
    assert spec.annotation("gland").class_names == ("nolabel", "gland", "surface-epi")  # from the task spec
    assert np.array_equal(spec.read_mask("img1", (32, 40)), np.ones((32, 40), bool))


def test_yaml_errors_name_the_problem(tmp_path):
    _make(tmp_path)
    data = yaml.safe_load((tmp_path / "dataset.yaml").read_text())

    def broken(change, match):
        d = yaml.safe_load(yaml.safe_dump(data))
        change(d)
        (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(d))
        with pytest.raises(CerberusError, match=match):
            load_dataset(tmp_path)

    broken(lambda d: d.update(imagedir="x"), "imagedir")
    broken(lambda d: d.update(image_dir="nowhere"), "image_dir: folder .*nowhere not found")
    broken(lambda d: d["annotations"][0].update(kinds=["shape"]), "kinds")
    broken(lambda d: d["annotations"][0].update(dir="labels/none"), "annotations\\[gland\\].dir")
    broken(lambda d: d.update(num_splits=0), "num_splits")
    broken(lambda d: d["annotations"].append({"task": "mitosis", "kinds": ["type"], "dir": "labels/gland"}),
           "'type' needs 'inst'")
    with pytest.raises(CerberusError, match="not found"):
        load_dataset(tmp_path / "missing")


def test_bad_files_name_the_file(tmp_path):
    spec = _make(tmp_path)
    # an annotation whose shape differs from its image
    write_label(spec.label_path("img0", "gland"), Annotation(np.zeros((5, 5), np.int32), np.array([]), np.array([])))
    with pytest.raises(CerberusError, match="img0.npz: inst_map shape"):
        spec.read_annotation("img0", "gland", (32, 40))
    # class ids outside the declared classes
    inst = np.zeros((32, 40), np.int32)
    inst[1:4, 1:4] = 1
    write_label(spec.label_path("img1", "gland"), Annotation(inst, np.array([1]), np.array([7])))
    with pytest.raises(CerberusError, match="img1.npz: class holds ids outside 0..2"):
        spec.read_annotation("img1", "gland", (32, 40))
    # an image without its annotation
    assert spec.check_files() == ["img0", "img1", "img2"]
    spec.label_path("img2", "gland").unlink()
    with pytest.raises(CerberusError, match="img2.npz: missing \\(listed as 'img2'"):
        spec.check_files()
    with pytest.raises(CerberusError, match="img2.npz: annotation missing"):
        spec.read_annotation("img2", "gland")
    # a corrupt label file and a corrupt image
    spec.label_path("img1", "gland").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CerberusError, match="img1.npz is not a readable label file"):
        spec.read_annotation("img1", "gland")
    spec.image_path("img1").write_bytes(b"\x89PNG broken")
    with pytest.raises(CerberusError, match="img1.png is not a readable image"):
        spec.read_image("img1")
    # an empty split and a bad split value
    with pytest.raises(CerberusError, match="split 3 .* is empty"):
        write_splits(tmp_path / "splits.csv", {"img0": 1, "img1": 2}) or spec.names(3)
    (tmp_path / "splits.csv").write_text("Filename,Split\nimg0,9\n")
    with pytest.raises(CerberusError, match="line 2: Split 9 > num_splits 3"):
        spec.names()
    (tmp_path / "splits.csv").write_text("Name,Fold\nimg0,1\n")
    with pytest.raises(CerberusError, match="missing column"):
        spec.names()


def test_pickled_npz_is_refused(tmp_path):
    spec = _make(tmp_path)
    np.savez(spec.label_path("img0", "gland"), inst_map=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CerberusError, match="not a readable label file"):
        spec.read_annotation("img0", "gland")


def test_read_rgb_converts(tmp_path):
    import cv2

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    assert read_rgb(tmp_path / "g.png").shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), np.uint16)
    rgba[..., 2] = 65535  # red in BGRA
    cv2.imwrite(str(tmp_path / "r.png"), rgba)
    out = read_rgb(tmp_path / "r.png")
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [255, 0, 0]
