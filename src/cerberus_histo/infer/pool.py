"""What tile and slide runs share: the one pool loop, the output folder, the completion markers, messages.

* :class:`WorkerPool` runs a torch-free function (post-processing and writing) on jobs in ``workers`` spawned
  processes while the caller goes on predicting, holding at most ``workers`` jobs in flight (so at most that
  many probability maps wait in memory); with 0 workers, inside a daemonic process (a Dask worker cannot
  have children), or where spawned processes would re-run the caller's script (:func:`spawn_safe`), each job runs
  at once in the calling process. Every finished job, in submission order, is handed to ``on_done(tag,
  future)``; a pool whose processes died is a :class:`CerberusError`, never a failed job.
* A run's output folder holds ``done/{stem}.json`` per finished image or slide, written last and atomically
  (:func:`write_marker`); a re-run skips what has one (:func:`read_marker`). These helpers live in
  :mod:`cerberus_histo.io.files`, shared with patch extraction and the demo: one convention (docs/outputs.md). The folder is created by the first
  result written, never before (:func:`check_output` only checks).
* The settings that make a result form its run key (:func:`run_key`, with :func:`weights_id` for the model);
  tiles record it in their markers, slides in their partial stores (and the part a re-run can know before opening
  the slide in their markers, :func:`~.wsi.slide_key`), and a result of another key is redone
  (:func:`changed_settings` names what changed, :func:`redone_line` says it).
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ..errors import CerberusError
from ..io.files import MARKER_DIR, marker_path, read_marker, write_marker  # the one marker convention


def _is_main_test(test: ast.expr) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(a, ast.Name) and a.id == "__name__" for a in sides) and \
        any(isinstance(a, ast.Constant) and a.value == "__main__" for a in sides)


def spawn_safe() -> bool:
    """Whether processes started with ``spawn`` (post-processing pools, Dask's local workers) can start without
    re-running the caller's code. A spawned process imports the main script again; a script that calls Cerberus at
    its top level, outside ``if __name__ == "__main__":``, would run that call again in every worker (and the
    worker's own pool would break). True in an interactive session, a notebook, ``python -c``, under the
    ``cerberus`` command, and where the main script's statement now running sits inside the guard."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        return True
    frame = sys._current_frames().get(threading.main_thread().ident)
    line = None
    while frame is not None:  # the main script's own statement now running (outermost <module> frame)
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:  # the script has finished (or is not on the main thread's stack): nothing re-runs it
        return True
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.If) and _is_main_test(node.test) and node.lineno <= line <= node.end_lineno
               for node in tree.body)


NO_GUARD = ("{what} in this process: worker processes would re-run this script, whose call to Cerberus is not "
            "under `if __name__ == \"__main__\":` (put it there to run them in parallel)")


class WorkerPool:
    """``submit(fn, job, tag)`` jobs; each result reaches ``on_done(tag, future)`` in submission order (see the
    module docstring). Use as a context manager: leaving it waits for the jobs in flight only on success;
    :meth:`drain` first to collect them."""

    def __init__(self, workers: int, on_done: Callable[[Any, Future], None]):
        if workers > 0 and multiprocessing.current_process().daemon:
            workers = 0
        if workers > 0 and not spawn_safe():
            warnings.warn(NO_GUARD.format(what="post-processing runs"), stacklevel=2)
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
        try:
            self._pending.append((tag, self._pool.submit(fn, job)))
        except BrokenProcessPool as exc:
            raise _broken(exc) from None
        while len(self._pending) > self.workers:
            self._hand_over(*self._pending.popleft())

    def drain(self) -> None:
        """Hand over every job still in flight."""
        while self._pending:
            self._hand_over(*self._pending.popleft())

    def _hand_over(self, tag: Any, fut: Future) -> None:
        exc = fut.exception()
        if isinstance(exc, BrokenProcessPool):  # every job in flight is lost: the run is broken, not one job
            raise _broken(exc)
        self._on_done(tag, fut)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _broken(exc: BaseException) -> CerberusError:
    return CerberusError(f"the post-processing worker processes died ({one_line(exc)}); run again with "
                         "--postproc-workers 0 (postproc_workers=0 in Python), or with more memory")


