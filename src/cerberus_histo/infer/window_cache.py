"""Each window of a slide through the network once: the outputs a later chunk will need, kept until it runs.

The chunks of a slide run in raster order, and the network regions of neighbours overlap (:mod:`.chunks`): the
windows along a chunk's right and bottom edges are also windows of the chunks to its right and below. A
:class:`WindowCache` holds, for every window the engine runs (:meth:`~.engine.Predictor.predict_region` with
``cache=``), the window's outputs (its float16 output crop of each dense head, its whole cell map of each class
head) when a chunk still to come covers that window, and only until the last such chunk has run. The engine then
stitches them instead of running the window again. What is kept at any time is about one band of two window rows
across the slide (the seam with the next row of chunks) and two window columns beside the current chunk.

Kept outputs stay in memory while they fit ``budget_bytes`` (what the memory budget leaves beside a chunk); the
rest go to uncompressed ``.npy`` files in ``spill`` (a folder beside the partial store, removed when the slide is
finished or its run stops), read back once needed. Nothing is pickled.

A window is named by its place on the slide's window grid (:func:`window_key`): the window and its output crop in
model pixels of the slide. The outputs of a window depend on that place alone (the reading grid is the slide's),
so a kept window is exactly the window the later chunk would have run. A resumed run starts with an empty cache:
it recomputes the windows its first chunks share with chunks committed before the stop, and nothing more.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .chunks import Chunk

Key = tuple[int, int, int, int, int, int, int, int]


def window_key(origin: tuple[int, int], window: Sequence[int], crop: Sequence[int]) -> Key:
    """A window of a region at ``origin`` (model px of the slide) by its place on the slide: its input box and its
    output crop, both ``(x0, y0, x1, y1)`` in slide model pixels."""
    x, y = origin
    return (x + window[0], y + window[1], x + window[2], y + window[3], x + crop[0], y + crop[1], x + crop[2],
            y + crop[3])


class WindowCache:
    """The outputs of windows that chunks still to run will need (see the module docstring).

    Args:
        chunks: the chunks of this run, in the order they run (each ``net`` box is what its network covers).
        budget_bytes: memory the kept outputs may take; beyond it they are written to ``spill``.
        spill: the folder for kept outputs over the budget (created when first needed, removed by :meth:`close`).
    """

    def __init__(self, chunks: Sequence[Chunk], budget_bytes: int, spill: Path):
        self.nets = np.array([c.net for c in chunks], np.int64).reshape(-1, 4)
        self.budget = max(0, int(budget_bytes))
        self.spill = Path(spill)
        self.position = 0  # the chunk running now
        self.memory: dict[Key, tuple[int, dict[str, np.ndarray]]] = {}  # key -> (last user, outputs)
        self.files: dict[Key, tuple[int, Path]] = {}
        self.held = 0  # bytes in memory
        self.peak = 0
        self.kept = self.spilled = self.reused = 0
        shutil.rmtree(self.spill, ignore_errors=True)  # a stopped run's: its chunks are recomputed

    def start(self, position: int) -> None:
        """Chunk ``position`` (in the run's order) runs next: drop what no chunk from it on needs."""
        self.position = position
        for key in [k for k, (last, _) in self.memory.items() if last < position]:
            self.held -= _nbytes(self.memory.pop(key)[1])
        for key in [k for k, (last, _) in self.files.items() if last < position]:
            self.files.pop(key)[1].unlink(missing_ok=True)

    def _last_user(self, key: Key) -> int:
        """The last chunk after the running one whose network region covers the window's output crop, or -1."""
        x0, y0, x1, y1 = key[4:]
        n = self.nets
        later = np.flatnonzero((n[:, 0] < x1) & (n[:, 2] > x0) & (n[:, 1] < y1) & (n[:, 3] > y0))
        later = later[later > self.position]
        return int(later[-1]) if len(later) else -1

    def __contains__(self, key: Key) -> bool:
        return key in self.memory or key in self.files

    def wants(self, key: Key) -> bool:
        """Whether a chunk still to run needs this window (so :meth:`put` keeps it)."""
        return self._last_user(key) >= 0

    def put(self, key: Key, outputs: dict[str, np.ndarray]) -> None:
        """Keep a window's outputs (arrays it may own: pass copies) for the chunks still to run that need it."""
        last = self._last_user(key)
        if last < 0:
            return
        size = _nbytes(outputs)
        self.kept += 1
        if self.held + size <= self.budget:
            self.memory[key] = (last, outputs)
            self.held += size
            self.peak = max(self.peak, self.held)
            return
        self.spill.mkdir(parents=True, exist_ok=True)
        path = self.spill / ("_".join(map(str, key)) + ".npz")
        with open(path, "wb") as f:
            np.savez(f, **outputs)
        self.files[key] = (last, path)
        self.spilled += 1

    def get(self, key: Key) -> dict[str, np.ndarray]:
        """A kept window's outputs (read back from ``spill`` when they were written there)."""
        self.reused += 1
        if key in self.memory:
            return self.memory[key][1]
        with np.load(self.files[key][1], allow_pickle=False) as z:
            return {name: z[name] for name in z.files}

    def stats(self) -> dict[str, int]:
        """What the cache did: windows kept, of which spilled to disk, windows reused, peak bytes in memory."""
        return {"kept": self.kept, "spilled": self.spilled, "reused": self.reused, "peak_bytes": self.peak}

    def close(self) -> None:
        """Drop everything kept and remove the spill folder."""
        self.memory.clear()
        self.files.clear()
        self.held = 0
        shutil.rmtree(self.spill, ignore_errors=True)


def _nbytes(outputs: dict[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in outputs.values())


__all__ = ["WindowCache", "window_key"]
