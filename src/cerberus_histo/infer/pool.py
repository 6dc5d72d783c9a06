"""What tile and slide runs share: the one pool loop, the output folder, the completion markers, messages.

* :class:`WorkerPool` runs a torch-free function (post-processing and writing) on jobs in ``workers`` spawned
  processes while the caller goes on predicting, holding at most ``workers`` jobs in flight (so at most that
  many probability maps wait in memory); with 0 workers, or inside a daemonic process (a Dask worker cannot
  have children), each job runs at once in the calling process. Every finished job, in submission order, is
  handed to ``on_done(tag, future)``.
* A run's output folder holds ``done/{stem}.json`` per finished image or slide, written last and atomically
  (:func:`write_marker`); a re-run skips what has one (:func:`read_marker`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..errors import CerberusError
from ..io.files import atomic_write_bytes

MARKER_DIR = "done"


class WorkerPool:
    """``submit(fn, job, tag)`` jobs; each result reaches ``on_done(tag, future)`` in submission order (see the
    module docstring). Use as a context manager: leaving it waits for the jobs in flight only on success;
    :meth:`drain` first to collect them."""

    def __init__(self, workers: int, on_done: Callable[[Any, Future], None]):
        if workers > 0 and multiprocessing.current_process().daemon:
            workers = 0
        self.workers = int(workers)
        self._on_done = on_done
        self._pending: deque = deque()
        self._pool = None
        if self.workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[[Any], Any], job: Any, tag: Any = None) -> None:
        """Run ``fn(job)`` here (no workers) or in a worker; then hand over the oldest results while more than
        ``workers`` are in flight."""
        if self._pool is None:
            fut: Future = Future()
            try:
                fut.set_result(fn(job))
            except Exception as exc:  # the caller's on_done decides: report and go on, or raise
                fut.set_exception(exc)
            self._on_done(tag, fut)
            return
        self._pending.append((tag, self._pool.submit(fn, job)))
        while len(self._pending) > self.workers:
            self._on_done(*self._pending.popleft())

    def drain(self) -> None:
        """Hand over every job still in flight."""
        while self._pending:
            self._on_done(*self._pending.popleft())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the output folder and its markers -------------------------------------------------------------------
def check_output(folder: Path) -> Path:
    """Create the output folder (and its ``done/``); one-line errors when it is a file or cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CerberusError(f"--output {folder} exists and is not a folder; choose a folder path")
    try:
        (folder / MARKER_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CerberusError(f"cannot create --output {folder}: {exc.strerror or exc}; choose another path") from None
    if not os.access(folder, os.W_OK) or not os.access(folder / MARKER_DIR, os.W_OK):
        raise CerberusError(f"--output {folder} is not writable; choose another path")
    return folder


def marker_path(output: Path, stem: str) -> Path:
    """The completion marker of ``stem``: ``{output}/done/{stem}.json``."""
    return Path(output) / MARKER_DIR / f"{stem}.json"


def read_marker(output: Path, stem: str) -> dict | None:
    """The marker's content, or None when there is none or it cannot be read (then the work is done again)."""
    try:
        done = json.loads(marker_path(output, stem).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def write_marker(output: Path, stem: str, content: dict) -> Path:
    """Write the marker atomically (the last file of a finished image or slide); returns its path."""
    path = marker_path(output, stem)
    atomic_write_bytes(path, json.dumps(content, indent=2).encode())
    return path


def output_stems(paths) -> dict[Path, str]:
    """Output file stem per input: its name without suffix, or with it where two inputs share a stem."""
    count: dict[str, int] = {}
    for p in paths:
        count[p.stem] = count.get(p.stem, 0) + 1
    return {p: p.stem if count[p.stem] == 1 else p.name for p in paths}


# ---- messages --------------------------------------------------------------------------------------------
def echo(msg: str) -> None:
    """A message line on stderr that keeps progress bars intact."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """An exception as one line: a :class:`CerberusError`'s message, else ``Type: first line``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, CerberusError) else f"{type(exc).__name__}: {first}".rstrip(": ")


__all__ = ["MARKER_DIR", "WorkerPool", "check_output", "echo", "marker_path", "one_line", "output_stems",
           "read_marker", "write_marker"]
