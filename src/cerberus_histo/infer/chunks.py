"""The chunks of a whole slide: their grid, which windows run, and what each chunk owns (stages 1 and 3 of
:mod:`.wsi`).

* **Global grid.** The slide, at the model's mpp, is cut into square *chunks* of ``chunk`` model pixels (a
  multiple of the engine's output window ``output``). A chunk is post-processed as its *extended* region: the chunk
  grown by ``margin`` (``margin_um``, rounded up to a multiple of the tissue class maps' cell) on every side,
  clipped to the slide. The network covers the extended region with windows of one slide-wide grid (output crops
  at multiples of ``output``; the geometry does not shrink windows, ``fit=False``), its *network region*: where the
  regions of two chunks overlap they hold the same windows on the same pixels
  (:class:`~cerberus_histo.io.grid.GridReader` makes each model pixel depend only on its global position), and
  each such window runs once: chunks run in raster order and a window a later chunk needs is kept for it
  (:class:`~.window_cache.WindowCache`).
* **Tissue.** Chunks and windows whose output crop (grown by ``TISSUE_PAD_UM``) holds no tissue in the mask are
  never run (:func:`tissue_chunks`, :func:`window_keeper`).
* **Ownership** (:func:`own_chunk`, a worker's task: no torch). The extended region is post-processed as a tile.
  An instance (nucleus, gland, lumen) belongs to the chunk whose core holds its centroid, and is dropped there if
  it touches a border of the extended region that is not the slide's border (it is larger than the margin; such
  drops are counted and reported). Any object whose extent from its centroid is below the margin is therefore
  whole in its owner's extended region, exactly as in a one-pass prediction of the slide, and written once. With
  a user's mask, the owned records are clipped to it (:func:`~cerberus_histo.outputs.records.clip_records`).
* **Ids.** An instance's id is its first pixel in raster order on the slide's model-pixel grid (``y * width + x
  + 1``): the same in every chunk that sees it whole, so a lumen's ``parent_gland`` names its gland's id even when
  the two are owned by different chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..postproc import Instances, TaskResult, postprocess
from .tiling import Tile, TilePlan, plan_tiles

TISSUE_PAD_UM = 32.0  # a window (chunk) runs when its output crop grown by this much touches tissue


@dataclass(frozen=True)
class Chunk:
    """One chunk, boxes ``(x0, y0, x1, y1)`` in model pixels of the slide: ``core`` (what it owns), ``ext`` (the
    core grown by the margin, clipped to the slide: what is post-processed) and ``net`` (``ext`` grown to the
    slide-wide window grid, clipped: what the network's windows cover)."""

    index: int
    core: tuple[int, int, int, int]
    ext: tuple[int, int, int, int]
    net: tuple[int, int, int, int]

    @property
    def region(self) -> tuple[int, int, int, int]:
        """The network's region as ``(x, y, width, height)``, as the engine takes it."""
        x0, y0, x1, y1 = self.net
        return x0, y0, x1 - x0, y1 - y0


def plan_chunks(width: int, height: int, output: int, chunk: int, margin: int, cell: int = 1) -> list[Chunk]:
    """Chunks of a ``width x height`` (model px) slide, row-major: cores of ``chunk`` rounded up to a multiple of the
    window ``output`` (at least one window), extended by ``margin`` rounded up to a multiple of ``cell`` (the
    tissue class maps' cell), and their network regions on the window grid (multiples of ``output``)."""
    c = max(1, math.ceil(chunk / output)) * output
    m = max(0, math.ceil(margin / cell)) * cell
    out = []
    for y0 in range(0, height, c):
        for x0 in range(0, width, c):
            core = (x0, y0, min(x0 + c, width), min(y0 + c, height))
            ext = (max(x0 - m, 0), max(y0 - m, 0), min(x0 + c + m, width), min(y0 + c + m, height))
            net = (ext[0] // output * output, ext[1] // output * output, min(-(-ext[2] // output) * output, width),
                   min(-(-ext[3] // output) * output, height))
            out.append(Chunk(len(out), core, ext, net))
    return out


def ext_maps(chunk: Chunk, probs: dict[str, np.ndarray], cell: int, coarse: Sequence[str]) -> dict[str, np.ndarray]:
    """The maps of ``chunk``'s network region cut to its extended region (views): dense maps by pixel, the
    ``coarse`` ones (class heads: ``C x h x w``, one value per ``cell``) by cell; ``ext`` starts on the cell grid."""
    nx0, ny0 = chunk.net[:2]
    ex0, ey0, ex1, ey1 = (v - o for v, o in zip(chunk.ext, (nx0, ny0, nx0, ny0), strict=True))
    out = {}
    for name, p in probs.items():
        if name in coarse:
            out[name] = p[:, ey0 // cell:-(-ey1 // cell), ex0 // cell:-(-ex1 // cell)]
        else:
            out[name] = p[:, ey0:ey1, ex0:ex1]
    return out


def window_keeper(mask: np.ndarray, mask_mpp: float, slide_mpp: float, scale: float, origin: tuple[int, int],
                  margin: int, pad: float) -> Callable[[Sequence[Tile]], np.ndarray]:
    """``keep`` for :meth:`~.engine.Predictor.predict_region` on a region at ``origin`` (model px, on the window
    grid): a window runs when its whole (unclipped) output crop, the window less its ``margin`` on each side, in
    level-0 pixels (``scale`` per model pixel) grown by ``pad`` level-0 pixels, touches tissue. The decision
    depends only on the window's global position."""
    from ..io.tissue import mask_tiles

    def keep(tiles: Sequence[Tile]) -> np.ndarray:
        boxes = np.array([((origin[0] + t.window[0] + margin) * scale - pad,
                           (origin[1] + t.window[1] + margin) * scale - pad,
                           (origin[0] + t.window[2] - margin) * scale + pad,
                           (origin[1] + t.window[3] - margin) * scale + pad) for t in tiles], np.float64)
        return mask_tiles(mask, mask_mpp, boxes.reshape(-1, 4), slide_mpp)

    return keep


def dense_channels(config, heads: Sequence[str]) -> int:
    """Channels of the dense probability maps of ``heads`` (what a chunk holds per model pixel)."""
    out = 0
    for name in heads:
        task, kind = config.head(name)[0], config.head(name)[1].kind
        out += 0 if kind == "class" else task.num_outputs(kind)
    return out


def planner(predictor) -> Callable[..., TilePlan]:
    """``plan(width, height, fit)`` of a predictor: its own (:meth:`~.engine.Predictor.plan`) or its geometry's."""
    return getattr(predictor, "plan", None) or (lambda w, h, fit=None: plan_tiles(w, h, predictor.geometry, fit))


def read_box(chunk: Chunk, plan: Callable[..., TilePlan], fit: tuple[bool, bool] | None = None
             ) -> tuple[int, int, int, int]:
    """The slide box (model px) the engine reads for ``chunk``'s extended region (``plan``: see :func:`planner`)."""
    x, y, w, h = chunk.region
    rx0, ry0, rx1, ry1 = plan(w, h, fit).read_box
    return x + rx0, y + ry0, x + rx1, y + ry1


def tissue_chunks(chunks: Sequence[Chunk], mask: np.ndarray, mask_mpp: float, slide_mpp: float,
                  scale: float) -> list[Chunk]:
    """The chunks whose core (``scale`` level-0 px per model px) grown by ``TISSUE_PAD_UM`` touches tissue."""
    from ..io.tissue import mask_tiles

    pad = TISSUE_PAD_UM / slide_mpp
    boxes = np.array([(c.core[0] * scale - pad, c.core[1] * scale - pad, c.core[2] * scale + pad,
                       c.core[3] * scale + pad) for c in chunks], np.float64).reshape(-1, 4)
    return [c for c, k in zip(chunks, mask_tiles(mask, mask_mpp, boxes, slide_mpp), strict=True) if k]


def mask_cells(mask: np.ndarray, mask_mpp: float, shape: tuple[int, int], cell_l0: float,
               slide_mpp: float) -> np.ndarray:
    """The tissue mask sampled at the centre of each cell of a class map of ``shape`` (``cell_l0`` level-0 px
    per cell); cells whose centre lies past the mask are outside."""
    f = cell_l0 * slide_mpp / mask_mpp  # mask pixels per cell
    centre_r, centre_c = (np.arange(shape[0]) + 0.5) * f, (np.arange(shape[1]) + 0.5) * f
    rows = np.minimum(centre_r.astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(centre_c.astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)] & (centre_r < mask.shape[0])[:, None] & (centre_c < mask.shape[1])[None, :]


# ---- stage 3: what a chunk owns (a worker's task: no torch) ----------------------------------------------
def _first_pixel_ids(inst_map: np.ndarray, inst: Instances, origin: tuple[int, int], width: int) -> np.ndarray:
    """Slide-wide id of each instance: its first pixel in raster order, ``y * width + x + 1`` (model px)."""
    out = np.zeros(len(inst), np.int64)
    box = inst.bbox.astype(np.int64).reshape(-1, 4)
    for k0 in range(0, len(inst), 512):  # the first row of each instance, 512 instances at a time
        sel = slice(k0, k0 + 512)
        x0, y0, x1 = box[sel, 0], box[sel, 1], box[sel, 2]
        span = int((x1 - x0).max())
        cols = np.minimum(x0[:, None] + np.arange(span)[None, :], inst_map.shape[1] - 1)
        hit = inst_map[y0[:, None], cols] == np.asarray(inst.ids[sel])[:, None]
        out[sel] = (origin[1] + y0) * width + origin[0] + x0 + np.argmax(hit, axis=1) + 1
    return out


def _subset(inst: Instances, keep: np.ndarray, ids: np.ndarray, parents: np.ndarray | None) -> Instances:
    idx = np.flatnonzero(keep)
    return Instances(ids[idx], inst.bbox[idx], inst.centroid[idx], inst.area[idx], [inst.contours[i] for i in idx],
                     inst.types[idx], inst.type_probs[idx], None if parents is None else parents[idx])


def own_chunk(job: dict) -> dict:
    """Post-process one chunk's extended region and keep what the chunk owns (see the module docstring).

    ``job``: ``chunk``, ``probs`` (head -> map of the extended region), ``mpp`` (model), ``cell``, ``size``
    (slide ``(width, height)`` in model px), ``slide_mpp``, ``config``, ``heads`` (the model's trusted heads: the
    maps of any other head are ignored; default every head) and ``region`` (the user's mask around the extended
    region as a shapely geometry in level-0 pixels, or None). Returns ``records`` (task ->
    :class:`~cerberus_histo.outputs.records.AnnotationRecords` in level-0 pixels, inside ``region``), ``cells``
    (uint8 tissue classes of the core's cells, or None), ``cell_origin`` (row, col of its first cell),
    ``dropped`` (owned instances cut by the extended border) and ``seconds``.
    """
    from ..outputs.records import annotation_records, clip_records

    t0 = time.perf_counter()
    chunk: Chunk = job["chunk"]
    width, height = job["size"]
    ex0, ey0, ex1, ey1 = chunk.ext
    cx0, cy0, cx1, cy1 = chunk.core
    heads = job.get("heads") or job["config"].head_names
    probs = {k: v for k, v in job["probs"].items() if k in heads}
    results = postprocess({k: v for k, v in probs.items() if k != "tissue-class"}, job["mpp"])
    owned: dict[str, TaskResult] = {}
    gland_ids: np.ndarray | None = None
    dropped = 0
    for task in ("gland", "lumen", "nuclei"):  # glands first: lumina name their gland's slide-wide id
        res = results.get(task)
        if res is None:
            continue
        inst = res.instances
        ids = _first_pixel_ids(res.inst_map, inst, (ex0, ey0), width)
        if task == "gland":
            gland_ids = np.zeros(int(res.inst_map.max(initial=0)) + 1, np.int64)
            gland_ids[inst.ids] = ids
        parents = None
        if task == "lumen" and gland_ids is not None:
            parents = np.where(inst.parents > 0, gland_ids[np.minimum(inst.parents, len(gland_ids) - 1)], 0)
        gx, gy = inst.centroid[:, 0] + ex0, inst.centroid[:, 1] + ey0
        mine = (gx >= cx0) & (gx < cx1) & (gy >= cy0) & (gy < cy1)
        b = inst.bbox
        cut = (((b[:, 0] <= 0) & (ex0 > 0)) | ((b[:, 1] <= 0) & (ey0 > 0))
               | ((b[:, 2] >= ex1 - ex0) & (ex1 < width)) | ((b[:, 3] >= ey1 - ey0) & (ey1 < height)))
        dropped += int((mine & cut).sum())
        owned[task] = TaskResult(instances=_subset(inst, mine & ~cut, ids, parents))
    scale = job["mpp"] / job["slide_mpp"]
    records = annotation_records(owned, job["config"], job["slide_mpp"], scale, (ex0 * scale, ey0 * scale),
                                 heads=heads)
    if job.get("region") is not None:
        records = {t: clip_records(r, job["region"], job["slide_mpp"]) for t, r in records.items()}
    cells = None
    cell = job["cell"]
    origin = (cy0 // cell, cx0 // cell)
    if "tissue-class" in probs:
        cmap = np.argmax(probs["tissue-class"], axis=0).astype(np.uint8)
        r0, c0 = (cy0 - ey0) // cell, (cx0 - ex0) // cell
        cells = np.ascontiguousarray(cmap[r0:r0 + math.ceil((cy1 - cy0) / cell), c0:c0 + math.ceil((cx1 - cx0) / cell)])
    return {"index": chunk.index, "records": records, "cells": cells, "cell_origin": origin, "dropped": dropped,
            "seconds": time.perf_counter() - t0}


__all__ = ["Chunk", "TISSUE_PAD_UM", "dense_channels", "ext_maps", "mask_cells", "own_chunk", "plan_chunks", "planner",
           "read_box", "tissue_chunks", "window_keeper"]
