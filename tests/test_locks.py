"""One output folder, two runs: a result's lock (io/locks.py) makes a second run do the other results first, wait
for the held one and skip it once the first run has finished it; a killed run's lock is taken over. Tested with
real processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import slide_model

from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.io.locks import LOCK_DIR, ResultLock, _lock, held_by, lock_path

WINDOW = ("--input-shape", "192", "--output-shape", "128")
SMALL = dict(field=256, offset=128, n_fields=2, tile=256, progress=False)
HOLD = ("import sys, time\nfrom cerberus_histo.io.locks import ResultLock\n"
        "lock = ResultLock(sys.argv[1], sys.argv[2])\nassert lock.try_acquire()\nprint('held', flush=True)\n"
        "time.sleep(120)\n")


def _cli(*args) -> subprocess.Popen:
    """The ``cerberus`` CLI as a separate process (one OpenMP thread), its output read when it ends."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cerberus_histo", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _wait_for(test, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not test():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _rows(db: Path, table: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        con.close()


# ---- the lock itself ---------------------------------------------------------------------------------------
def test_a_lock_dies_with_its_process_and_is_taken_over(tmp_path):
    """A child process holds the lock: not acquirable here (its pid named); SIGKILL it: a waiting acquirer gets
    it and names the run that ended; released, its file and folder are gone."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "s1"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        lock = ResultLock(tmp_path, "s1", poll=0.02)
        assert not lock.try_acquire() and not lock.acquire(wait=False)
        assert lock.holder.pid == child.pid and held_by(tmp_path, "s1").pid == child.pid
        assert str(lock.holder).startswith(f"pid {child.pid} on ")
        waited: list = []
        waiter = threading.Thread(target=lock.acquire, kwargs={"on_wait": waited.append})
        waiter.start()
        _wait_for(lambda: waited, "the waiting line", 30)
        time.sleep(0.1)
        assert waiter.is_alive() and [h.pid for h in waited] == [child.pid]  # said once, still waiting
    finally:
        child.kill()
        child.wait()
    waiter.join(10)
    assert lock.held and lock.took_over.pid == child.pid
    assert json.loads(lock_path(tmp_path, "s1").read_text())["pid"] == os.getpid()  # the record names the holder
    assert held_by(tmp_path, "s2") is None and held_by(tmp_path, "s1").pid == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_DIR).exists() and held_by(tmp_path, "s1") is None


def test_a_released_lock_is_never_held_twice(tmp_path):
    """Two holders in one process exclude each other too; a clean release is no take-over; a descriptor opened on
    the file before its holder unlinked it can lock that old file, but is seen not to be the path's file; the
    folders a lock created are gone with it."""
    a, b = ResultLock(tmp_path, "s"), ResultLock(tmp_path, "s")
    assert a.try_acquire() and not b.try_acquire() and b.holder.pid == os.getpid()
    stale = os.open(lock_path(tmp_path, "s"), os.O_RDWR)
    try:
        a.release()
        assert _lock(stale) and not b._is_current(stale)
        assert b.try_acquire() and b.took_over is None  # released cleanly: nothing taken over
        assert not a.try_acquire()
    finally:
        os.close(stale)
        b.release()
    with ResultLock(tmp_path, "s") as c:
        assert c.held and held_by(tmp_path, "s") is not None
    assert held_by(tmp_path, "s") is None and tmp_path.is_dir()
    fresh = tmp_path / "new" / "out"  # a lock in a folder that did not exist leaves no folder behind
    with ResultLock(fresh, "x"):
        assert lock_path(fresh, "x").is_file()
    assert not (tmp_path / "new").exists()


# ---- two runs on one folder (real processes) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny six-head network at 4 um/px (tests/test_wsi.py's), BatchNorm statistics from random images."""
    return slide_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Three synthetic slides: s0 of 3 x 3 chunks of 128 model px, s1 and s2 of 2 x 2."""
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "s0.tif", 3000, 2400, seed=31, **SMALL)
    for i in (1, 2):
        write_synthetic_slide(folder / f"s{i}.tif", 1400, 1100, seed=10 + i, **SMALL)
    return folder


SLIDE_ARGS = (*WINDOW, "--chunk-size", "128", "--threads", "1", "--postproc-workers", "0")


@pytest.fixture(scope="module")
def reference(model_dir, slides, tmp_path_factory):
    """One process's run of the three slides, started at once beside the tests; calling the fixture's value waits
    for it and returns its output folder."""
    out = tmp_path_factory.mktemp("reference")
    proc = _cli("infer-wsi", "--model", model_dir, "--input", slides / "*.tif", "--output", out, *SLIDE_ARGS)

    def finished() -> Path:
        if proc.returncode is None:
            _finish(proc)
        return out

    yield finished
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _same_stores(out: Path, reference: Path, stems) -> None:
    for stem in stems:
        assert (out / "done" / f"{stem}.json").is_file()
        for table in ("annotations", "rtree"):
            assert _rows(out / f"{stem}.db", table) == _rows(reference / f"{stem}.db", table), (stem, table)
    assert not list(out.glob("*.partial")) and not (out / LOCK_DIR).exists()


@pytest.mark.slow
def test_two_slide_runs_on_one_folder_split_the_slides(model_dir, slides, reference, tmp_path):
    """A third party (this test) holds s0 while two infer-wsi processes start on the same three slides and folder:
    both do the others first, splitting them, then wait for s0; once released one does it, the other skips it.
    Every slide is done once, by one process, into one store equal to a single run's."""
    out = tmp_path / "out"
    held = ResultLock(out, "s0")
    assert held.try_acquire()
    try:
        runs = [_cli("infer-wsi", "--model", model_dir, "--input", slides / "*.tif", "--output", out, *SLIDE_ARGS)
                for _ in range(2)]
        _wait_for(lambda: all((out / "done" / f"s{i}.json").is_file() for i in (1, 2)), "s1 and s2")
    finally:
        held.release()
    results = [_finish(p) for p in runs]
    status: dict[str, list[str]] = {}
    for stdout, stderr in results:
        assert f"s0.tif is held by another run (pid {os.getpid()} on " in stderr and "doing the others first" in stderr
        for line in stdout.splitlines()[1:4]:
            status.setdefault(line.split()[0], []).append(line.split()[1])
    assert {k: sorted(v) for k, v in status.items()} == {f"s{i}.tif": ["done", "skipped"] for i in range(3)}
    _same_stores(out, reference(), ("s0", "s1", "s2"))


@pytest.mark.slow
def test_a_killed_runs_slide_is_taken_over_and_resumed(model_dir, slides, reference, tmp_path):
    """SIGKILL a run while it holds s0 (chunks committed): the next run says it takes over from that pid and
    resumes to the store of an uninterrupted run."""
    out = tmp_path / "out"
    args = ("infer-wsi", "--model", model_dir, "--input", slides / "s0.tif", "--output", out, *SLIDE_ARGS)
    first = _cli(*args)
    partial = out / "s0.db.partial"

    def committed() -> bool:
        try:
            return partial.is_file() and len(_rows(partial, "cerberus_chunks")) >= 2
        except sqlite3.Error:
            return False

    try:
        _wait_for(committed, "two committed chunks")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert held_by(out, "s0") is None and lock_path(out, "s0").is_file()  # left behind, held by nobody
    assert not (out / "s0.db").exists()
    stdout, stderr = _finish(_cli(*args))
    assert f"took over s0.tif from a run that ended (pid {first.pid} on " in stderr
    assert stdout.splitlines()[1].split()[:2] == ["s0.tif", "done"]
    _same_stores(out, reference(), ("s0",))


@pytest.mark.slow
def test_two_tile_runs_on_one_folder(model_dir, tmp_path):
    """The same with infer-tile: an image held by another party is done last, once, by one of the two runs; every
    image's files equal a single run's."""
    src = tmp_path / "tiles"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        image = cv2.GaussianBlur(rng.integers(0, 256, (160, 176, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(src / f"t{i}.png"), image)
    args = ("--model", model_dir, "--input", src, "--mpp", "4", "--threads", "1", "--postproc-workers", "0",
            "--formats", "npz,geojson,csv")
    single = _cli("infer-tile", *args, "--output", tmp_path / "single")  # the reference, beside the two runs
    out = tmp_path / "out"
    held = ResultLock(out, "t0")
    assert held.try_acquire()
    try:
        runs = [_cli("infer-tile", *args, "--output", out) for _ in range(2)]
        _wait_for(lambda: all((out / "done" / f"t{i}.json").is_file() for i in (1, 2, 3)), "t1 to t3")
    finally:
        held.release()
    results = [_finish(p) for p in runs]
    _finish(single)
    done = 0
    for stdout, stderr in results:
        assert f"t0.png is held by another run (pid {os.getpid()} on " in stderr
        done += int(stdout.split(" images done")[0].split()[-1])
    assert done == 4  # each image once
    for i in range(4):
        with np.load(out / f"t{i}.npz") as a, np.load(tmp_path / "single" / f"t{i}.npz") as b:
            assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
        for name in (f"t{i}.geojson", f"t{i}_summary.csv"):
            assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert not (out / LOCK_DIR).exists()
