"""The cores a run may use, decided in one place for training and inference (:func:`plan_cores`).

Three things bound them: the process's affinity (``taskset``, SLURM and Docker cpusets), a CPU quota of its
control group (Kubernetes limits, Docker ``--cpus``, SLURM without cpusets: cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), and the other processes that already keep cores busy when the run
starts (``/proc/stat`` over a fifth of a second). OpenMP threads wait for each other at every layer: a thread
whose core is taken holds up the rest, so on a 2-core machine beside two busy processes two torch threads are
several times slower than one. A run therefore takes as many torch threads as there are free cores, and its worker
processes (data loading, post-processing), which do not wait for each other, take the rest of the usable cores.
``--threads`` overrides the choice, and so does ``OMP_NUM_THREADS`` where it is set (torch reads it too). Nothing
here imports torch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")
LOAD_INTERVAL = 0.2  # seconds over which the other processes' load is measured
BUSY_SHARE = 0.5  # a core counts as taken when others use at least this share of it
LOAD_TTL = 30.0  # seconds a measured load is reused by this process's next runs (a loop of predict_tile calls)
_LOAD: dict[tuple, tuple[float, float | None]] = {}


def affinity() -> list[int]:
    """The CPUs this process may run on (all of ``os.cpu_count()`` where the platform has no affinity)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cgroup_paths(proc: Path) -> dict[str, str]:
    """Controller -> path of this process's control group (``""`` for cgroup v2), from ``/proc/self/cgroup``."""
    out: dict[str, str] = {}
    try:
        text = proc.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                out[name] = parts[2]
    return out


