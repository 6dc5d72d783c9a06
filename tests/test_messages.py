"""Messages and streams (issue 19, item 4): progress bars on a terminal's stderr only, logs on stderr and results
on stdout, strict JSON files, truthful step counts after a resume, fp16 on a CPU, aligned ``info`` lines and
one-line errors for hardware that is not there."""

from __future__ import annotations

import io
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_clean_error, run_cli

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.patches import extract_patches
from cerberus_histo.data.synthetic import write_tiles
from cerberus_histo.train.config import TrainConfig
from cerberus_histo.train.datamodule import Source
from cerberus_histo.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SMALL = {"batch_size": 2, "class_batch_size": 4, "val_every": 2, "val_max_samples": 4,
         "model": {"encoder": "tiny", "patch_shape": 64, "class_patch_shape": 48}}
BAR_MARKS = ("\r", "%|", "it/s]", "Epoch 0")  # what a tqdm or Lightning bar leaves in a stream
NOISE = ("Tip:", "litlogger", "litmodels", "LeafSpec", "Traceback")


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _strict_json(path: Path):
    """The JSON of ``path`` read as strict parsers read it: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("messages")
    spec = write_tiles(root / "nuclei", 6, 96, seed=2, tasks=("nuclei",), name="synth-nuclei", progress=False)
    extract_patches(spec.root, root / "patches", 96, 48, "mirror", progress=False)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(SMALL))
    model_dir = root / "model"
    torch.manual_seed(0)
    Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8)).save(model_dir)
    return {"nuclei": root / "patches" / "synth-nuclei", "params": params, "tiles": spec.root / "images",
            "model": model_dir}


# ---- 1. progress bars: on stderr, and only on a terminal ----------------------------------------------------------

def test_progress_bar_shows_on_a_terminal_stderr_only(monkeypatch, capsys):
    from cerberus_histo.progress import progress_bar, show_progress

    for stream, shown in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert show_progress() is shown and show_progress(False) is False
        for _ in progress_bar(range(3), desc="work"):
            pass
        assert ("work" in stream.getvalue()) is shown, stream.getvalue()
    assert capsys.readouterr().out == ""


def test_infer_tile_bar_stays_out_of_a_redirected_stderr(data, tmp_path):
    proc = run_cli("infer-tile", "--model", data["model"], "--input", data["tiles"], "--output", tmp_path / "out",
                   "--formats", "npz", "--device", "cpu", "--precision", "fp32", "--postproc-workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mark in BAR_MARKS:
        assert mark not in proc.stderr and mark not in proc.stdout, (mark, proc.stderr)


def test_training_bars_go_to_a_terminal_stderr(data, tmp_path, monkeypatch, capsys):
    """Lightning writes its bars to stdout: ours go to stderr, where a terminal shows them."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = TrainConfig.from_yaml(data["params"]).replace(max_steps=2)
    train([Source(data["nuclei"], ("nuclei-inst",))], tmp_path / "run", cfg)  # progress left at its default
    assert "Epoch 0" in terminal.getvalue()
    out = capsys.readouterr().out
    assert "Epoch" not in out and "%|" not in out, out


# ---- 2. logs on stderr, results on stdout; 4. the steps of a resumed run -----------------------------------------

