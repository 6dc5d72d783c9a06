"""A full disk or a file-size limit (issue 17): every command stops with one line naming the file it could not write
and what to do, leaves no file that looks finished, and the same command run again with room resumes to the result of
an uninterrupted run.

The limit is ``RLIMIT_FSIZE`` set in a real ``cerberus`` process (Python ignores ``SIGXFSZ``, so a write past it is an
``OSError`` ``EFBIG``), chosen so that one big output crosses it while the process still starts; one case fills a
small tmpfs (``ENOSPC``) where this machine may mount one.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import calibrate, run_cli

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.dataset import load_dataset
from cerberus_histo.data.patches import load_patch
from cerberus_histo.data.synthetic import synth_tile, write_tiles
from cerberus_histo.errors import CerberusError
from cerberus_histo.io.files import NoSpaceError, no_space_error
from cerberus_histo.models.checkpoint import load_model
from cerberus_histo.train.datamodule import Source, resolve_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest

PAGE = 4096  # SQLite's page: the slide store grows by whole pages


def run_limited(limit: int, *args) -> subprocess.CompletedProcess:
    """``cerberus ARGS`` in a process that may write no file past ``limit`` bytes."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "cerberus_histo", *map(str, args)], capture_output=True, text=True,
                          timeout=600, preexec_fn=cap)


def assert_stopped_full(proc: subprocess.CompletedProcess, folder: Path, *words: str) -> Path:
    """Exit 2, no traceback, and the run's last line is the one error line, naming a file inside ``folder`` and
    saying to free space (and ``words``; the lines before it are the run's log); no temporary file left anywhere in
    ``folder``. Returns the file named."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("error: ")] == lines[-1:], proc.stderr
    for word in ("no space left", "free space", *words):
        assert word.lower() in lines[-1].lower(), (word, lines[-1])
    named = Path(re.match(r"error: cannot write (\S+): ", lines[-1]).group(1))
    assert named.resolve().is_relative_to(folder.resolve()), (named, folder)
    assert not [p for p in folder.rglob(".*.tmp*")], "a failed write leaves no temporary file"
    return named


def outputs(folder: Path, *suffixes: str) -> dict[str, bytes]:
    """Name -> bytes of the files directly in ``folder`` with one of ``suffixes``."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(suffixes)}


def store_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        return con.execute("SELECT * FROM annotations ORDER BY id").fetchall()


# ---- the helper -------------------------------------------------------------------------------------------------

def test_no_space_errors_are_recognised_and_named():
    full = no_space_error(OSError(28, "No space left on device"), "out/s.geojson")
    assert isinstance(full, NoSpaceError) and str(full).startswith("cannot write out/s.geojson: no space left")
    assert "run the same command again" in str(full)
    big = OSError(27, "File too large", "out/a.npz")
    assert str(no_space_error(big)).startswith("cannot write out/a.npz: ")
    assert no_space_error(OSError(13, "Permission denied", "out/a.npz")) is None
    assert no_space_error(ValueError("bad value")) is None
    try:  # raised while handling another: the chain is read
        try:
            raise big
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as torch_save:
        assert str(no_space_error(torch_save, "ck.pt")).startswith("cannot write ck.pt: ")


