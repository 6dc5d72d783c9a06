"""The Python API works from a plain script, as docs/api.md shows it (issue 19): a fresh model predicts, worker
pools never re-run a script without a main guard, and a pool that breaks is an error, not "every image failed"."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.data.synthetic import synth_tile
from cerberus_histo.errors import CerberusError
from cerberus_histo.infer.pool import WorkerPool, spawn_safe


def test_a_fresh_model_predicts_one_image():
    model = Cerberus(ModelConfig.preset("original", encoder="tiny"))
    out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))  # the patch head's BatchNorm takes one image
    assert out["tissue-class"].shape[0] == 1 and not model.training


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    net = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=4.0))
    net.save(root / "model")
    (root / "tiles").mkdir()
    for i in range(2):
        cv2.imwrite(str(root / "tiles" / f"t{i}.png"), synth_tile(128, seed=i).image[..., ::-1])
    write_synthetic_slide(root / "s.tif", 600, 500, seed=1, field=256, offset=128, n_fields=1, tile=256,
                          progress=False)
    return root


SCRIPT = """
from cerberus_histo.infer.cohort import infer_wsi
from cerberus_histo.infer.tiles import infer_tiles

{indent}t = infer_tiles("model", "tiles", "out-tiles", postproc_workers=1, mpp=4.0, threads=1, progress=False)
{indent}print("tiles", len(t.done), len(t.failed))
{indent}w = infer_wsi("model", "s.tif", "out-wsi", workers=1, threads=1, postproc_workers=0, progress=False)
{indent}print("slides", len(w.rows), len(w.failed))
"""


def _run_script(folder: Path, guarded: bool) -> subprocess.CompletedProcess:
    body = SCRIPT.format(indent="    " if guarded else "")
    if guarded:
        head, _, calls = body.partition("\n\n")
        body = head + '\n\nif __name__ == "__main__":\n' + calls
    (folder / "run.py").write_text(textwrap.dedent(body))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "run.py"], cwd=folder, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("guarded", [False, True], ids=["no-guard", "guard"])
def test_tiles_and_a_cohort_from_a_plain_script(inputs, guarded):
    for name in ("out-tiles", "out-wsi"):
        import shutil

        shutil.rmtree(inputs / name, ignore_errors=True)
    proc = _run_script(inputs, guarded)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["tiles 2 0", "slides 1 0"], proc.stdout
    assert proc.stdout.count("tiles") == 1  # the script ran once: no worker re-ran it
    warned = "would re-run this script" in proc.stderr
    assert warned == (not guarded), proc.stderr[-2000:]
    assert (inputs / "out-tiles" / "t0.geojson").is_file() and (inputs / "out-wsi" / "s.db").is_file()


def test_spawn_safe_here():
    assert spawn_safe()  # under pytest: its main script runs inside its guard


def _die(job):
    os._exit(3)


def test_a_broken_pool_is_an_error_not_a_failed_job():
    seen = []
    with pytest.raises(CerberusError, match="worker processes died"):
        with WorkerPool(1, lambda tag, fut: seen.append(tag)) as pool:
            pool.submit(_die, None, "a")
            pool.drain()
    assert seen == []


def test_a_failing_job_reaches_on_done():
    got = []
    with WorkerPool(0, lambda tag, fut: got.append((tag, type(fut.exception()).__name__))) as pool:
        pool.submit(np.log, "not a number", "a")
    assert got == [("a", "TypeError")]


def test_the_command_keeps_its_workers(inputs, tmp_path):
    """``python -m cerberus_histo`` (and the ``cerberus`` script) guard their main call, so a spawned worker never
    runs the command again and post-processing really runs in a worker process."""
    from conftest import run_cli

    proc = run_cli("infer-tile", "--model", inputs / "model", "--input", inputs / "tiles", "--output", tmp_path / "o",
                   "--mpp", "4.0", "--threads", "1", "--postproc-workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "would re-run this script" not in proc.stderr and "1 post-processing worker" in proc.stderr
    assert "2 images done" in proc.stdout
