from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "real"

torch.set_num_threads(min(2, os.cpu_count() or 1))
# the same for the CLI runs the tests start: a run's threads and workers then do not depend on the machine's load
# at that moment (cores.plan_cores takes OMP_NUM_THREADS as given), so a test does the same work on an idle and a
# busy machine; tests/test_cores.py removes it where it tests the choice itself
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the ``cerberus`` CLI as a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "cerberus_histo", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, and OMP_NUM_THREADS=1 for CLI subprocesses: on a busy 2-core machine two OpenMP threads
    spin-wait on each other and make small convolutions many times slower."""
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real``: byte-for-byte samples of the released public datasets (skips where absent)."""
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/real not found: real dataset samples are absent")
    return REAL_DATA


def slide_model(folder: Path, seed: int = 0, heads: str | None = None) -> Path:
    """The tiny six-head network at 4 um/px (a small synthetic slide is a few windows), random weights with
    BatchNorm statistics measured on random images (:func:`calibrate`: it finds instances), saved in ``folder``;
    ``heads``: its trained heads (default: all)."""
    from cerberus_histo import Cerberus, ModelConfig

    torch.manual_seed(seed)
    net = calibrate(Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=4.0)))
    if heads is not None:
        net.provenance = {"trained_with": "test", "trained_heads": heads}
    return net.save(folder)


def calibrate(net):
    """A random network made usable as a stand-in for a trained one: BatchNorm statistics measured on random images
    (so activations have a realistic scale and it finds instances); returned in eval mode."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (2, 3, 96, 96)).float())
    return net.eval()
