import json

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli
from test_postproc import probs_from_truth

from cerberus_histo.data.dataset import Annotation, load_dataset, write_label
from cerberus_histo.data.synthetic import write_tiles
from cerberus_histo.metrics.evaluate import evaluate
from cerberus_histo.postproc import postprocess


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic truth, and predictions post-processed from noisy probability maps of that truth."""
    root = tmp_path_factory.mktemp("eval")
    spec = write_tiles(root / "truth", 3, 192, seed=5, progress=False)
    rng = np.random.default_rng(0)
    for name in spec.names():
        nuc = spec.read_annotation(name, "nuclei")
        type_map = np.zeros(nuc.inst_map.shape, np.int64)
        for i, c in zip(nuc.ids, nuc.classes, strict=True):
            type_map[nuc.inst_map == i] = c
        gl = spec.read_annotation(name, "gland")
        probs = {"nuclei-inst": probs_from_truth(nuc.inst_map, 3, rng),
                 "nuclei-type": np.stack([(type_map == c).astype(np.float32) for c in range(7)]),
                 "gland-inst": probs_from_truth(gl.inst_map, 11, rng)}
        out = postprocess(probs)
        n = out["nuclei"]
        write_label(root / "pred" / "nuclei" / f"{name}.npz",
                    Annotation(n.inst_map, n.instances.ids, n.instances.types))
        write_label(root / "pred" / "gland" / f"{name}.npz", Annotation(out["gland"].inst_map))
        tissue = spec.read_annotation(name, "tissue").class_map
        write_label(root / "pred" / "tissue" / f"{name}.npz", Annotation(class_map=tissue))
    return root


def test_truth_against_itself_is_perfect(data):
    r = evaluate("nuclei", data / "truth" / "labels" / "nuclei", data / "truth")
    s = r["summary"]
    assert s["pq_mean"] == 1 and s["aji_mean"] == pytest.approx(1) and s["detection_f1"] == 1
    assert s["mpq_plus"] <= 1 and r["n_images"] == 3


def test_predictions_score_high_but_not_perfect(data):
    r = evaluate("nuclei", data / "pred" / "nuclei", data / "truth")
    s = r["summary"]
    assert 0.6 < s["pq_mean"] < 1 and 0.8 < s["detection_f1"] <= 1 and s["type_accuracy"] > 0.95
    g = evaluate("gland", data / "pred" / "gland", data / "truth")["summary"]
    assert g["object_f1_pooled"] > 0.8 and g["object_dice_pooled"] > 0.8
    t = evaluate("tissue", data / "pred" / "tissue", data / "truth")["summary"]
    assert t["accuracy"] == 1 and len(t["confusion"]) == 9


def test_cli_writes_json_and_table(data, tmp_path):
    proc = run_cli("evaluate", "--task", "nuclei", "--pred", data / "pred" / "nuclei", "--true", data / "truth",
                   "--json", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    assert "pq_mean" in proc.stdout and "mpq_plus" in proc.stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["per_image"]) == set(load_dataset(data / "truth").names())


def test_bad_input_names_the_file(data, tmp_path):
    import shutil

    pred = tmp_path / "pred"
    shutil.copytree(data / "pred" / "nuclei", pred)
    (pred / "synth_00001.npz").unlink()
    assert_clean_error(run_cli("evaluate", "--task", "nuclei", "--pred", pred, "--true", data / "truth"),
                       "synth_00001.npz has no prediction")
    write_label(pred / "synth_00001.npz", Annotation(np.zeros((5, 5), np.int32)))
    assert_clean_error(run_cli("evaluate", "--task", "nuclei", "--pred", pred, "--true", data / "truth"),
                       "synth_00001.npz: shape (5, 5) differs")
    write_label(pred / "extra.npz", Annotation(np.zeros((5, 5), np.int32)))
    with pytest.raises(Exception, match="extra.npz has no ground truth"):
        evaluate("nuclei", pred, data / "truth")


def _infer_tile_npz(path, arrays: dict, mpp: float, scale: float, cell: int = 16) -> None:
    """A file as ``infer-tile`` writes it: maps at the model's resolution plus the ``meta`` frame."""
    meta = {"mpp": mpp, "processing_mpp": mpp * scale, "scale": scale, "offset": [0.0, 0.0], "tissue_cell": cell}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays, meta=np.array(json.dumps(meta)))


def test_infer_tile_output_is_scored_as_it_is(tmp_path):
    """An infer-tile folder at the model's 0.5 um/px scores against truth at 0.25 um/px without glue code."""
    spec = write_tiles(tmp_path / "truth", 2, 192, seed=6, tasks=("nuclei", "lumen", "tissue"), progress=False)
    for name in spec.names():
        nuc = spec.read_annotation(name, "nuclei")
        half = nuc.inst_map[::2, ::2]  # the model saw the image at half the resolution
        types = np.zeros_like(half)
        for i, c in zip(nuc.ids, nuc.classes, strict=True):
            types[half == i] = c
        cells = spec.read_annotation(name, "tissue").class_map[7::14, 7::14]  # 14 cells of 7 model px: 98 > 96 px
        _infer_tile_npz(tmp_path / "pred" / f"{name}.npz", {"nuclei_inst": half, "nuclei_type": types,
                                                           "tissue_class": cells.astype(np.uint8)}, 0.25, 2.0, 7)
    (tmp_path / "pred" / f"{spec.names()[0]}.geojson").write_text("{}")  # the other outputs are ignored
    s = evaluate("nuclei", tmp_path / "pred", spec.root, mpp=0.25)["summary"]
    assert s["pq_mean"] > 0.75 and s["detection_f1"] > 0.97 and s["type_accuracy"] == 1.0, s
    t = evaluate("tissue", tmp_path / "pred", spec.root)["summary"]
    assert t["accuracy"] > 0.9, t
    assert_clean_error(run_cli("evaluate", "--task", "lumen", "--pred", tmp_path / "pred", "--true", spec.root),
                       "no lumen head")


def test_per_image_tissue_classes_and_one_split(tmp_path):
    """A patch-classification dataset (classes.csv) is the truth of per-image tissue classes; --split keeps one
    split's images; detection radii follow each image's resolution."""
    from cerberus_histo.data.synthetic import write_patches

    spec = write_patches(tmp_path / "tissue", 2, 64, progress=False)
    table = spec.image_classes("tissue")
    for name in spec.names(1):
        cells = np.full((2, 2), table[name], np.uint8)
        cells[0, 0] = 0  # the most frequent class of the map is the tile's
        _infer_tile_npz(tmp_path / "pred" / f"{name}.npz", {"tissue_class": cells}, 0.5, 1.0)
    proc = run_cli("evaluate", "--task", "tissue", "--pred", tmp_path / "pred", "--true", spec.root, "--split", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "pred" / "evaluation_tissue.json").read_text())
    assert result["n_images"] == len(spec.names(1)) and result["summary"]["accuracy"] == 1.0
    assert_clean_error(run_cli("evaluate", "--task", "tissue", "--pred", tmp_path / "pred", "--true", spec.root),
                       "has no prediction")