# ---- the output folder and its markers -------------------------------------------------------------------
def check_output(folder: Path) -> Path:
    """Check that the output folder can hold results, creating nothing: the folder and its ``done/`` appear with
    the first result written (every writer creates its folder), so a run that fails before any result leaves no
    folder behind. One-line errors when it (or its ``done/``) is a file, or it cannot be created or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CerberusError(f"--output {folder} exists and is not a folder; choose a folder path")
    if (folder / MARKER_DIR).exists() and not (folder / MARKER_DIR).is_dir():
        raise CerberusError(f"{folder / MARKER_DIR} is not a folder (it holds the completion markers); remove it "
                            "or choose another --output")
    nearest = folder.absolute()
    while not nearest.exists():  # the folder that exists, in which the output folder will be created
        nearest = nearest.parent
    if not nearest.is_dir():
        raise CerberusError(f"cannot create --output {folder}: {nearest} is not a folder; choose another path")
    if not all(os.access(p, os.W_OK | os.X_OK) for p in (nearest, folder / MARKER_DIR) if p.exists()):
        raise CerberusError(f"--output {folder} is not writable; choose another path")
    return folder


# ---- what made a result: the run key ------------------------------------------------------------------------
#: a run key's entries as messages name them
SETTING_NAMES = {"model": "model", "model_id": "model", "window": "window", "tta": "tta", "precision": "precision",
                 "mpp": "mpp", "processing_mpp": "mpp", "centroids_only": "centroids-only", "slide": "slide",
                 "size": "slide", "chunks": "chunking", "chunk": "chunking", "chunking": "chunking", "margin_um": "margin-um", "mask": "mask",
                 "heads": "heads"}


def weights_id(model) -> str:
    """A short hash of the model's weights (a result made with other weights is never kept or resumed)."""
    import hashlib

    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_id(path: Path) -> str:
    """``sha1:`` and the hash of a file's contents (a user's mask in a run key: another file, or new contents at the
    same path, is another input). Raises ``OSError`` when the file cannot be read."""
    import hashlib

    return "sha1:" + hashlib.sha1(Path(path).read_bytes()).hexdigest()


def run_key(config, model_id: str, *, window, tta: bool, precision: str, **settings) -> dict:
    """The settings that make a run's results, as JSON gives them back: the model (``config.to_dict()`` and
    ``model_id``, its :func:`weights_id`), the window, ``tta``, the precision used (``auto`` resolved), and the
    run's own ``settings`` (both: the trusted ``heads``; tiles: the images' mpp and ``centroids_only``; slides:
    the slide, its mpp, the chunking and the tissue mask). Tiles record it in their completion marker (``settings``), slides in their
    partial store (and its part known before the slide is opened in their marker, :func:`~.wsi.slide_key`); a
    result recorded with another key is done again. The device, batch size, threads and worker
    counts are not part of it: they do not change a result."""
    key = {"model": config.to_dict(), "model_id": model_id, "window": window, "tta": bool(tta),
           "precision": precision, **settings}
    return json.loads(json.dumps(key))


def changed_settings(recorded, key: dict) -> list[str]:
    """The settings (:data:`SETTING_NAMES`) in which a recorded run key differs from ``key``, in ``key``'s order;
    ``["not recorded"]`` when ``recorded`` is no key (a marker written by an earlier version)."""
    if not isinstance(recorded, dict):
        return ["not recorded"]
    names: list[str] = []
    for k in dict.fromkeys([*key, *recorded]):
        name = SETTING_NAMES.get(k, k)
        if recorded.get(k) != key.get(k) and name not in names:
            names.append(name)
    return names


def redone_line(changed: dict[Path, list[str]]) -> str:
    """One line for the images or slides redone because their results were made with other settings
    (``changed``: what changed per input, :func:`changed_settings`)."""
    names = [Path(p).name for p in changed]
    what = ", ".join(dict.fromkeys(n for c in changed.values() for n in c))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{shown}: made with other settings ({what}); redone"


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


__all__ = ["MARKER_DIR", "NO_GUARD", "SETTING_NAMES", "WorkerPool", "changed_settings", "check_output", "file_id", "echo",
           "marker_path", "one_line", "output_stems", "read_marker", "redone_line", "run_key", "spawn_safe",
           "weights_id", "write_marker"]
