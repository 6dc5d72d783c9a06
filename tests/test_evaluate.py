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
