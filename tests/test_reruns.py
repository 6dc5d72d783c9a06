"""Re-runs respect what changed: tile and slide results made with other settings are redone, a training run folder
is never silently replaced, two patch sets never mix, and a run that fails before any result leaves no folder
behind."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import assert_clean_error, run_cli, slide_model

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.patches import extract_patches
from cerberus_histo.data.synthetic import synth_tile, write_tiles
from cerberus_histo.errors import CerberusError
from cerberus_histo.infer.options import RunOptions
from cerberus_histo.infer.tiles import infer_tiles
from cerberus_histo.infer.wsi import SlideJob, make_predictor, predict_slide, weights_id
from cerberus_histo.models.checkpoint import load_model
from cerberus_histo.outputs.store import AnnotationStore
from cerberus_histo.train.config import TrainConfig
from cerberus_histo.train.datamodule import Source
from cerberus_histo.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SMALL = {"batch_size": 2, "val_every": 3, "val_max_samples": 4, "max_steps": 2,
         "model": {"encoder": "tiny", "patch_shape": 48}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Two tiny six-head networks with different random weights."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        out[name] = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8)).eval().save(root / name)
    return out


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiles")
    for i in range(2):
        cv2.imwrite(str(src / f"t{i}.png"), cv2.cvtColor(synth_tile(64, seed=i).image, cv2.COLOR_RGB2BGR))
    return src


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """A nuclei dataset folder (three 96-px tiles): training extracts its patches into the run folder."""
    return write_tiles(tmp_path_factory.mktemp("data") / "n", 3, 96, seed=4, tasks=("nuclei",), name="n",
                       progress=False).root


def _said(proc) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if "other settings" in ln]


# ---- 1. tile results made with other settings are redone ---------------------------------------------------
def test_cli_tile_rerun_with_another_model_or_mpp_redoes_the_images(models, tiles, tmp_path):
    out = tmp_path / "out"
    args = ("infer-tile", "--input", tiles, "--output", out, "--postproc-workers", "0", "--formats", "npz,geojson")
    first = run_cli(*args, "--model", models["a"])
    assert first.returncode == 0, first.stderr
    settings = json.loads((out / "done" / "t0.json").read_text())["settings"]
    # the weights hash is the one whole slides key their partial store with
    assert settings["model_id"] == weights_id(load_model(models["a"])) and settings["mpp"] == 0.5
    same = run_cli(*args, "--model", models["a"])
    assert same.returncode == 0 and "0 images done, 2 already done" in same.stdout and not _said(same)
    other = run_cli(*args, "--model", models["b"], "--mpp", "0.4")
    assert other.returncode == 0, other.stderr
    assert _said(other) == ["t0.png, t1.png: made with other settings (model, mpp); redone"]
    assert "2 images done, 0 already done" in other.stdout
    now = json.loads((out / "done" / "t0.json").read_text())["settings"]
    assert now["model_id"] == weights_id(load_model(models["b"])) and now["mpp"] == 0.4
    with np.load(out / "t0.npz") as z:  # 64 px at 0.4 um/px: 51 px at the model's 0.5
        assert z["nuclei_inst"].shape == (51, 51)


@pytest.mark.parametrize("change, named", [
    ({"centroids_only": True}, "centroids-only"),
    ({"tta": True}, "tta"),
    ({"input_shape": 448, "output_shape": 144}, "window"),
    ({"precision": "bf16"}, "precision"),
    ({"mpp": 0.5}, None),  # the model's own mpp, as assumed without --mpp: the same result
    ({"batch_size": 2, "threads": 1, "device": "cpu"}, None),  # machine settings do not change the result
])
def test_each_setting_that_changes_a_result_redoes_it(models, tiles, tmp_path, change, named):
    base = {"postproc_workers": 0, "formats": ("geojson",), "progress": False, "precision": "fp32"}
    infer_tiles(models["a"], tiles / "t0.png", tmp_path, **base)
    said = []
    s = infer_tiles(models["a"], tiles / "t0.png", tmp_path, echo=said.append, **(base | change))
    assert [m for m in said if "other settings" in m] == \
        ([f"t0.png: made with other settings ({named}); redone"] if named else [])
    assert (s.done, s.skipped) == ((["t0.png"], []) if named else ([], ["t0.png"]))
    again = infer_tiles(models["a"], tiles / "t0.png", tmp_path, echo=said.append, **(base | change))
    assert again.skipped == ["t0.png"]


def test_redone_image_keeps_no_file_of_the_other_settings(models, tiles, tmp_path):
    run = {"postproc_workers": 0, "progress": False}
    infer_tiles(models["a"], tiles / "t0.png", tmp_path, formats=("npz", "geojson"), **run)
    assert (tmp_path / "t0.npz").is_file()
    infer_tiles(models["b"], tiles / "t0.png", tmp_path, formats=("geojson",), **run)
    assert not (tmp_path / "t0.npz").exists(), "the other model's label maps would pass for this run's"
    assert json.loads((tmp_path / "done" / "t0.json").read_text())["files"] == {"geojson": "t0.geojson"}


def test_marker_without_settings_is_redone(models, tiles, tmp_path):
    """A marker of an earlier version records no settings: the image is done again."""
    run = {"postproc_workers": 0, "progress": False, "formats": ("geojson",)}
    infer_tiles(models["a"], tiles / "t0.png", tmp_path, **run)
    path = tmp_path / "done" / "t0.json"
    marker = json.loads(path.read_text())
    del marker["settings"]
    path.write_text(json.dumps(marker))
    said = []
    s = infer_tiles(models["a"], tiles / "t0.png", tmp_path, echo=said.append, **run)
    assert s.done == ["t0.png"] and "t0.png: made with other settings (not recorded); redone" in said


# ---- 1b. a finished slide made with other settings is redone (issue 19) --------------------------------------
WINDOW = ("--input-shape", "192", "--output-shape", "128")
SLIDE_RUN = dict(input_shape=192, output_shape=128, chunk_size=256, postproc_workers=0, progress=False)




@pytest.fixture(scope="module")
def slide_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slide-models")
    return {"a": slide_model(root / "a", 0), "b": slide_model(root / "b", 1),
            "a-nuclei": slide_model(root / "a-nuclei", 0, "nuclei-inst")}  # a's weights, one trusted head


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from cerberus_histo.data.slide import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "s.tif", 1400, 1100, seed=10, field=256,
                                 offset=128, n_fields=2, tile=256, progress=False)


def _marker(out, stem="s") -> dict:
    return json.loads((out / "done" / f"{stem}.json").read_text())


def test_cli_slide_rerun_with_another_model_redoes_it(slide_models, slide, tmp_path):
    out = tmp_path / "out"
    args = ("infer-wsi", "--input", slide, "--output", out, *WINDOW, "--chunk-size", "256", "--postproc-workers", "0")
    first = run_cli(*args, "--model", slide_models["a"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert _marker(out)["settings"]["model_id"] == weights_id(load_model(slide_models["a"]))
    same = run_cli(*args, "--model", slide_models["a"])
    assert same.returncode == 0 and "0 slides done, 1 already done" in same.stdout and not _said(same)
    other = run_cli(*args, "--model", slide_models["b"])
    assert other.returncode == 0, other.stderr[-3000:]
    assert _said(other) == ["s.tif: made with other settings (model); redone"]
    assert "1 slides done, 0 already done" in other.stdout
    assert _marker(out)["settings"]["model_id"] == weights_id(load_model(slide_models["b"]))
    with AnnotationStore(out / "s.db", readonly=True) as store:
        assert store.metadata["cerberus_run"]["model_id"] == weights_id(load_model(slide_models["b"]))
    assert not (out / "s.db.partial").exists()
    again = run_cli(*args, "--model", slide_models["b"])
    assert again.returncode == 0 and "1 already done" in again.stdout and not _said(again)


def test_cli_slide_rerun_with_centroids_only_redoes_it(slide_models, slide, tmp_path):
    out = tmp_path / "out"
    args = ("infer-wsi", "--model", slide_models["a"], "--input", slide, "--output", out, *WINDOW, "--chunk-size",
            "256", "--postproc-workers", "0")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]

    def nucleus_shapes() -> set[str]:
        features = json.loads((out / "s.geojson").read_text())["features"]
        return {f["geometry"]["type"] for f in features if f["properties"]["objectType"] == "detection"}

    assert nucleus_shapes() == {"Polygon"}, "the random network finds nuclei"
    points = run_cli(*args, "--centroids-only")
    assert points.returncode == 0, points.stderr[-3000:]
    assert _said(points) == ["s.tif: made with other settings (centroids-only); redone"]
    assert "1 slides done, 0 already done" in points.stdout
    assert nucleus_shapes() == {"Point"} and _marker(out)["settings"]["centroids_only"] is True
    same = run_cli(*args, "--centroids-only")
    assert same.returncode == 0 and "1 already done" in same.stdout and not _said(same)


@pytest.mark.parametrize("change, named", [
    ({"margin_um": 128.0}, "margin-um"),
    ({"tta": True}, "tta"),
    ({"input_shape": 256, "output_shape": 128}, "window"),
    ({"mpp": 0.4}, "mpp"),
    ({"precision": "bf16"}, "precision"),
    ({"chunk_size": 128, "batch_size": 2, "device": "cpu"}, None),  # chunking and the machine: the same result
])
def test_each_setting_that_changes_a_slide_redoes_it(slide_models, slide, tmp_path, change, named):
    from cerberus_histo.infer.cohort import infer_wsi

    base = SLIDE_RUN | {"precision": "fp32"}
    infer_wsi(slide_models["a"], slide, tmp_path, **base)
    said: list[str] = []
    s = infer_wsi(slide_models["a"], slide, tmp_path, echo=said.append, **(base | change))
    assert [m for m in said if "other settings" in m] == \
        ([f"s.tif: made with other settings ({named}); redone"] if named else [])
    assert s.rows[0].status == ("done" if named else "skipped")
    again = infer_wsi(slide_models["a"], slide, tmp_path, **(base | change))
    assert again.rows[0].status == "skipped"


def test_slide_mask_and_trusted_heads_are_settings(slide_models, slide, tmp_path):
    from cerberus_histo.infer.cohort import infer_wsi

    mask = tmp_path / "m.png"
    left = np.zeros((110, 140), np.uint8)
    left[:, :70] = 255
    cv2.imwrite(str(mask), left)
    out = tmp_path / "out"
    infer_wsi(slide_models["a"], slide, out, **SLIDE_RUN)
    assert (out / "s_tissue.png").is_file()
    said: list[str] = []
    runs = [infer_wsi(slide_models["a"], slide, out, mask=mask, echo=said.append, **SLIDE_RUN),
            infer_wsi(slide_models["a"], slide, out, mask=mask, echo=said.append, **SLIDE_RUN)]
    cv2.imwrite(str(mask), 255 - left)  # the same file, other contents
    runs.append(infer_wsi(slide_models["a"], slide, out, mask=mask, echo=said.append, **SLIDE_RUN))
    assert [r.rows[0].status for r in runs] == ["done", "skipped", "done"]
    assert [m for m in said if "other settings" in m] == ["s.tif: made with other settings (mask); redone"] * 2
    # the same weights with one trusted head: redone, and the tissue map of the six heads is gone
    said.clear()
    s = infer_wsi(slide_models["a-nuclei"], slide, out, mask=mask, echo=said.append, **SLIDE_RUN)
    assert s.rows[0].status == "done" and "s.tif: made with other settings (heads); redone" in said
    assert not (out / "s_tissue.png").exists() and "tissue" not in _marker(out)["files"]


def test_slide_marker_without_settings_is_redone(slide_models, slide, tmp_path):
    """A marker of an earlier version records no settings: the slide is done again (predict_slide and
    Cerberus.predict_wsi compare the settings as the cohort does)."""
    model = Cerberus.load(slide_models["a"])
    first = model.predict_wsi(slide, tmp_path, **SLIDE_RUN)
    assert not first.skipped and model.predict_wsi(slide, tmp_path, **SLIDE_RUN).skipped
    marker = _marker(tmp_path)
    del marker["settings"]
    (tmp_path / "done" / "s.json").write_text(json.dumps(marker))
    said: list[str] = []
    predictor = make_predictor(model, input_shape=192, output_shape=128, postproc_workers=0)
    res = predict_slide(predictor, model.config, SlideJob(slide, model_id=weights_id(model)), tmp_path,
                        RunOptions(chunk_size=256, progress=False, echo=said.append))
    assert not res.skipped and "s.tif: made with other settings (not recorded); redone" in said
    assert "settings" in _marker(tmp_path)
    # predict_wsi compares too: --centroids-only is another result
    assert not model.predict_wsi(slide, tmp_path, centroids_only=True, **SLIDE_RUN).skipped
    assert model.predict_wsi(slide, tmp_path, centroids_only=True, **SLIDE_RUN).skipped


def test_dask_parent_compares_the_settings_too(slide_models, slide, tmp_path):
    out = tmp_path / "out"
    args = ("infer-wsi", "--input", slide, "--output", out, *WINDOW, "--chunk-size", "256", "--postproc-workers", "0",
            "--device", "cpu")
    first = run_cli(*args, "--model", slide_models["a"])
    assert first.returncode == 0, first.stderr[-3000:]
    same = run_cli(*args, "--model", slide_models["a"], "--workers", "1")
    assert same.returncode == 0 and "0 slides done, 1 already done" in same.stdout and not _said(same)
    other = run_cli(*args, "--model", slide_models["b"], "--workers", "1")
    assert other.returncode == 0, other.stderr[-3000:]
    assert _said(other) == ["s.tif: made with other settings (model); redone"]
    assert "1 slides done, 0 already done" in other.stdout
    assert _marker(out)["settings"]["model_id"] == weights_id(load_model(slide_models["b"]))


def test_cluster_parent_leaves_a_precision_it_cannot_know_to_the_workers(slide_models, slide, tmp_path):
    """With --scheduler and --precision auto the workers choose the precision for machines the parent cannot see:
    a slide whose other settings are the same goes to a worker (whose predict_slide compares the precision too);
    one made with another model is said to be redone by the parent."""
    from cerberus_histo.infer.cohort import CohortRun, _predictor, _redo_reasons, _workers_precision, infer_wsi

    infer_wsi(slide_models["a"], slide, tmp_path, **(SLIDE_RUN | {"precision": "fp32"}))
    done, opts = _marker(tmp_path), RunOptions(**SLIDE_RUN)
    for name, expected in (("a", None), ("b", ["model"])):
        built = _predictor(CohortRun(str(slide_models[name]), str(tmp_path), opts), "cpu")
        assert _workers_precision(built[0], opts, 0, "tcp://head:8786") is None
        assert _redo_reasons(done, built, opts, slide, "s", None) == expected
    fp32 = opts.replace(precision="fp32")
    built = _predictor(CohortRun(str(slide_models["a"]), str(tmp_path), fp32), "cpu")
    assert _workers_precision(built[0], fp32, 0, "tcp://head:8786") == "fp32"
    assert _redo_reasons(done, built, fp32, slide, "s", "fp32") == []
    assert _redo_reasons(done, built, fp32, slide, "s", "bf16") == ["precision"]


# ---- 2. a training run folder is not silently replaced -----------------------------------------------------
def test_train_into_an_existing_run_needs_resume_or_overwrite(nuclei, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # a folder holding none of a run's files is fine
    train([Source(nuclei, ("nuclei-inst",))], run, TrainConfig(**SMALL).replace(max_steps=3), fold=0,
          progress=False)
    assert (run / "patches" / "n" / "patches.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    (run / "patches" / "stale.txt").write_text("x")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(SMALL))
    cmd = ("train", "--nuclei-dir", nuclei, "--config", params, "--fold", "0", "--log-dir", run)
    assert_clean_error(run_cli(*cmd), str(run), "--resume", "--overwrite", "new folder")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    proc = run_cli(*cmd, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in names and not [n for n in names if "-v1" in n], names
    steps = [int(r["step"]) for r in _csv_rows(run / "csv" / "metrics.csv") if r.get("step")]
    assert steps and max(steps) <= 2, "metrics of the old run are gone"
    assert not (run / "patches" / "stale.txt").exists() and (run / "patches" / "n" / "patches.json").is_file()
    assert (run / "notes.txt").read_text() == "mine", "only the files a run writes are removed"


def _csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_and_overwrite_exclude_each_other(nuclei, tmp_path):
    with pytest.raises(CerberusError, match="--resume or --overwrite"):
        train([Source(nuclei, ("nuclei-inst",))], tmp_path / "r", TrainConfig(**SMALL), resume="last",
              overwrite=True, progress=False)
    assert not (tmp_path / "r").exists()


def test_empty_log_dir_is_fine_and_log_dir_must_be_a_folder(nuclei, tmp_path):
    (tmp_path / "empty").mkdir()
    assert train([Source(nuclei, ("nuclei-inst",))], tmp_path / "empty", TrainConfig(**SMALL), fold=0,
                 progress=False)["steps"] == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(CerberusError, match="not a folder"):
        train([Source(nuclei, ("nuclei-inst",))], tmp_path / "file", TrainConfig(**SMALL), progress=False)


# ---- 3. two patch sets never mix ---------------------------------------------------------------------------
def test_extracting_other_windows_into_one_folder_is_refused(nuclei, tmp_path):
    out = tmp_path / "p"
    cmd = ("extract-patches", "--config", nuclei, "--out", out, "--step-size", "48", "--mpp", "0.5")
    first = run_cli(*cmd, "--win-size", "96")
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p.parent.name for p in before if p.suffix == ".npz"} == {"96_48"}
    assert_clean_error(run_cli(*cmd, "--win-size", "128"), "win_size 96", "win_size 128", "another --out")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # training on the folder sees one patch set
    cfg = TrainConfig(**SMALL)
    summary = train([Source(out / "n", ("nuclei-inst",))], tmp_path / "run", cfg, fold=0, progress=False)
    assert summary["steps"] == 2
    # a folder that holds two patch sets anyway (copied together by hand) is refused, not mixed
    extract_patches(nuclei, tmp_path / "q", 128, 48, "mirror", progress=False, mpp=0.5)
    for split in (tmp_path / "q" / "n").glob("split_*"):
        shutil.copytree(split / "128_48", out / "n" / split.name / "128_48")
    with pytest.raises(CerberusError, match="96_48.*128_48|128_48.*96_48"):
        train([Source(out / "n", ("nuclei-inst",))], tmp_path / "run2", cfg, fold=0, progress=False)
    assert not (tmp_path / "run2").exists()


# ---- 4. a run that fails before any result leaves nothing ----------------------------------------------------
def test_failed_tile_runs_leave_no_folder(models, tiles, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run_cli("infer-tile", "--model", tmp_path / "missing", "--input", tiles, "--output", out),
                       "model folder not found")
    assert not out.exists()
    unavailable = "mps" if torch.cuda.is_available() else "cuda"
    assert_clean_error(run_cli("infer-tile", "--model", models["a"], "--input", tiles, "--output", out, "--device",
                               unavailable), f"--device {unavailable}")
    assert not out.exists()
    out.mkdir()  # an output folder that existed before stays as it was
    assert_clean_error(run_cli("infer-tile", "--model", tmp_path / "missing", "--input", tiles, "--output", out),
                       "model folder not found")
    assert list(out.iterdir()) == []


def test_failed_slide_runs_leave_no_folder(models, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run_cli("infer-wsi", "--model", tmp_path / "missing", "--input", tmp_path / "s.tif",
                               "--output", out), "model folder not found")
    assert not out.exists()
    proc = run_cli("infer-wsi", "--model", models["a"], "--input", tmp_path / "s.tif", "--output", out)
    assert proc.returncode == 2 and "1 of 1 slides failed" in proc.stderr, proc.stderr
    assert not out.exists()


def test_failed_train_and_extraction_leave_no_folder(nuclei, tmp_path):
    run = tmp_path / "run"
    assert_clean_error(run_cli("train", "--nuclei-dir", nuclei, "--pretrained", tmp_path / "none.pt", "--log-dir",
                               run), "--pretrained")
    assert not run.exists()
    # the first source (a dataset folder) would be extracted into the run folder before the missing second one
    assert_clean_error(run_cli("train", "--nuclei-dir", nuclei, "--pclass-dir", tmp_path / "nowhere", "--log-dir",
                               run), "nowhere")
    assert not run.exists()
    out = tmp_path / "p"
    assert_clean_error(run_cli("extract-patches", "--config", tmp_path / "nowhere", "--out", out), "nowhere")
    assert_clean_error(run_cli("extract-patches", "--config", nuclei, "--out", out, "--win-size", "96",
                               "--step-size", "200"), "--step-size")
    assert not out.exists()
