"""Dask workers that die mid-slide: on a cluster of separate ``dask scheduler`` and ``dask worker`` processes a
SIGKILLed worker is restarted by its nanny, its slide is rescheduled and resumes from its partial store, and every
store equals an undisturbed run's; a slide that kills its worker every time fails after the scheduler's limit with a
reason, and the other slides complete. A LocalCluster worker killed mid-slide is replaced the same way."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import slide_model
from test_wsi import SMALL, WINDOW, store_rows

from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.infer.cohort import infer_wsi

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
DASK = Path(sys.executable).parent / "dask"
ALLOWED_FAILURES = 1  # the scheduler's limit: a slide whose worker dies twice is failed
SETTINGS = (*WINDOW, "--chunk-size", "128", "--postproc-workers", "0", "--threads", "1")


def _holder(parents: list[subprocess.Popen], path: Path) -> int | None:
    """The pid of a process below ``parents`` (a Dask worker under its nanny) that has ``path`` open, if any."""
    for proc in parents:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                if any(f.path == str(path) for f in child.open_files()):
                    return child.pid
            except psutil.Error:
                continue
    return None


@dataclass
class Cluster:
    """A running ``dask scheduler`` and its ``dask worker`` processes (each a nanny and its worker process)."""

    address: str
    processes: list[subprocess.Popen]

    def holder(self, path: Path) -> int | None:
        """The pid of the worker process that has ``path`` open, if any."""
        return _holder(self.processes[1:], path)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A scheduler (allowed-failures = ALLOWED_FAILURES) and two single-threaded workers with nannies."""
    logs = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ, OMP_NUM_THREADS="1", DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=str(ALLOWED_FAILURES))
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen([str(DASK), *args, "--no-dashboard"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file",
              str(logs / "scheduler.json"))
        address = _wait(lambda: json.loads((logs / "scheduler.json").read_text())["address"], 30, procs[0])
        assert address, (logs / "scheduler.log").read_text()[-3000:]
        for k in range(2):
            start(f"worker{k}", "worker", address, "--nworkers", "1", "--nthreads", "1", "--name", f"w{k}")
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield Cluster(address, procs)
    finally:
        _stop(procs)


def _wait(probe, seconds: float, proc: subprocess.Popen):
    """``probe()``'s first true value, polled until ``seconds`` pass or ``proc`` exits (then None)."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            value = probe()
        except (OSError, ValueError, KeyError, sqlite3.Error):
            value = None
        if value:
            return value
        time.sleep(0.02)
    return None


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """(model folder, three slides of 3 x 3 chunks, an undisturbed in-process run's output folder)."""
    root = tmp_path_factory.mktemp("cohort").resolve()
    model = slide_model(root / "model")
    slides = [write_synthetic_slide(root / f"s{i}.tif", 3000, 2400, seed=31 + i, **SMALL) for i in range(3)]
    s = _reference_run((model, slides, None), root / "reference")
    assert [r.status for r in s.rows] == ["done"] * 3
    return model, slides, root / "reference"


def _reference_run(cohort, out: Path):
    """The cohort's slides predicted here, one after another, with the CLI runs' settings (SETTINGS)."""
    model, slides, _ = cohort
    return infer_wsi(model, slides, out, input_shape=192, output_shape=128, chunk_size=128, postproc_workers=0,
                     threads=1, progress=False, echo=lambda line: None)


def _start(cohort, out: Path, *where: str, slides: int = 3) -> subprocess.Popen:
    """``cerberus infer-wsi`` on the first ``slides`` slides of the cohort into ``out``, run ``where``."""
    model, paths, _ = cohort
    return subprocess.Popen([sys.executable, "-m", "cerberus_histo", "infer-wsi", "--model", str(model),
                             *[a for s in paths[:slides] for a in ("--input", str(s))], "--output", str(out),
                             *SETTINGS, *where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _table(stdout: str) -> dict[str, list[str]]:
    """The final table's rows: slide -> [status, objects, seconds, reason]."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("slide "))
    return {line.split()[0]: line.split(None, 4)[1:] for line in lines[head + 1:] if line.startswith("s")}


def _same_stores(cohort, out: Path, stems: list[str]) -> None:
    reference = cohort[2]
    for stem in stems:
        for table in ("annotations", "rtree"):
            assert store_rows(out / f"{stem}.db", table) == store_rows(reference / f"{stem}.db", table), stem


def _committed(partial: Path) -> int:
    """The chunks committed to a partial store (0 before its tables are made)."""
    try:
        return len(store_rows(partial, "cerberus_chunks")) if partial.is_file() else 0
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise


def test_worker_killed_mid_slide_resumes_from_its_partial_store(cluster, cohort, tmp_path):
    """SIGKILL the worker process running s0 once a chunk is committed: the nanny restarts it, the scheduler
    reschedules s0, which resumes its committed chunks; every slide ends equal to an undisturbed run's."""
    from distributed import Client

    out = tmp_path.resolve() / "out"
    client = Client(cluster.address, timeout="30s")
    proc = _start(cohort, out, "--scheduler", cluster.address)
    partial = out / "s0.db.partial"
    try:
        victim = _wait(lambda: _committed(partial) >= 1 and cluster.holder(partial), 90, proc)
        assert victim, "s0 never had a committed chunk while running"
        held = client.processing()  # the slides each worker holds when s0's worker dies
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _stop([proc])
        client.close()
    # one slide per worker: no slide waits behind s0 on its worker, to be charged for its death
    assert ("slide-0-s0",) in held.values() and all(len(keys) <= 1 for keys in held.values()), held
    assert proc.returncode == 0, stderr[-3000:]
    table = _table(stdout)
    assert [table[f"s{i}.tif"][0] for i in range(3)] == ["done"] * 3, table
    _same_stores(cohort, out, ["s0", "s1", "s2"])
    chunks = json.loads((out / "s0_metadata.json").read_text())["chunks"]
    assert chunks["done_before"] > 0, chunks  # resumed, not redone
    assert not list(out.glob("*.partial"))


def test_slide_that_kills_its_worker_every_time_fails_alone(cluster, cohort, tmp_path):
    """Kill whichever worker process runs s0, every time: after ALLOWED_FAILURES + 1 deaths the scheduler gives up,
    s0 is failed with the reason, the CLI exits 2 naming it, and s1 and s2 complete."""
    out = tmp_path.resolve() / "out"
    proc = _start(cohort, out, "--scheduler", cluster.address)
    partial, killed = out / "s0.db.partial", []
    try:
        while proc.poll() is None:
            pid = _wait(lambda: (p := cluster.holder(partial)) not in killed and p, 90, proc)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _stop([proc])
    assert len(killed) == ALLOWED_FAILURES + 1, (killed, stderr[-3000:])
    assert proc.returncode == 2, stderr[-3000:]
    table = _table(stdout)
    # a worker killed just after it finished a slide, before the cohort took the result, loses the result: Dask
    # runs the slide again and it finds itself finished ("skipped"); its store is checked below either way
    assert table["s0.tif"][0] == "failed" and {table[f"s{i}.tif"][0] for i in (1, 2)} <= {"done", "skipped"}, table
    reason = table["s0.tif"][3]
    assert f"died {ALLOWED_FAILURES + 1} times" in reason and "out of memory" in reason, reason
    assert "see the log of worker w" in reason and "--memory-gb" in reason, reason
    assert stderr.strip().splitlines()[-1].startswith("error: 1 of 3 slides failed (s0.tif)")
    assert "Traceback" not in stderr
    _same_stores(cohort, out, ["s1", "s2"])
    assert partial.is_file() and not (out / "s0.db").exists()  # kept for the next run to resume
    committed = _committed(partial)
    again = _reference_run(cohort, out)  # the same settings again (here, in this process): s0 is resumed
    assert [r.status for r in again.rows] == ["done", "skipped", "skipped"], again.table()
    _same_stores(cohort, out, ["s0"])
    assert json.loads((out / "s0_metadata.json").read_text())["chunks"]["done_before"] == committed


def test_local_cluster_worker_killed_mid_slide_is_replaced(cohort, tmp_path):
    """--workers 2 (a LocalCluster inside the CLI process), two slides: SIGKILL the worker process running s0 once a
    chunk is committed; its nanny restarts it, s0 resumes, and both stores equal an undisturbed run's."""
    out = tmp_path.resolve() / "out"
    proc = _start(cohort, out, "--workers", "2", slides=2)
    partial = out / "s0.db.partial"
    try:
        victim = _wait(lambda: _committed(partial) >= 1 and _holder([proc], partial), 90, proc)
        assert victim, "s0 never had a committed chunk while running"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _stop([proc])
    assert proc.returncode == 0, stderr[-3000:]
    assert {k: v[0] for k, v in _table(stdout).items()} == {"s0.tif": "done", "s1.tif": "done"}, stdout
    _same_stores(cohort, out, ["s0", "s1"])
    assert json.loads((out / "s0_metadata.json").read_text())["chunks"]["done_before"] > 0
