"""A reader on a fixed slide-wide tile grid at one mpp, with prefetching threads (for chunked slide inference).

Reading a region of a slide at an mpp other than a pyramid level's resamples the region as a whole, so a pixel's
value depends slightly on where the region starts. :class:`GridReader` reads (and resamples) fixed tiles of a
slide-wide grid instead and assembles regions from them: a pixel's value then depends only on its position, and two
overlapping regions agree exactly where they overlap.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .readers import Reader

READ_TILE = 512  # pixels per side of the reading grid, at the grid's mpp


class GridReader(Reader):
    """A reader whose pixels at the model's mpp come from a fixed slide-wide grid of ``tile`` x ``tile`` reads.

    Each grid tile is read (and resampled) on its own, so a model pixel's value depends only on its position on
    the slide, never on the region asked for: overlapping regions of two chunks get identical pixels even when
    the slide's mpp differs from the model's. ``prefetch(box)`` queues a box's tiles on ``threads`` reading
    threads; ``release(box)`` forgets them. Other mpps are passed to the wrapped reader.
    """

    def __init__(self, base: Reader, mpp: float, tile: int = READ_TILE, threads: int = 2):
        self.base, self.grid_mpp, self.tile = base, float(mpp), int(tile)
        self.scale = self.grid_mpp / base.mpp  # level-0 pixels per model pixel
        self.mpp, self.dimensions, self.name, self.path = base.mpp, base.dimensions, base.name, base.path
        self.level_dimensions, self.level_downsamples = base.level_dimensions, base.level_downsamples
        self.backend = base.backend
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cerberus-read") if threads > 0 else None
        self._base_lock = threading.Lock() if base.backend not in ("openslide", "array") else None
        self._stats_lock = threading.Lock()
        self._cache: dict[tuple[int, int], Future] = {}
        self._pinned: deque[frozenset] = deque()
        self.read_seconds = 0.0  # time spent reading tiles (in any thread)
        self.wait_seconds = 0.0  # time the caller waited for tiles

    def _keys(self, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
        x0, y0, x1, y1 = box
        t = self.tile
        return [(ty, tx) for ty in range(y0 // t, (y1 - 1) // t + 1) for tx in range(x0 // t, (x1 - 1) // t + 1)]

    def _read_tile(self, key: tuple[int, int]) -> np.ndarray:
        t0 = time.perf_counter()
        ty, tx = key
        loc = (tx * self.tile * self.scale, ty * self.tile * self.scale)
        if self._base_lock is not None:
            with self._base_lock:
                arr = self.base.read_region(loc, (self.tile, self.tile), self.grid_mpp)
        else:
            arr = self.base.read_region(loc, (self.tile, self.tile), self.grid_mpp)
        with self._stats_lock:
            self.read_seconds += time.perf_counter() - t0
        return arr

    def _get(self, key: tuple[int, int]) -> Future:
        fut = self._cache.get(key)
        if fut is None:
            if self._pool is not None:
                fut = self._pool.submit(self._read_tile, key)
            else:
                fut = Future()
                fut.set_result(self._read_tile(key))
            self._cache[key] = fut
        return fut

    def _evict(self) -> None:
        keep = frozenset().union(*self._pinned) if self._pinned else frozenset()
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]

    def prefetch(self, box: tuple[int, int, int, int]) -> None:
        """Start reading the tiles of ``box`` = (x0, y0, x1, y1) in model pixels; they stay until released."""
        keys = self._keys(box)
        self._pinned.append(frozenset(keys))
        for k in keys:
            self._get(k)

    def release(self, box: tuple[int, int, int, int]) -> None:
        keys = frozenset(self._keys(box))
        if keys in self._pinned:
            self._pinned.remove(keys)
        self._evict()

    def read_region(self, location, size, mpp=None) -> np.ndarray:
        if mpp is None or not math.isclose(float(mpp), self.grid_mpp, rel_tol=1e-9):
            return self.base.read_region(location, size, mpp)
        w, h = (int(v) for v in size)
        x, y = round(location[0] / self.scale), round(location[1] / self.scale)
        out = np.empty((h, w, 3), np.uint8)
        t0 = time.perf_counter()
        for key in self._keys((x, y, x + w, y + h)):
            arr = self._get(key).result()
            ty, tx = key
            ax0, ay0 = tx * self.tile, ty * self.tile
            x0, y0, x1, y1 = max(x, ax0), max(y, ay0), min(x + w, ax0 + self.tile), min(y + h, ay0 + self.tile)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = arr[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
        self.wait_seconds += time.perf_counter() - t0
        self._evict()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._cache.clear()


__all__ = ["READ_TILE", "GridReader"]
