"""The cores a run may use (issue 33): the affinity, a cgroup CPU quota (v1 or v2, read from fake cgroup trees
here), the other processes' load and ``--threads``; the choice of threads and workers for 1, 2, 8 and 64 cores."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from cerberus_histo import cores
from cerberus_histo.cores import busy_cores, cpu_quota, plan_cores
from cerberus_histo.errors import CerberusError


def _tree(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake ``/sys/fs/cgroup`` holding ``files`` and a ``/proc/self/cgroup`` of ``proc_line``."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


V2_NESTED = ("0::/kubepods/pod1/c1", {"kubepods/pod1/c1/cpu.max": "200000 100000", "kubepods/cpu.max": "400000 100000",
                                      "cpu.max": "max 100000"})


@pytest.mark.parametrize("proc_line, files, want", [
    (*V2_NESTED, (2.0, "cgroup v2 cpu.max")),  # the smallest quota of the group and those above it
    ("0::/job", {"job/cpu.max": "max 100000"}, (None, "")),
    ("0::/", {"cpu.max": "150000 100000"}, (1.5, "cgroup v2 cpu.max")),
    # a container sees its group as the mount: its own path is not there
    ("0::/docker/abc", {"cpu.max": "50000 100000"}, (0.5, "cgroup v2 cpu.max")),
    ("4:cpu,cpuacct:/docker/abc\n0::/", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
                                        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
     (3.0, "cgroup v1 cpu.cfs_quota_us")),
    ("1:cpu:/\n2:cpuacct:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, (None, "")),
    ("0::/", {"cpu.max": "garbage"}, (None, "")),
    ("0::/", {}, (None, "")),  # no cpu controller files at all
], ids=["v2-nested", "v2-max", "v2-root", "v2-container", "v1", "v1-none", "v2-malformed", "missing"])
def test_quota_from_cgroup_files(tmp_path, proc_line, files, want):
    root, proc = _tree(tmp_path, proc_line, files)
    assert cpu_quota(root, proc) == want


def test_no_cgroup_files_at_all(tmp_path):
    assert cpu_quota(tmp_path / "nothing", tmp_path / "no_proc") == (None, "")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine of ``n`` cores with an optional cgroup v2 quota and others' load: ``plan(n, quota, busy, ...)``."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "_LOAD", {})  # no load measured by an earlier test

    def plan(n: int, quota: float | None = None, busy: float | None = None, **kw):
        monkeypatch.setattr(cores, "affinity", lambda: list(range(n)))
        monkeypatch.setattr(cores.os, "cpu_count", lambda: n)
        monkeypatch.setattr(cores, "busy_cores", lambda cpus, **_: busy)
        d = Path(tempfile.mkdtemp(dir=tmp_path))
        root, proc = _tree(d, "0::/", {} if quota is None else {"cpu.max": f"{int(quota * 100000)} 100000"})
        return plan_cores(root=root, proc=proc, **kw)

    return plan


@pytest.mark.parametrize("n, quota, busy, threads, workers, why", [
    (1, None, None, 1, 0, "1 core"),
    (2, None, 0.1, 2, 0, "2 cores"),
    (2, None, 2.0, 1, 1, "2 cores, 2 of 2 busy with other processes"),  # one busy loop per core: one thread
    (2, 1.0, None, 1, 0, "1 core, CPU quota 1 (cgroup v2 cpu.max)"),
    (8, None, None, 8, 0, "8 cores"),
    (8, 4.0, None, 4, 0, "4 cores, CPU quota 4 (cgroup v2 cpu.max)"),
    (8, None, 3.4, 5, 3, "8 cores, 3 of 8 busy with other processes"),
    (64, None, None, 64, 0, "64 cores"),
    (64, 4.0, None, 4, 0, "4 cores, CPU quota 4 (cgroup v2 cpu.max)"),
    (64, 2.5, 63.0, 1, 1, "2 cores, CPU quota 2.5 (cgroup v2 cpu.max), 63 of 64 busy with other processes"),
])
def test_threads_and_workers_for_the_machine(machine, n, quota, busy, threads, workers, why):
    got = machine(n, quota, busy)
    assert (got.threads, got.workers, got.why()) == (threads, workers, why)


def test_gpu_workers_threads_given_and_omp_num_threads(machine, monkeypatch):
    assert machine(8, gpu=True).workers == 6  # two cores feed the GPU and read
    assert machine(2, gpu=True).workers == 1
    given = machine(64, 4.0, 60.0, threads=3)
    assert (given.threads, given.workers, given.why()) == (3, 1, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = machine(8)
    assert (env.threads, env.why()) == (2, "OMP_NUM_THREADS")
    assert machine(8, threads=5).why() == "--threads"
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(CerberusError, match="--threads must be a positive integer"):
            plan_cores(threads=bad)


def test_busy_cores_reads_proc_stat(tmp_path, monkeypatch):
    """Two samples of /proc/stat: cpu0 fully busy, cpu1 idle between them; cpus outside the affinity ignored."""
    stat = tmp_path / "stat"
    samples = iter([
        "cpu  1 0 1 1 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
        "cpu  1 0 1 1 0 0 0 0\ncpu0 200 0 0 100 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0\ncpu2 90 0 0 0 0 0 0 0\n",
    ])
    monkeypatch.setattr(cores.time, "sleep", lambda s: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    assert busy_cores([0, 1], stat=stat) == pytest.approx(1.0)
    assert busy_cores([0, 1], stat=tmp_path / "absent") is None


def test_the_load_is_measured_once_for_a_loop_of_runs(monkeypatch):
    """A loop of predict_tile calls plans its cores each time: the load is measured once (and never with the
    loop's own worker processes counted as others)."""
    calls = []
    monkeypatch.setattr(cores, "_LOAD", {})
    monkeypatch.setattr(cores, "busy_cores", lambda cpus, **_: calls.append(cpus) or 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    first, again = plan_cores(), plan_cores()
    assert len(calls) == 1 and first == again


def test_this_machine():
    """On the machine at hand: at least one thread, within the affinity."""
    got = plan_cores()
    assert 1 <= got.threads <= max(got.affinity, got.threads) and got.usable <= got.affinity


def test_a_one_cpu_quota_gives_train_and_infer_tile_one_thread(tmp_path, monkeypatch):
    """A control group limited to 1 CPU (cgroup v2 ``cpu.max``, faked): the settings lines of ``train`` and
    ``infer-tile`` say 1 torch thread and why, and train.yaml records it."""
    import torch
    import yaml
    from click.testing import CliRunner

    from cerberus_histo import Cerberus, ModelConfig
    from cerberus_histo.cli import main
    from cerberus_histo.data.patches import extract_patches
    from cerberus_histo.data.synthetic import write_tiles

    root, proc = _tree(tmp_path, "0::/", {"cpu.max": "100000 100000"})
    monkeypatch.setattr(cores, "CGROUP_ROOT", root)
    monkeypatch.setattr(cores, "PROC_CGROUP", proc)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = write_tiles(tmp_path / "data", 3, 96, seed=2, tasks=("nuclei",), name="n", progress=False)
    extract_patches(spec.root, tmp_path / "patches", 96, 48, "mirror", progress=False)
    model = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8)).save(tmp_path / "model")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"batch_size": 2, "class_batch_size": 4, "max_steps": 1, "val_every": 1,
                                      "model": {"encoder": "tiny", "patch_shape": 48}}))
    threads = torch.get_num_threads()
    want = "1 torch thread (1 core, CPU quota 1 (cgroup v2 cpu.max))"
    try:
        tile = CliRunner().invoke(main, ["infer-tile", "--model", str(model), "--input", str(spec.root / "images"),
                                         "--output", str(tmp_path / "out"), "--formats", "npz"])
        assert tile.exit_code == 0, tile.stderr
        assert want in tile.stderr.splitlines()[0], tile.stderr
        run = CliRunner().invoke(main, ["train", "--nuclei-dir", str(tmp_path / "patches" / "n"), "--fold", "0",
                                        "--config", str(params), "--log-dir", str(tmp_path / "run")])
        assert run.exit_code == 0, run.stderr
        first = run.stderr.splitlines()[0]
        assert first.startswith("device cpu, precision 32, ") and want in first, run.stderr
        machine = yaml.safe_load((tmp_path / "run" / "train.yaml").read_text())["machine"]
        assert machine["threads"] == 1 and machine["data_workers"] == 0, machine
    finally:
        torch.set_num_threads(threads)