def _up_from(mount: Path, path: str) -> list[Path]:
    """The folders of ``mount`` from the group at ``path`` up to the mount itself, those that exist (inside a
    container the group's own path is often not there: the container sees its group as the mount)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    dirs = [mount.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_quota(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> tuple[float | None, str]:
    """``(CPUs, source)``: the smallest CPU quota of this process's control group and the groups above it (None
    where none is set or the files are absent), and which file set it (empty when none)."""
    groups = _cgroup_paths(proc)
    found: list[tuple[float, str]] = []
    if "" in groups:  # cgroup v2: "max 100000" or "150000 100000" (quota and period in microseconds)
        for d in _up_from(root, groups[""]) + _up_from(root / "unified", groups[""]):
            text = _read(d / "cpu.max")
            fields = text.split() if text else []
            if len(fields) == 2 and fields[0] != "max":
                try:
                    quota, period = float(fields[0]), float(fields[1])
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    found.append((quota / period, "cgroup v2 cpu.max"))
    if "cpu" in groups:  # cgroup v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            for d in _up_from(root / name, groups["cpu"]) if (root / name).is_dir() else []:
                try:
                    quota = float(_read(d / "cpu.cfs_quota_us") or "-1")
                    period = float(_read(d / "cpu.cfs_period_us") or "0")
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    found.append((quota / period, "cgroup v1 cpu.cfs_quota_us"))
            if (root / name).is_dir():
                break
    if not found:
        return None, ""
    return min(found)


def _cpu_times(stat: Path) -> dict[int, tuple[int, int]]:
    """CPU index -> (idle + iowait, total) jiffies, from ``/proc/stat``."""
    out = {}
    for line in (_read(stat) or "").splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and len(values) >= 5:
            v = [int(x) for x in values[:8]]
            out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out


def busy_cores(cpus: list[int], interval: float = LOAD_INTERVAL, stat: Path = PROC_STAT) -> float | None:
    """How many of ``cpus`` other processes keep busy, measured over ``interval`` seconds (this process sleeps
    meanwhile); None where ``/proc/stat`` is absent (not Linux)."""
    before = _cpu_times(stat)
    if not before:
        return None
    time.sleep(interval)
    after = _cpu_times(stat)
    busy = 0.0
    for c in cpus:
        if c in before and c in after:
            idle = after[c][0] - before[c][0]
            total = after[c][1] - before[c][1]
            busy += 1.0 - idle / total if total > 0 else 0.0
    return busy


def _load(cpus: list[int], stat: Path) -> float | None:
    """:func:`busy_cores`, measured at most once every :data:`LOAD_TTL` seconds in this process: its next runs
    reuse it (and do not count their own worker processes as others)."""
    key = (tuple(cpus), str(stat))
    hit = _LOAD.get(key)
    if hit is not None and time.monotonic() - hit[0] < LOAD_TTL:
        return hit[1]
    busy = busy_cores(cpus, stat=stat)
    _LOAD[key] = (time.monotonic(), busy)
    return busy


@dataclass(frozen=True)
class Cores:
    """The cores of a run and how it uses them (:func:`plan_cores`).

    Attributes:
        seen: the CPUs of the machine (``os.cpu_count()``).
        affinity: the CPUs this process may run on.
        quota: the CPUs its control group's quota allows (None: no quota); ``quota_source`` names the file.
        busy: the cores of its affinity other processes kept busy when it started (None: not measured).
        usable: the cores it may use: its affinity, capped by the quota (rounded down, at least 1).
        threads: torch threads (``--threads``, else the usable cores not kept busy by others, at least 1).
        workers: worker processes beside them (post-processing of inference, data loading of training).
        asked: the threads given (None: chosen), and ``asked_by`` how: ``--threads`` or ``OMP_NUM_THREADS``.
    """

    seen: int
    affinity: int
    quota: float | None
    quota_source: str
    busy: float | None
    usable: int
    threads: int
    workers: int
    asked: int | None = None
    asked_by: str = ""

    def why(self) -> str:
        """Why these threads, in a few words: ``2 cores, 2 of 2 busy with other processes``."""
        if self.asked is not None:
            return self.asked_by
        parts = [f"{self.usable} core{'s' * (self.usable != 1)}"]
        if self.affinity < self.seen:
            parts.append(f"affinity {self.affinity} of {self.seen}")
        if self.quota is not None:
            parts.append(f"CPU quota {self.quota:g} ({self.quota_source})")
        if self.threads < self.usable and self.busy is not None:
            parts.append(f"{round(self.busy)} of {self.affinity} busy with other processes")
        return ", ".join(parts)


def check_threads(threads) -> int | None:
    """``threads`` as given (None: chosen), or a one-line error."""
    from .errors import CerberusError

    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise CerberusError(f"--threads must be a positive integer, got {threads!r}")
    return threads


def plan_cores(threads: int | None = None, *, gpu: bool = False, workers: int | None = None, processes: int = 1,
               measure_load: bool = True, root: Path | None = None, proc: Path | None = None,
               stat: Path | None = None) -> Cores:
    """The cores this run may use and their split (see the module docstring): torch ``threads`` (``--threads``,
    else the usable cores other processes leave free), and ``workers`` (given, else on a CPU the usable cores
    beside the threads; beside a GPU, which the threads only feed, the usable cores less 2). ``processes``: the
    run's processes on this machine that share the cores (one per device of a DDP run); the threads and workers
    are each one's. ``measure_load`` False skips the load measurement (a fifth of a second); ``root``, ``proc``
    and ``stat`` are where the control groups and CPU times are read (default :data:`CGROUP_ROOT`,
    :data:`PROC_CGROUP`, :data:`PROC_STAT`; tests give fake ones)."""
    asked = check_threads(threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if asked is None and env.isdigit() and int(env) > 0:
        asked, how = int(env), "OMP_NUM_THREADS"
    else:
        how = "--threads"
    cpus = affinity()
    quota, source = cpu_quota(root or CGROUP_ROOT, proc or PROC_CGROUP)
    usable = len(cpus) if quota is None else max(1, min(len(cpus), math.floor(quota + 1e-6)))
    busy = _load(cpus, stat or PROC_STAT) if measure_load and asked is None else None
    if asked is not None:
        n = asked
    else:  # others' busy cores come out of the affinity; what is left, within the usable ones
        taken = 0 if busy is None else int(busy + 1.0 - BUSY_SHARE)
        n = max(1, min(usable, len(cpus) - taken) // max(1, processes))
    if workers is None:
        share = max(1, usable // max(1, processes))
        workers = max(1, share - 2) if gpu else max(0, share - n)
    return Cores(os.cpu_count() or len(cpus), len(cpus), quota, source, busy, usable, n, workers, asked,
                 how if asked is not None else "")


__all__ = ["Cores", "affinity", "busy_cores", "check_threads", "cpu_quota", "plan_cores"]