def test_the_cli_makes_a_full_disk_no_writer_named_one_line(monkeypatch, tmp_path):
    """The last resort: an ``OSError`` ``EFBIG`` that reaches the command line is one line, exit 2, and any other
    error still shows as it was."""
    from click.testing import CliRunner

    import cerberus_histo.data.patches as patches
    from cerberus_histo.cli import main

    def full(*args, **kwargs):
        raise OSError(27, "File too large", "out/x.npz")

    monkeypatch.setattr(patches, "extract_patches", full)
    args = ["extract-patches", "--config", str(tmp_path), "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.output.startswith("error: cannot write out/x.npz: no space left"), res.output
    monkeypatch.setattr(patches, "extract_patches", lambda *a, **k: 1 / 0)
    assert isinstance(CliRunner().invoke(main, args).exception, ZeroDivisionError)


def test_a_full_disk_in_training_says_how_to_go_on(tmp_path):
    """With a checkpoint saved, the run goes on with --resume; without one, it starts again with --overwrite."""
    from cerberus_histo.train.run import LAST, _no_space_stops

    for saved, hint in ((False, "with --overwrite: no checkpoint was saved yet"), (True, "with --resume")):
        if saved:
            (tmp_path / LAST).parent.mkdir(parents=True)
            (tmp_path / LAST).write_bytes(b"ckpt")
        with pytest.raises(NoSpaceError, match=f"cannot write {tmp_path}: .*free space, then run the same command "
                                               f"{hint}"), _no_space_stops(tmp_path):
            raise OSError(28, "No space left on device")  # a log's write: no file named, the run folder is
    with pytest.raises(ValueError), _no_space_stops(tmp_path):  # any other error passes as it is
        raise ValueError("not a full disk")


# ---- infer-wsi: the slide store crosses the limit; the re-run resumes from the committed chunks ------------------

WSI = ("--input-shape", "192", "--output-shape", "128", "--chunk-size", "128", "--postproc-workers", "0")


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory) -> dict:
    """A small synthetic slide, a tiny calibrated network at 2 um/px (four chunks with tissue, some holding
    nuclei), and an uninterrupted run of it (``ref``)."""
    from cerberus_histo.data.slide import write_synthetic_slide

    root = tmp_path_factory.mktemp("wsi")
    torch.manual_seed(0)
    net = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=2.0))
    calibrate(net)
    model = net.eval().save(root / "model")
    slide = write_synthetic_slide(root / "s.tif", 1400, 1100, seed=10, field=256, offset=128, n_fields=2, tile=256,
                                  progress=False)
    args = ("infer-wsi", "--model", model, "--input", slide, *WSI)
    ref = run_cli(*args, "--output", root / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    return {"args": args, "ref": root / "ref"}


def test_infer_wsi_stops_on_a_full_disk_and_resumes(slide_run, tmp_path):
    ref, out, args = slide_run["ref"], tmp_path / "out", slide_run["args"]
    limit = (ref / "s.db").stat().st_size - 3 * PAGE  # the store's schema and first chunks fit, its last do not
    proc = run_limited(limit, *args, "--output", out)
    assert assert_stopped_full(proc, out, "run the same command again") == out / "s.db.partial"
    assert "failed" not in proc.stdout  # the run stopped: no table of failed slides
    assert not (out / "done" / "s.json").exists() and not (out / "s.db").exists()
    assert not (out / "s.geojson").exists() and not (out / "s_thumbnail.png").exists()
    with sqlite3.connect(out / "s.db.partial") as con:
        committed = con.execute("SELECT COUNT(*) FROM cerberus_chunks").fetchone()[0]
    tissue_chunks = json.loads((ref / "s_metadata.json").read_text())["chunks"]["with_tissue"]
    assert 0 < committed < tissue_chunks, "the limit falls between chunks: the re-run has some to resume from"

    again = run_cli(*args, "--output", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "s_metadata.json").read_text())["chunks"]["done_before"] == committed  # resumed
    assert store_rows(out / "s.db") == store_rows(ref / "s.db") and store_rows(ref / "s.db")
    same = (".geojson", ".json", ".csv", ".png")
    done = {k: v for k, v in outputs(out, *same).items() if k not in ("s_metadata.json", "s_summary.json")}
    assert done == {k: v for k, v in outputs(ref, *same).items() if k in done} and len(done) == 6
    assert not (out / "s.db.partial").exists()


# ---- infer-tile: the second image's outputs cross the limit; the run stops and the re-run does the rest ---------