def test_train_stdout_holds_the_results_only_and_a_resume_counts_its_own_steps(data, tmp_path):
    run = tmp_path / "run"
    args = ("train", "--nuclei-dir", data["nuclei"], "--config", data["params"], "--log-dir", run)
    proc = run_cli(*args, "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("trained 2 steps in ") and lines[1] == f"model: {run / 'model'}", \
        proc.stdout
    for word in BAR_MARKS + NOISE:
        assert word not in proc.stderr, (word, proc.stderr)
    proc = run_cli(*args, "--max-steps", "3", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("trained 1 step (3 in all, resumed from step 2) in "), proc.stdout
    summary = _strict_json(run / "summary.json")
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 2


def test_real_warnings_still_show(data, tmp_path):
    """Lightning's noise is silenced, our own warnings are not."""
    one = write_tiles(tmp_path / "one", 2, 96, seed=9, num_splits=1, tasks=("lumen",), name="one", progress=False)
    extract_patches(one.root, tmp_path / "p", 96, 48, "mirror", progress=False)
    proc = run_cli("train", "--nuclei-dir", data["nuclei"], "--lumen-dir", tmp_path / "p" / "one", "--fold", "3",
                   "--config", data["params"], "--max-steps", "1", "--log-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: " in proc.stderr and "has no split 3" in proc.stderr, proc.stderr
    assert "has no split" not in proc.stdout


# ---- 3. strict JSON ------------------------------------------------------------------------------------------------

def test_json_helper_writes_strict_json(tmp_path):
    from cerberus_histo.io.files import json_text, write_json

    value = {"nan": float("nan"), "inf": [np.float32(np.inf), -float("inf")], "n": np.int64(3),
             "x": np.float64(0.5), "arr": np.array([1.0, np.nan]), "t": (1, Path("a/b")), "ok": 1.5}
    write_json(tmp_path / "v.json", value)
    assert _strict_json(tmp_path / "v.json") == {"nan": None, "inf": [None, None], "n": 3, "x": 0.5,
                                                  "arr": [1.0, None], "t": [1, "a/b"], "ok": 1.5}
    assert json_text({"a": 1.0}) == json.dumps({"a": 1.0})


def test_training_summary_is_strict_json(data, tmp_path, monkeypatch):
    from cerberus_histo.train import validation

    plain = validation.ValidationStats.summary
    monkeypatch.setattr(validation.ValidationStats, "summary",
                        lambda self: {**plain(self), "nuclei-inst/extra": float("nan")})
    cfg = TrainConfig.from_yaml(data["params"]).replace(max_steps=1)
    train([Source(data["nuclei"], ("nuclei-inst",))], tmp_path / "run", cfg, progress=False)
    assert _strict_json(tmp_path / "run" / "summary.json")["validation"]["nuclei-inst/extra"] is None


def test_evaluation_json_is_strict(tmp_path):
    from cerberus_histo.metrics.evaluate import write_json

    write_json({"task": "nuclei", "summary": {"pq": float("nan"), "f1": np.float32(np.inf)}}, tmp_path / "e.json")
    assert _strict_json(tmp_path / "e.json")["summary"] == {"pq": None, "f1": None}


def test_no_json_is_written_without_the_strict_helper():
    """Every JSON the package writes goes through io.files.json_text / write_json (allow_nan=False)."""
    src = Path(__file__).resolve().parents[1] / "src" / "cerberus_histo"
    offenders = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py") if p.name != "files.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\bjson\.dumps?\(", line) and "json.loads(json.dumps(" not in line]
    assert not offenders, offenders


# ---- 5. fp16 on a CPU ----------------------------------------------------------------------------------------------

def test_fp16_on_a_cpu_becomes_bf16_or_fp32_with_a_warning(monkeypatch):
    from cerberus_histo.infer import runtime as rt

    tiny = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8))
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda native=native: native)
        with pytest.warns(UserWarning, match=f"fp16 .*CPU.*{expected}"):
            r = rt.plan_runtime(tiny, (128, 128), device="cpu", precision="fp16")
        assert r.precision == expected and "fp16" in r.why["precision"]
        assert f"precision {expected} (" in r.line() and "fp16" in r.line()


def test_infer_tile_fp16_on_cpu_says_so(data, tmp_path):
    proc = run_cli("infer-tile", "--model", data["model"], "--input", data["tiles"], "--output", tmp_path / "out",
                   "--formats", "npz", "--device", "cpu", "--precision", "fp16", "--postproc-workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ") and "fp16" in line]
    assert len(warned) == 1, proc.stderr
    settings = [line for line in proc.stderr.splitlines() if line.startswith("device cpu")]
    assert len(settings) == 1 and re.search(r"precision (bf16|fp32) \(fp16 asked", settings[0]), proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="16-mixed runs as asked on a GPU")
def test_training_16_mixed_on_a_cpu_warns_and_uses_bf16_or_fp32(data, tmp_path):
    cfg = TrainConfig.from_yaml(data["params"]).replace(max_steps=1, precision="16-mixed")
    with pytest.warns(UserWarning, match="16-mixed"):
        train([Source(data["nuclei"], ("nuclei-inst",))], tmp_path / "run", cfg, accelerator="cpu", progress=False)
    used = TrainConfig.from_yaml(tmp_path / "run" / "train.yaml").precision
    assert used in ("bf16-mixed", "32")


# ---- 6. info: key and value apart, aligned --------------------------------------------------------------------------

def test_info_lines_are_key_space_value_aligned(tmp_path):
    model = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8))
    model.provenance = {"initialisation": "random initialisation", "trained_heads": "gland-inst, nuclei-inst",
                        "a_rather_long_provenance_key": 7, "steps": 3}
    model.save(tmp_path / "m")
    proc = run_cli("info", tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    columns = set()
    for line in lines:
        m = re.match(r"^(\S.*?\S) {2,}(\S.*)$", line)
        assert m, line
        columns.add(m.start(2))
    assert len(columns) == 1, proc.stdout
    for key, value in model.provenance.items():
        assert any(re.match(rf"^{key} +{re.escape(str(value))}$", line) for line in lines), (key, proc.stdout)


# ---- 7. hardware that is not there --------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_on_a_missing_gpu_is_one_line(data, tmp_path):
    assert_clean_error(run_cli("train", "--nuclei-dir", data["nuclei"], "--accelerator", "gpu", "--log-dir",
                               tmp_path / "r"), "no GPU", "--accelerator cpu")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_train_on_missing_mps_is_an_error():
    from cerberus_histo.errors import CerberusError
    from cerberus_histo.train.run import check_hardware

    with pytest.raises(CerberusError, match="--accelerator mps: .* use --accelerator cpu or auto"):
        check_hardware(TrainConfig(**SMALL), "mps", "auto")


def test_train_bad_devices_is_one_line(data, tmp_path):
    """``--devices`` that is not a positive integer or auto: the CLI's one line (the API raises the same)."""
    from cerberus_histo.errors import CerberusError
    from cerberus_histo.train.run import check_hardware

    for devices in (0, -1, "abc", "0,1"):
        with pytest.raises(CerberusError, match="--devices must be a positive integer or auto"):
            check_hardware(TrainConfig(**SMALL), "cpu", devices)
    assert_clean_error(run_cli("train", "--nuclei-dir", data["nuclei"], "--devices", "0", "--log-dir",
                               tmp_path / "r"), "--devices")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_more_cpu_processes_than_cores_are_announced(monkeypatch):
    from cerberus_histo.train import run

    for key in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(run, "cpu_cores", lambda: 2)
    cfg = TrainConfig(**SMALL)
    with pytest.warns(UserWarning, match="no GPU.*4 CPU processes.*2 cores.*--devices 2 or fewer"):
        assert run.check_hardware(cfg, "auto", 4) == cfg
    with pytest.warns(UserWarning, match="4 CPU processes.*2 cores"):
        run.check_hardware(cfg, "cpu", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.check_hardware(cfg, "cpu", 2) == cfg  # asked for, and the cores are there: nothing to say
    monkeypatch.setenv("LOCAL_RANK", "1")  # the processes DDP starts again do not repeat it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.check_hardware(cfg, "auto", 4)
