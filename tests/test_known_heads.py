"""Outputs say only what the model knows (issue 32 items 1, 2 and 6): instances without a type carry no class name
in any format, heads that were never trained write nothing, and a finished slide's result keeps its timings."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import calibrate, run_cli
from skimage.draw import disk, ellipse

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.config import trusted_heads
from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.data.synthetic import synth_tile
from cerberus_histo.data.targets import instance_target, type_target
from cerberus_histo.errors import CerberusError
from cerberus_histo.infer.engine import Predictor
from cerberus_histo.infer.wsi import TIMING_KEYS
from cerberus_histo.outputs.records import UNTYPED, UNTYPED_COLOR, annotation_records
from cerberus_histo.outputs.store import AnnotationStore
from cerberus_histo.outputs.summary import summarize
from cerberus_histo.outputs.writers import write_outputs
from cerberus_histo.postproc import postprocess
from cerberus_histo.tasks import NUCLEI

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
CONFIG = ModelConfig.preset("original", encoder="tiny")
H = W = 128
WINDOW = ("--input-shape", "192", "--output-shape", "128")
#: every class name of every head; a head's names may appear only when that head is trusted
NAMES = {h: set(CONFIG.task(h.split("-")[0]).class_names) for h in ("gland-type", "nuclei-type", "tissue-class")}
NAMES["lumen-inst"] = {"lumen"}


def onehot(label, n):
    return np.stack([(label == c).astype(np.float32) for c in range(n)])


@pytest.fixture(scope="module")
def probs() -> dict[str, np.ndarray]:
    """Probabilities of every head: two glands with a lumen each, five typed nuclei, a tissue map."""
    gland, lumen, nuc = (np.zeros((H, W), np.int32) for _ in range(3))
    gland[ellipse(40, 40, 20, 28, (H, W))] = 1
    gland[ellipse(90, 85, 25, 25, (H, W))] = 2
    lumen[disk((40, 40), 10, shape=(H, W))] = 1
    lumen[disk((90, 85), 11, shape=(H, W))] = 2
    for i, yx in enumerate([(115, 10), (115, 30), (10, 110), (20, 120), (60, 110)]):
        nuc[disk(yx, 4, shape=(H, W))] = i + 1
    cmap = np.full((H // 16, W // 16), 5)
    cmap[:, 4:] = 1
    return {"gland-inst": onehot(instance_target(gland, 11), 3), "gland-type": onehot(type_target(gland, [1, 2], [1, 2]), 3),
            "lumen-inst": onehot(instance_target(lumen, 3), 3), "nuclei-inst": onehot(instance_target(nuc, 3), 3),
            "nuclei-type": onehot(type_target(nuc, np.arange(1, 6), [1, 2, 3, 4, 1]), 7),
            "tissue-class": onehot(cmap, 9) * 0.9 + 0.01}


def strings(obj) -> set[str]:
    """Every string value and key in a JSON document."""
    if isinstance(obj, dict):
        return set(obj) | set().union(*(strings(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(strings(v) for v in obj))
    return {obj} if isinstance(obj, str) else set()


def forbidden(trusted) -> set[str]:
    """The class names only heads outside ``trusted`` could give (names of trusted heads are allowed)."""
    allowed = set().union(*(NAMES[h] for h in NAMES if h in trusted))
    return set().union(*NAMES.values()) - allowed


def store_properties(db: Path) -> list[dict]:
    con = sqlite3.connect(db)
    try:
        return [json.loads(p) for (p,) in con.execute("SELECT properties FROM annotations")]
    finally:
        con.close()


def csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(Path(path).open()))


# ---- item 1: one rule for instances without a type, in every format -------------------------------------
def test_instances_without_a_type_head_carry_no_class_in_any_format(probs, tmp_path):
    """A model without type heads (the MoNuSeg case, and glands without gland-type): before, every nucleus was a
    "neutrophil" and every gland a "gland" (class index 1 used as "no type") in GeoJSON, store and summary."""
    config = ModelConfig(tasks=(CONFIG.task("gland").with_heads("inst"), CONFIG.task("lumen"),
                                NUCLEI.with_heads("inst")), encoder="tiny")
    results = postprocess({k: v for k, v in probs.items() if k.endswith("-inst")}, 0.5)
    img = np.full((H, W, 3), 90, np.uint8)
    paths = write_outputs(tmp_path, "t", results, config, mpp=0.5, image=img)
    feats = json.loads(paths["geojson"].read_text())["features"]
    by_kind = {}
    for f in feats:
        by_kind.setdefault(f["properties"].get("classification", {}).get("name"), []).append(f)
    # nuclei (detections) and glands: unclassified in QuPath (no classification); lumina keep their own class
    assert set(by_kind) == {None, "lumen"} and len(by_kind["lumen"]) == 2
    assert sum(f["properties"]["objectType"] == "detection" for f in by_kind[None]) == 5
    assert sum(f["properties"]["objectType"] == "annotation" for f in by_kind[None]) == 2
    props = store_properties(paths["sqlite"])
    assert {(p["task"], p["type"]) for p in props} == {("nuclei", None), ("gland", None), ("lumen", "lumen")}
    with AnnotationStore(paths["sqlite"], readonly=True) as store:  # read back: untyped, not class 0
        back = {r.task: r for r in store.records(config)}
    assert (back["nuclei"].class_index == UNTYPED).all() and (back["gland"].class_index == UNTYPED).all()
    hover = json.loads(paths["hovernet"].read_text())
    assert {(e["type"], e["type_prob"]) for s in ("nuc", "gland", "lumen") for e in hover[s].values()} == {(None, None)}
    rows = [r for r in csv_rows(paths["csv"]) if r["task"] in ("nuclei", "gland")]
    assert {r["class"] for r in rows} == {"unclassified"}
    assert {(r["task"], r["tissue_class"], r["count"]) for r in rows} == {("nuclei", "all", "5"), ("gland", "all", "2"),
                                                                          ("nuclei", "unclassified", "5")}
    summary = summarize(annotation_records(results, config, 0.5), config, analysed_area_um2=1.0)
    assert list(summary["nuclei"]) == ["unclassified"] and summary["nuclei"]["unclassified"]["count"] == 5
    assert list(summary["gland"]) == ["unclassified"] and list(summary["lumen"]) == ["lumen"]
    # the overlay draws untyped outlines in the neutral colour, no class's colour
    overlay = cv2.cvtColor(cv2.imread(str(paths["overlay"])), cv2.COLOR_BGR2RGB)
    x, y = results["nuclei"].instances.contours[0][0].astype(int)
    assert tuple(overlay[y, x]) == UNTYPED_COLOR
    drawn = {tuple(c) for c in overlay.reshape(-1, 3)}
    assert drawn == {(90, 90, 90), UNTYPED_COLOR, tuple(CONFIG.task("lumen").class_colors[1])}


# ---- item 6 at the writers: the trusted heads decide ------------------------------------------------------
def test_writers_keep_to_the_trusted_heads(probs, tmp_path):
    """Results of all six heads, of which only nuclei-inst was trained: nothing of the other heads is written."""
    results = postprocess(probs, 0.5)
    heads = ("nuclei-inst",)
    paths = write_outputs(tmp_path, "t", results, CONFIG, mpp=0.5, image=np.full((H, W, 3), 90, np.uint8),
                          heads=heads, cell=16)
    bad = forbidden(heads)
    feats = json.loads(paths["geojson"].read_text())
    assert len(feats["features"]) == 5 and not strings(feats) & bad
    assert {p["task"] for p in store_properties(paths["sqlite"])} == {"nuclei"}
    assert not strings(store_properties(paths["sqlite"])) & bad
    hover = json.loads(paths["hovernet"].read_text())
    assert set(hover) == {"mag", "nuc"} and not strings(hover) & bad
    rows = csv_rows(paths["csv"])
    assert {r["task"] for r in rows} == {"analysed", "nuclei"}
    assert {r["class"] for r in rows} | {r["tissue_class"] for r in rows} <= {"all", "", "unclassified"}
    with np.load(paths["npz"]) as z:
        assert set(z.files) == {"nuclei_inst", "meta"} and json.loads(str(z["meta"]))["trusted_heads"] == ["nuclei-inst"]
    with AnnotationStore(paths["sqlite"], readonly=True) as store:
        assert store.metadata["trusted_heads"] == ["nuclei-inst"]
    # a trusted type head types them again; tissue stays out without its head
    typed = write_outputs(tmp_path / "typed", "t", results, CONFIG, mpp=0.5, heads=("nuclei-inst", "nuclei-type"),
                          formats=("csv", "geojson"))
    assert {f["properties"]["classification"]["name"] for f in
            json.loads(typed["geojson"].read_text())["features"]} == {"neutrophil", "epithelial", "lymphocyte", "plasma"}
    assert {r["tissue_class"] for r in csv_rows(typed["csv"]) if r["task"] == "nuclei"} == {"all", "unclassified"}


# ---- models and provenance --------------------------------------------------------------------------------
def test_trusted_heads_come_from_the_provenance():
    assert trusted_heads(CONFIG) == CONFIG.head_names  # original release / fresh model: every head
    assert trusted_heads(CONFIG, {"trained_heads": "nuclei-inst, tissue-class"}) == ("nuclei-inst", "tissue-class")
    assert trusted_heads(CONFIG, {"trained_heads": ["gland-type", "nope"]}) == ("gland-type",)
    net = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8))
    net.provenance = {"trained_heads": "nuclei-inst"}
    assert Predictor(net, device="cpu", precision="fp32").heads == ("nuclei-inst",)  # the others are not run
    net.provenance = {"trained_heads": ""}
    with pytest.raises(CerberusError, match="train"):
        Predictor(net, device="cpu", precision="fp32")


def test_fine_tuning_keeps_the_heads_the_folder_had_trained(tmp_path):
    """A --subtype run trains only nuclei-type; nuclei-inst and tissue-class come trained from stage 1 and must
    stay trusted (else the stage-2 model would write no nuclei at all)."""
    from cerberus_histo.train.config import TrainConfig
    from cerberus_histo.train.run import _write_models, build_model

    stage1 = Cerberus(ModelConfig(tasks=(NUCLEI.with_heads("inst"), CONFIG.task("tissue")), encoder="tiny",
                                  head_channels=8))
    stage1.provenance = {"trained_heads": "nuclei-inst, tissue-class"}
    stage1.save(tmp_path / "s1")
    cfg = TrainConfig()
    model, origin = build_model(["nuclei-type"], cfg, str(tmp_path / "s1"))
    _write_models(tmp_path / "s2", model, cfg, None,
                  {"steps": 1, "initialisation": origin, "trained_heads": ["nuclei-type"]})
    saved = yaml.safe_load((tmp_path / "s2" / "model" / "model.yaml").read_text())["provenance"]
    assert saved["trained_heads"] == "nuclei-inst, nuclei-type, tissue-class"


# ---- a model with one trained head, end to end through the CLI --------------------------------------------
def _one_head_model(folder: Path, full: bool) -> Path:
    """The tiny network at 4 um/px, random weights with measured BatchNorm statistics (so it finds instances);
    trained_heads: nuclei-inst. ``full``: all six heads configured (five never trained), else nuclei-inst only."""
    torch.manual_seed(0)
    config = ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=4.0)
    if not full:
        config = ModelConfig(tasks=(NUCLEI.with_heads("inst"),), encoder="tiny", head_channels=8, mpp=4.0)
    net = Cerberus(config)
    calibrate(net)
    net.provenance = {"trained_with": "test", "trained_heads": "nuclei-inst"}
    return net.eval().save(folder)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "synth.tif", 2100, 1600, seed=2, field=512,
                                 offset=128, n_fields=3, tile=256, progress=False)


@pytest.fixture(scope="module", params=["six-heads", "nuclei-only"])
def one_head_run(request, synth, tmp_path_factory) -> dict:
    """``cerberus infer-tile`` and ``cerberus infer-wsi`` with a model whose only trained head is nuclei-inst."""
    root = tmp_path_factory.mktemp(request.param)
    model = _one_head_model(root / "model", request.param == "six-heads")
    tiles = root / "tiles"
    tiles.mkdir()
    cv2.imwrite(str(tiles / "a.png"), cv2.cvtColor(synth_tile(384, seed=3).image, cv2.COLOR_RGB2BGR))
    tile = run_cli("infer-tile", "--model", model, "--input", tiles, "--output", root / "tile-out", "--postproc-workers", "0",
                   "--mpp", "0.5", "--device", "cpu", "--precision", "fp32")
    assert tile.returncode == 0, tile.stderr[-3000:]
    wsi = run_cli("infer-wsi", "--model", model, "--input", synth, "--output", root / "wsi-out", *WINDOW,
                  "--chunk-size", "256", "--postproc-workers", "0", "--device", "cpu", "--precision", "fp32")
    assert wsi.returncode == 0, wsi.stderr[-3000:]
    return {"model": model, "tile": root / "tile-out", "wsi": root / "wsi-out", "full": request.param == "six-heads",
            "stderr": tile.stderr + wsi.stderr}


def test_one_head_model_writes_only_nuclei_without_classes(one_head_run):
    run, bad = one_head_run, forbidden(("nuclei-inst",))
    if run["full"]:
        assert "heads never trained (not run, nothing written): gland-inst, gland-type, lumen-inst, nuclei-type, " \
               "tissue-class" in run["stderr"]
    for folder, stem in ((run["tile"], "a"), (run["wsi"], "synth")):
        geo = json.loads((folder / f"{stem}.geojson").read_text())
        assert geo["features"], "the random network finds nuclei"
        assert not strings(geo) & bad and all("classification" not in f["properties"] for f in geo["features"])
        assert {f["properties"]["objectType"] for f in geo["features"]} == {"detection"}
        props = store_properties(folder / f"{stem}.db")
        assert {p["task"] for p in props} == {"nuclei"} and {p["type"] for p in props} == {None}
        assert not strings(props) & bad
        with AnnotationStore(folder / f"{stem}.db", readonly=True) as store:
            assert store.metadata["trusted_heads"] == ["nuclei-inst"]
        hover = json.loads((folder / f"{stem}.json").read_text())
        assert set(hover) == {"mag", "nuc"} and not strings(hover) & bad
        assert {e["type"] for e in hover["nuc"].values()} == {None}
        rows = csv_rows(folder / f"{stem}_summary.csv")
        assert {r["task"] for r in rows} == {"analysed", "nuclei"}
        assert {r["class"] for r in rows} | {r["tissue_class"] for r in rows} <= {"all", "", "unclassified"}
    tile_summary = [r for r in csv_rows(run["tile"] / "a_summary.csv") if r["task"] == "nuclei"]
    assert int(tile_summary[0]["count"]) == len(json.loads((run["tile"] / "a.geojson").read_text())["features"])
    with np.load(run["tile"] / "a.npz") as z:
        assert set(z.files) == {"nuclei_inst", "meta"}
    marker = json.loads((run["tile"] / "done" / "a.json").read_text())
    assert marker["trusted_heads"] == ["nuclei-inst"] and set(marker["counts"]) == {"nuclei"}
    summary = json.loads((run["wsi"] / "synth_summary.json").read_text())
    assert not strings(summary) & bad and set(summary["counts"]) == {"nuclei"}
    assert list(summary["nuclei"]) == ["unclassified"] and list(summary["nuclei_by_tissue"]) == ["unclassified"]
    meta = json.loads((run["wsi"] / "synth_metadata.json").read_text())
    assert meta["trusted_heads"] == ["nuclei-inst"]
    assert not (run["wsi"] / "synth_tissue.png").exists()  # no tissue map without a trained tissue head
    assert (run["wsi"] / "synth_thumbnail.png").is_file()


def test_info_says_which_heads_are_trusted(one_head_run):
    proc = run_cli("info", one_head_run["model"])
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("trusted"))
    assert "nuclei-inst" in line
    nuclei = next(ln for ln in proc.stdout.splitlines() if ln.startswith("task nuclei"))
    assert "neutrophil" not in nuclei and "untyped" in nuclei
    if one_head_run["full"]:
        assert "never trained" in line and "tissue-class" in line and "type (7, never trained)" in nuclei


def test_evaluate_marks_what_was_never_trained(one_head_run, tmp_path):
    from cerberus_histo.metrics.evaluate import evaluate

    truth = tmp_path / "truth"
    truth.mkdir()
    inst = np.zeros((384, 384), np.int32)
    inst[100:110, 100:110], inst[200:212, 50:60] = 1, 2
    np.savez(truth / "a.npz", inst_map=inst, type_map=np.where(inst > 0, 2, 0), class_map=np.ones_like(inst))
    result = evaluate("nuclei", one_head_run["tile"], truth)
    assert "not scored" in result["summary"]["types"] and "mpq_plus" not in result["summary"]
    if one_head_run["full"]:
        with pytest.raises(CerberusError, match="no trained tissue-class head"):
            evaluate("tissue", one_head_run["tile"], truth)


def test_demo_slide_evaluation_does_not_score_untrained_types(one_head_run, synth):
    from cerberus_histo.demo.scores import evaluate_slide, model_heads, untrained

    heads = model_heads(one_head_run["model"])
    assert heads == ("nuclei-inst",)
    config = ModelConfig.from_dict(yaml.safe_load((one_head_run["model"] / "model.yaml").read_text())["model"])
    ev = evaluate_slide(synth, one_head_run["wsi"] / "synth.db", config, None, 16, heads)
    assert ev["nuclei_detection_f1"] is not None and ev["nuclei_type_accuracy"] is None
    assert ev["nuclei_type_f1"] is None
    if one_head_run["full"]:
        assert untrained(config, "tissue", heads) == ["tissue-class"]


# ---- item 2: a finished slide's result keeps its timings ----------------------------------------------------
def test_a_finished_slide_returns_the_timings_recorded_when_it_ran(one_head_run, synth, tmp_path):
    model = Cerberus.load(one_head_run["model"])
    options = dict(input_shape=192, output_shape=128, chunk_size=256, postproc_workers=0, device="cpu",
                   precision="fp32", progress=False)
    first = model.predict_wsi(synth, tmp_path, **options)
    assert not first.skipped and tuple(first.timings) == TIMING_KEYS
    again = model.predict_wsi(synth, tmp_path, **options)  # the docs/wsi.md snippet, run a second time
    assert again.skipped and tuple(again.timings) == TIMING_KEYS
    assert again.timings["device_utilisation"] == pytest.approx(first.timings["device_utilisation"], abs=1e-4)
    assert again.timings["total"] == pytest.approx(first.timings["total"], abs=1e-4)
    marker = first.paths["marker"]
    done = json.loads(marker.read_text())
    del done["timings_s"]  # a marker without them: read back from the metadata file
    marker.write_text(json.dumps(done))
    assert model.predict_wsi(synth, tmp_path, **options).timings == again.timings
    first.paths["metadata"].unlink()  # recorded nowhere: the same keys, marked unknown
    lost = model.predict_wsi(synth, tmp_path, **options).timings
    assert tuple(lost) == TIMING_KEYS and all(np.isnan(v) for v in lost.values())