@pytest.fixture(scope="module")
def tile_run(tmp_path_factory) -> dict:
    """A small and a large tile (whose overlay crosses the limit), a tiny network, and an uninterrupted run."""
    root = tmp_path_factory.mktemp("tiles")
    (root / "in").mkdir()
    for name, size, seed in (("t0", 96, 0), ("t1", 320, 1)):
        cv2.imwrite(str(root / "in" / f"{name}.png"), cv2.cvtColor(synth_tile(size, seed=seed).image, cv2.COLOR_RGB2BGR))
    torch.manual_seed(0)
    model = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8)).eval().save(root / "model")
    args = ("infer-tile", "--model", model, "--input", root / "in", "--device", "cpu", "--precision", "fp32",
            "--postproc-workers", "0")
    ref = run_cli(*args, "--output", root / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    return {"args": args, "ref": root / "ref"}


def test_infer_tile_stops_on_a_full_disk_and_resumes(tile_run, tmp_path):
    ref, out, args = tile_run["ref"], tmp_path / "out", tile_run["args"]
    small = max(p.stat().st_size for p in ref.rglob("t0*"))
    large = (ref / "t1_overlay.png").stat().st_size
    assert small < large // 2
    proc = run_limited((small + large) // 2, *args, "--output", out)
    named = assert_stopped_full(proc, out, "run the same command again")
    assert named.name.startswith("t1"), named
    assert "failed" not in proc.stderr  # not one failed image among others: the run stopped
    assert (out / "done" / "t0.json").is_file() and not (out / "done" / "t1.json").exists()
    again = run_cli(*args, "--output", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 images done, 1 already done, 0 failed" in again.stdout
    files = (".geojson", ".json", ".npz", ".png", ".csv")
    assert outputs(out, *files) == outputs(ref, *files) and len(outputs(ref, *files)) == 10
    for stem in ("t0", "t1"):
        assert store_rows(out / f"{stem}.db") == store_rows(ref / f"{stem}.db")


# ---- train: the first checkpoint crosses the limit; none is left truncated, and the run can start again ---------

def test_train_stops_on_a_full_disk_and_runs_again(tmp_path):
    import yaml

    from cerberus_histo.data.patches import extract_patches

    spec = write_tiles(tmp_path / "nuclei", 3, 96, seed=2, tasks=("nuclei",), name="n", progress=False)
    extract_patches(spec.root, tmp_path / "patches", 96, 48, "mirror", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"batch_size": 2, "val_every": 2, "val_max_samples": 2, "model": {
        "encoder": "tiny", "patch_shape": 64, "class_patch_shape": 48}}))
    run = tmp_path / "run"
    args = ("train", "--nuclei-dir", tmp_path / "patches" / "n", "--config", params, "--log-dir", run,
            "--max-steps", "1")
    proc = run_limited(200_000, *args)  # a checkpoint (~340 kB) crosses it, the logs and train.yaml do not
    named = assert_stopped_full(proc, run, "--overwrite", "no checkpoint was saved")
    assert named.suffix == ".ckpt" and named.parent == run / "checkpoints", named
    assert not list(run.rglob("*.ckpt")) and not (run / "model").exists()  # nothing truncated under a final name
    again = run_cli(*args, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert str(load_model(run / "model").provenance["steps"]) == "1"


# ---- import-dataset and extract-patches: a large image crosses the limit ------------------------------------------

def _crag(root: Path) -> Path:
    """A CRAG source: two smooth 48-px images (small files) and one 96-px noise image (a large one)."""
    rng = np.random.default_rng(0)
    for part, stem, noisy in (("train", "a", False), ("train", "b", True), ("valid", "c", False)):
        shape = (96, 96) if noisy else (48, 48)
        image = rng.integers(0, 256, (*shape, 3)) if noisy else np.full((*shape, 3), {"a": 200, "c": 120}[stem])
        inst = np.zeros(shape, np.uint8)
        inst[4:20, 6:30] = 1
        for folder, array in (("Images", image.astype(np.uint8)), ("Annotation", inst)):
            (root / part / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / part / folder / f"{stem}.png"), array)
    return root


@pytest.fixture(scope="module")
def crag(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("crag")
    src = _crag(root / "src")
    ref = run_cli("import-dataset", "crag", src, root / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    return {"src": src, "ref": root / "ref"}


def _dataset_arrays(folder: Path) -> dict[str, np.ndarray]:
    spec = load_dataset(folder)
    out = {}
    for name in spec.names():
        out[f"{name}/image"] = spec.read_image(name)
        out[f"{name}/inst"] = spec.read_annotation(name, "gland").inst_map
    return out


def test_import_dataset_stops_on_a_full_disk_and_runs_again(crag, tmp_path):
    dst = tmp_path / "dst"
    proc = run_limited(12_000, "import-dataset", "crag", crag["src"], dst)  # the noise image's PNG (27 kB) crosses
    named = assert_stopped_full(proc, dst, "run the same command again")
    assert named.name == "train_b.png", named
    assert not (dst / "dataset.yaml").exists()  # the dataset is not complete: nothing reads it as one
    again = run_cli("import-dataset", "crag", crag["src"], dst)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (dst / "dataset.yaml").read_bytes() == (crag["ref"] / "dataset.yaml").read_bytes()
    got, want = _dataset_arrays(dst), _dataset_arrays(crag["ref"])
    assert got.keys() == want.keys() and len(want) == 6
    assert all(np.array_equal(got[k], want[k]) for k in want)


EXTRACT = ("--win-size", "64", "--step-size", "64", "--mode", "valid", "--mpp", "0.5")


def _patches(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {str(p.relative_to(folder)): load_patch(p) for p in sorted(folder.rglob("*.npz"))}


def _assert_same_patches(got: Path, want: Path) -> None:
    a, b = _patches(got), _patches(want)
    assert a.keys() == b.keys() and a
    for k in b:
        assert a[k].keys() == b[k].keys() and all(np.array_equal(a[k][n], b[k][n]) for n in b[k]), k
    assert json.loads((got / "patches.json").read_text()) == json.loads((want / "patches.json").read_text())


@pytest.fixture(scope="module")
def extracted(crag, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patches") / "ref"
    proc = run_cli("extract-patches", "--config", crag["ref"], "--out", out, *EXTRACT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "crag" / "patches.json").read_text())["complete"] is True
    return out / "crag"


def test_extract_patches_stops_on_a_full_disk_and_resumes(crag, extracted, tmp_path):
    out = tmp_path / "out"
    proc = run_limited(8_000, "extract-patches", "--config", crag["ref"], "--out", out, *EXTRACT)
    named = assert_stopped_full(proc, out, "run the same command again")
    assert named.name.startswith("train_b-"), named  # the noise image's patches (12 kB) cross it
    meta = json.loads((out / "crag" / "patches.json").read_text())
    assert meta["complete"] is False  # the patch set says it is not finished, and training refuses it
    with pytest.raises(CerberusError, match="did not finish; run the same cerberus extract-patches command again"):
        resolve_folder(Source(out / "crag", ("gland-inst",)), ModelConfig.preset("original", encoder="tiny"), tmp_path)
    again = run_cli("extract-patches", "--config", crag["ref"], "--out", out, *EXTRACT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 already done" in again.stdout  # resumed: the image finished before the limit is not cut again
    _assert_same_patches(out / "crag", extracted)


# ---- ENOSPC: a small tmpfs fills up (where this machine may mount one) --------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 kB tmpfs at ``tmp_path / "disk"``, unmounted after the test; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip() or proc.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_device_stops_extract_patches_and_it_resumes_after_space_is_freed(crag, extracted, small_disk):
    args = ("extract-patches", "--config", crag["ref"], "--out", small_disk, *EXTRACT)
    proc = run_cli(*args)
    assert_stopped_full(proc, small_disk, "run the same command again")
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space is freed
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_patches(small_disk / "crag", extracted)
