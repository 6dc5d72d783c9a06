"""Whole-slide inference in chunks with bounded memory, exact border merging and resume.

Design (see ``docs/wsi.md``):

* **Global grid.** The slide, at the model's mpp, is cut into square *chunks* of ``chunk`` model pixels (a
  multiple of the engine's output window ``output``), each predicted as its *extended* region: the chunk grown by
  ``margin`` (``margin_um`` rounded up to a multiple of ``output``) on every side, clipped to the slide. Extended
  regions start on multiples of ``output``, and the geometry does not shrink windows (``fit=False``), so every
  window of every chunk is a window of one slide-wide grid: where two extended regions overlap they run the same
  windows on the same pixels (:class:`GridReader` makes each model pixel depend only on its global position), and
  get the same probabilities.
* **Merge rule.** The extended region is post-processed as a tile. An instance (nucleus, gland, lumen) belongs to
  the chunk whose core holds its centroid, and is dropped there if it touches a border of the extended region
  that is not the slide's border (it is larger than the margin; such drops are counted and reported). Any object
  whose extent from its centroid is below the margin is therefore whole in its owner's extended region, exactly
  as it is in a one-pass prediction of the slide, and written once.
* **Ids.** An instance's id is its first pixel in raster order on the slide's model-pixel grid (``y * width + x
  + 1``): the same in every chunk that sees it whole, so a lumen's ``parent_gland`` names its gland's id even when
  the two are owned by different chunks.
* **Tissue.** Chunks and windows whose output crop (grown by ``TISSUE_PAD_UM``) holds no tissue in the mask are
  never run. The tissue-class map is kept at the network's cell resolution (16 model px) as ``uint8``.
* **Pipeline.** Tiles of the next chunk are read by threads while the network runs on this one; post-processing
  runs in ``postproc_workers`` processes; the main process appends each finished chunk's records to the store.
* **Resume.** Records go to ``{stem}.db.partial``; each chunk's rows and its row in ``cerberus_chunks`` (with its
  tissue-class cells) are committed in one transaction, in chunk order. A re-run with the same settings skips the
  committed chunks; the finished store is renamed to ``{stem}.db`` after the other outputs are written, and the
  completion marker ``done/{stem}.json`` comes last.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CerberusError
from ..io.files import atomic_write_bytes
from ..io.grid import GridReader
from ..postproc import Instances, TaskResult, postprocess
from .tiling import Geometry, Tile, TilePlan, plan_tiles

MASK_MPP, MASK_MAX_SIDE = 8.0, 2048  # computed tissue masks: 8 um/px, at most 2048 px per side
DEFAULT_CHUNK = 4096  # model px, for a predictor without a runtime (and so without a memory budget)
TISSUE_PAD_UM = 32.0  # a window (chunk) runs when its output crop grown by this much touches tissue
CHUNKS_TABLE = ("CREATE TABLE IF NOT EXISTS cerberus_chunks (idx INTEGER PRIMARY KEY, objects INTEGER, "
                "dropped INTEGER, windows INTEGER, cell_y INTEGER, cell_x INTEGER, cell_h INTEGER, cell_w INTEGER, "
                "cells BLOB)")
INSTANCE_TASKS = ("gland", "lumen", "nuclei")


# ---- the chunk grid --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One chunk: ``core`` and ``ext`` (the core grown by the margin, clipped to the slide) as ``(x0, y0, x1,
    y1)`` in model pixels of the slide."""

    index: int
    core: tuple[int, int, int, int]
    ext: tuple[int, int, int, int]

    @property
    def region(self) -> tuple[int, int, int, int]:
        """The extended region as ``(x, y, width, height)``, as the engine takes it."""
        x0, y0, x1, y1 = self.ext
        return x0, y0, x1 - x0, y1 - y0


def plan_chunks(width: int, height: int, output: int, chunk: int, margin: int) -> list[Chunk]:
    """Chunks of a ``width x height`` (model px) slide, row-major; ``chunk`` and ``margin`` are rounded up to
    multiples of the window ``output`` (chunk >= one window, margin >= 0)."""
    c = max(1, math.ceil(chunk / output)) * output
    m = max(0, math.ceil(margin / output)) * output
    out = []
    for y0 in range(0, height, c):
        for x0 in range(0, width, c):
            core = (x0, y0, min(x0 + c, width), min(y0 + c, height))
            ext = (max(x0 - m, 0), max(y0 - m, 0), min(x0 + c + m, width), min(y0 + c + m, height))
            out.append(Chunk(len(out), core, ext))
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


def _dense_channels(config, heads: Sequence[str]) -> int:
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


# ---- post-processing one chunk (a worker's task: no torch) -----------------------------------------------
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


def finish_chunk(job: dict) -> dict:
    """Post-process one chunk's extended region and keep what the chunk owns (see the module docstring).

    ``job``: ``chunk``, ``probs`` (head -> map of the extended region), ``mpp`` (model), ``cell``, ``size``
    (slide ``(width, height)`` in model px), ``slide_mpp``, ``config``. Returns ``records`` (task ->
    :class:`~cerberus_histo.io.export.AnnotationRecords` in level-0 pixels), ``cells`` (uint8 tissue classes of
    the core's cells, or None), ``cell_origin`` (row, col of its first cell), ``dropped`` (owned instances cut
    by the extended border) and ``seconds``.
    """
    from ..io.export import annotation_records

    t0 = time.perf_counter()
    chunk: Chunk = job["chunk"]
    width, height = job["size"]
    ex0, ey0, ex1, ey1 = chunk.ext
    cx0, cy0, cx1, cy1 = chunk.core
    probs = job["probs"]
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
    records = annotation_records(owned, job["config"], job["slide_mpp"], scale, (ex0 * scale, ey0 * scale))
    cells = None
    cell = job["cell"]
    origin = (cy0 // cell, cx0 // cell)
    if "tissue-class" in probs:
        cmap = np.argmax(probs["tissue-class"], axis=0).astype(np.uint8)
        r0, c0 = (cy0 - ey0) // cell, (cx0 - ex0) // cell
        cells = np.ascontiguousarray(cmap[r0:r0 + math.ceil((cy1 - cy0) / cell), c0:c0 + math.ceil((cx1 - cx0) / cell)])
    return {"index": chunk.index, "records": records, "cells": cells, "cell_origin": origin, "dropped": dropped,
            "seconds": time.perf_counter() - t0}


# ---- one slide -------------------------------------------------------------------------------------------
@dataclass
class WSIResult:
    """What :func:`predict_slide` produced for one slide.

    Attributes:
        slide: the slide file.
        paths: output name -> file: ``store`` (``{stem}.db``), ``geojson``, ``summary_json``, ``summary_csv``,
            ``thumbnail`` (overlay PNG), ``mask`` (tissue mask PNG), ``tissue`` (class map PNG, one pixel per
            cell, values = class index), ``metadata`` (JSON), ``marker`` (``done/{stem}.json``).
        summary: the summary (see :func:`~cerberus_histo.io.slide_outputs.summarize_store`).
        counts: objects per task in the store.
        timings: seconds per stage of this run (``read``, ``infer``, ``postprocess``, ``write``, ``outputs``,
            ``total``) and ``device_utilisation``, the share of the run's wall time the network ran.
        skipped: True when the slide was finished before and nothing was done.
    """

    slide: Path
    paths: dict[str, Path]
    summary: dict
    counts: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

    @property
    def objects(self) -> int:
        return int(sum(v for k, v in self.counts.items() if k != "tissue"))


def output_paths(output: Path, stem: str) -> dict[str, Path]:
    o = Path(output)
    return {"store": o / f"{stem}.db", "geojson": o / f"{stem}.geojson", "summary_json": o / f"{stem}_summary.json",
            "summary_csv": o / f"{stem}_summary.csv", "thumbnail": o / f"{stem}_thumbnail.png",
            "mask": o / f"{stem}_mask.png", "tissue": o / f"{stem}_tissue.png",
            "metadata": o / f"{stem}_metadata.json", "marker": o / "done" / f"{stem}.json"}


def software_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"cerberus_histo": __version__, "python": sys.version.split()[0]}
    for dist in ("numpy", "scipy", "scikit-image", "opencv-python-headless", "shapely", "openslide-python",
                 "openslide-bin", "tiffslide", "torch", "dask", "distributed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _echo(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _open_partial(path: Path, meta: dict, echo: Callable[[str], None]):
    """The partial store at ``path`` for this run: reopened when its run settings match, else started afresh."""
    from ..io.store import AnnotationStore

    if path.exists():
        try:
            store = AnnotationStore(path)
            same = store.metadata.get("cerberus_run") == meta["cerberus_run"]
        except CerberusError:
            store, same = None, False
        if same:
            return store
        if store is not None:
            store.close()
        echo(f"{path.name}: partial results of other settings (model, chunking, mask); starting this slide again")
        path.unlink()
    store = AnnotationStore(path, meta)
    with store.connection:
        store.connection.execute(CHUNKS_TABLE)
    return store


def _open_store(final: Path, partial: Path, meta: dict, echo: Callable[[str], None]):
    """The store to continue: a finished ``final`` store of the same run whose other outputs or marker are missing
    (a kill after the rename), else the partial store (see :func:`_open_partial`)."""
    from ..io.store import AnnotationStore

    if final.is_file() and not partial.exists():
        try:
            store = AnnotationStore(final)
            if store.metadata.get("cerberus_run") == meta["cerberus_run"]:
                return store
            store.close()
        except CerberusError:
            pass
        final.unlink()
    return _open_partial(partial, meta, echo)


def _class_map(con, shape: tuple[int, int]) -> np.ndarray | None:
    """The tissue-class cells of every committed chunk, pasted into one ``uint8`` map (None without a tissue head)."""
    out = np.zeros(shape, np.uint8)
    any_cells = False
    for y, x, h, w, blob in con.execute("SELECT cell_y, cell_x, cell_h, cell_w, cells FROM cerberus_chunks"):
        if blob is not None:
            out[y:y + h, x:x + w] = np.frombuffer(zlib.decompress(blob), np.uint8).reshape(h, w)
            any_cells = True
    return out if any_cells else None


def _mask_cells(mask: np.ndarray, mask_mpp: float, shape: tuple[int, int], cell_l0: float,
                slide_mpp: float) -> np.ndarray:
    """The tissue mask sampled at the centre of each class-map cell."""
    f = cell_l0 * slide_mpp / mask_mpp  # mask pixels per cell
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * f).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * f).astype(np.int64), mask.shape[1] - 1)
    inside_r = (np.arange(shape[0]) + 0.5) * f < mask.shape[0]
    inside_c = (np.arange(shape[1]) + 0.5) * f < mask.shape[1]
    return mask[np.ix_(rows, cols)] & inside_r[:, None] & inside_c[None, :]


def predict_slide(predictor, config, slide: str | Path, output: str | Path, *, stem: str | None = None,
                  mpp: float | None = None, mask: str | Path | Callable[[], Path | None] | None = None,
                  chunk_size: int | None = None,
                  margin_um: float = 256.0, centroids_only: bool = False, postproc_workers: int | None = None,
                  read_threads: int = 2, model_id: str = "", metadata: dict | None = None, progress: bool = True,
                  echo: Callable[[str], None] = _echo, on_commit: Callable[[int], None] | None = None) -> WSIResult:
    """Predict one slide in chunks and write its outputs into ``output`` (see the module docstring).

    Args:
        predictor: a :class:`~.engine.Predictor` whose geometry has ``fit=False`` and an output side that is a
            multiple of its ``cell`` (see :func:`make_predictor`), or any object with the same ``mpp``, ``cell``,
            ``geometry``, ``predict_region(reader, region, keep=..., fit=...)`` and optionally ``runtime``.
        config: the model's :class:`~cerberus_histo.config.ModelConfig` (class names and colours).
        slide: the slide file; ``mpp`` overrides its metadata's resolution.
        mask: a tissue mask image of the slide (any size), or a function giving its path once the slide has
            opened; default (None): computed (:func:`~cerberus_histo.io.tissue.tissue_mask`).
        chunk_size: chunk side in model pixels (rounded up to whole windows); memory grows with its square.
            Default: the largest that fits the predictor's memory budget (:meth:`~.runtime.Runtime.chunk_for`).
            Along an axis that one chunk covers, windows are fitted to the slide as for tiles.
        margin_um: context around each chunk (rounded up to whole windows); objects larger than this from their
            centroid are cut and dropped (counted in the metadata).
        postproc_workers: post-processing processes (0: in this process; default: the runtime's).
        model_id: identifies the weights, so a partial result of other weights is never resumed.
        on_commit: called with each chunk's index after its records are committed (tests interrupt runs here).
    """

    from ..io.slides import open_slide
    from ..io.tissue import load_mask, mask_tiles, save_mask, tissue_mask
    from .tiles import check_output

    t_start = time.perf_counter()
    slide = Path(slide)
    stem = stem or slide.stem
    output = check_output(Path(output))
    paths = output_paths(output, stem)
    if paths["marker"].is_file():
        try:
            done = json.loads(paths["marker"].read_text())
            return WSIResult(slide, {k: Path(v) for k, v in done["files"].items()}, done["summary"], done["counts"],
                             skipped=True)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable marker: do the slide again
    geometry = predictor.geometry
    cell, out_side = int(predictor.cell), int(geometry.output_shape)
    if geometry.fit or out_side % cell:
        raise CerberusError(f"whole-slide windows must keep their size and an output side that is a multiple of "
                            f"{cell}; got {geometry}. Build the predictor with make_predictor")
    if not margin_um > 0:
        raise CerberusError(f"--margin-um must be > 0 (context around each chunk, e.g. 256), got {margin_um}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise CerberusError(f"--chunk-size must be a positive number of model pixels, got {chunk_size!r}")
    runtime = getattr(predictor, "runtime", None)
    if postproc_workers is None:
        postproc_workers = 0 if runtime is None else runtime.postproc_workers
    timings = {"mask": 0.0, "read": 0.0, "infer": 0.0, "forward": 0.0, "postprocess": 0.0, "write": 0.0,
               "outputs": 0.0}
    reader = open_slide(slide, mpp)
    grid = GridReader(reader, predictor.mpp, threads=read_threads)
    pool = store = None
    try:
        slide_mpp = reader.mpp
        scale = predictor.mpp / slide_mpp  # level-0 px per model px
        width, height = (max(1, round(v / scale)) for v in reader.dimensions)
        t0 = time.perf_counter()
        if callable(mask):
            mask = mask()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if mask is not None:
                tmask, mask_mpp = load_mask(mask, reader)
            else:  # 8 um/px, coarser for slides over MASK_MAX_SIDE mask pixels: bounded memory
                side_um = max(reader.dimensions) * slide_mpp
                tmask, mask_mpp = tissue_mask(reader, max(MASK_MPP, side_um / MASK_MAX_SIDE))
        for w in caught:
            echo(f"warning: {w.message}")
        save_mask(paths["mask"], tmask)
        margin_px = math.ceil(margin_um / predictor.mpp / out_side) * out_side
        if chunk_size is None and runtime is None:
            chunk_size = DEFAULT_CHUNK
        elif chunk_size is None:
            chunk_size = replace(runtime, postproc_workers=postproc_workers).chunk_for(
                width, height, out_side, margin_px, _dense_channels(config, predictor.heads))
        chunks = plan_chunks(width, height, out_side, chunk_size, margin_px)
        fit = (width <= chunks[0].core[2], height <= chunks[0].core[3])  # one chunk along x / y
        pad = TISSUE_PAD_UM / slide_mpp
        boxes = np.array([(c.core[0] * scale - pad, c.core[1] * scale - pad, c.core[2] * scale + pad,
                           c.core[3] * scale + pad) for c in chunks], np.float64).reshape(-1, 4)
        tissue_chunks = [c for c, k in zip(chunks, mask_tiles(tmask, mask_mpp, boxes, slide_mpp), strict=True) if k]
        timings["mask"] = time.perf_counter() - t0
        chunk_px = max(1, math.ceil(chunk_size / out_side)) * out_side  # as plan_chunks rounds them
        run = {"model": config.to_dict(), "model_id": model_id, "slide": slide.name, "size": list(reader.dimensions),
               "mpp": slide_mpp, "processing_mpp": predictor.mpp, "window": [geometry.input_shape, out_side],
               "chunks": len(chunks), "chunk": chunk_px, "margin_um": margin_um,
               "mask": hashlib.sha1(np.packbits(tmask).tobytes()).hexdigest(),
               "tta": bool(getattr(predictor, "tta", False)), "precision": getattr(predictor, "precision", "")}
        run = json.loads(json.dumps(run))  # as the store gives it back (lists, not tuples)
        meta = {"slide": slide.name, "mpp": slide_mpp, "processing_mpp": predictor.mpp, "scale": scale,
                "offset": [0.0, 0.0], "level0_dimensions": list(reader.dimensions),
                "software": {"cerberus_histo": __version__}, "model": config.to_dict(), "cerberus_run": run}
        partial = output / f"{stem}.db.partial"
        store = _open_store(paths["store"], partial, meta, echo)
        con = store.connection
        done_before = {int(r[0]) for r in con.execute("SELECT idx FROM cerberus_chunks")}
        todo = [c for c in tissue_chunks if c.index not in done_before]
        plan = planner(predictor)
        windows_total = sum(len(plan(c.region[2], c.region[3], fit)) for c in tissue_chunks)
        if postproc_workers > 0 and multiprocessing.current_process().daemon:
            postproc_workers = 0  # a daemonic process (e.g. a dask worker) cannot have children
        if postproc_workers > 0 and todo:
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(postproc_workers, mp_context=multiprocessing.get_context("spawn"))
        echo(f"{stem}: {width} x {height} model px, {len(tissue_chunks)} of {len(chunks)} chunks of {chunk_px} px "
             f"with tissue (margin {margin_px} px), windows {plan(*chunks[0].region[2:], fit).window_shape[::-1]}")
        windows_run = _run_chunks(predictor, config, grid, store, pool, postproc_workers, todo, len(tissue_chunks),
                                  stem, tmask, mask_mpp, (width, height), fit, timings, progress, on_commit)
        t_loop = time.perf_counter()

        summary = _write_outputs(store, config, reader, paths, tmask, mask_mpp, int(predictor.cell), scale,
                                 (height, width), centroids_only)
        stats = con.execute("SELECT COALESCE(SUM(dropped), 0), COALESCE(SUM(windows), 0) FROM cerberus_chunks"
                            ).fetchone()
        timings["outputs"] = time.perf_counter() - t_loop
        timings["read"] += grid.read_seconds
        timings["total"] = time.perf_counter() - t_start
        timings["device_utilisation"] = timings["forward"] / timings["total"] if timings["total"] else 0.0
        if stats[0]:
            echo(f"warning: {stem}: {stats[0]} objects larger than the margin were cut at chunk borders and "
                 f"dropped; raise --margin-um (now {margin_um:g})")
        info = {**(metadata or {}), "slide": str(slide), "stem": stem, "level0_dimensions": list(reader.dimensions),
                "mpp": slide_mpp, "mpp_source": "--mpp" if mpp is not None else "metadata",
                "processing_mpp": predictor.mpp, "model": config.to_dict(), "model_id": model_id,
                "window": {"input": geometry.input_shape, "output": out_side},
                "chunk_size": chunk_px, "margin_um": margin_um, "margin_px": margin_px,
                "chunks": {"total": len(chunks), "with_tissue": len(tissue_chunks), "done_before": len(done_before),
                           "done_now": len(todo)},
                "windows": {"run": int(stats[1]), "in_tissue_chunks": windows_total, "run_now": windows_run},
                "dropped_large_objects": int(stats[0]),
                "tissue_mask": {"source": str(mask) if mask is not None else "computed", "mpp": mask_mpp},
                "counts": summary["counts"], "software": software_versions(),
                "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        atomic_write_bytes(paths["metadata"], json.dumps(info, indent=2).encode())
        store.close()
        store = None
        if partial.exists():
            os.replace(partial, paths["store"])
        files = {k: str(v) for k, v in paths.items() if k != "marker" and v.exists()}
        marker = {"slide": str(slide), "files": files, "counts": summary["counts"], "summary": summary,
                  "timings_s": info["timings_s"]}
        atomic_write_bytes(paths["marker"], json.dumps(marker, indent=2).encode())
        t = timings
        echo(f"{stem}: {sum(v for k, v in summary['counts'].items() if k != 'tissue')} objects in {t['total']:.1f} s "
             f"(read {t['read']:.1f} s, infer {t['infer']:.1f} s, post-process {t['postprocess']:.1f} s, write "
             f"{t['write']:.1f} s, outputs {t['outputs']:.1f} s; device busy {t['device_utilisation']:.0%})")
        return WSIResult(slide, {k: Path(v) for k, v in files.items()} | {"marker": paths["marker"]}, summary,
                         summary["counts"], timings)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if store is not None:
            store.close()
        grid.close()
        reader.close()


def _write_outputs(store, config, reader, paths: dict[str, Path], mask: np.ndarray, mask_mpp: float, cell: int,
                   scale: float, size: tuple[int, int], centroids_only: bool) -> dict:
    """Once every chunk is in: add the tissue-class regions (once, flagged in the same transaction), then write the
    GeoJSON, summary, tissue-class PNG and thumbnail from the store; returns the summary."""
    from ..io.export import annotation_records
    from ..io.slide_outputs import render_thumbnail, summarize_store, write_geojson_from_store, write_png, write_summary

    con, slide_mpp = store.connection, reader.mpp
    cshape = (math.ceil(size[0] / cell), math.ceil(size[1] / cell))
    class_map = _class_map(con, cshape)
    if class_map is not None:
        class_map[~_mask_cells(mask, mask_mpp, cshape, cell * scale, slide_mpp)] = 0
    if store.metadata.get("cerberus_state") != "complete":
        extra = [("REPLACE INTO metadata (key, value) VALUES (?, ?)", ("cerberus_state", json.dumps("complete")))]
        tissue = {}
        if class_map is not None and any(t.name == "tissue" for t in config.tasks):
            tissue = annotation_records({"tissue": TaskResult(class_map=class_map)}, config, slide_mpp, scale,
                                        (0.0, 0.0), (reader.dimensions[1] / scale, reader.dimensions[0] / scale),
                                        cell)  # regions clipped to the slide's level-0 extent
        store.append(tissue, extra=extra)
    write_geojson_from_store(paths["geojson"], con, config, centroids_only)
    summary = summarize_store(con, config, class_map, cell * scale, slide_mpp, float(mask.sum()) * mask_mpp ** 2)
    write_summary(paths["summary_json"], paths["summary_csv"], summary)
    if class_map is not None:
        write_png(paths["tissue"], class_map)
    ideal = max(slide_mpp, max(reader.dimensions) * slide_mpp / 2048)  # <= 2048 px per side
    levels = [m for m in reader.level_mpps if m >= ideal * 0.99]
    thumb = reader.thumbnail(min(levels) if levels else ideal)  # a pyramid level when one is that coarse
    write_png(paths["thumbnail"], render_thumbnail(thumb, thumb.shape[1] / reader.dimensions[0], con, config,
                                                   class_map, cell * scale))
    return summary


def _run_chunks(predictor, config, grid: GridReader, store, pool, workers: int, todo: list[Chunk], total: int,
                stem: str, mask: np.ndarray, mask_mpp: float, size: tuple[int, int], fit: tuple[bool, bool],
                timings: dict[str, float], progress: bool, on_commit: Callable[[int], None] | None) -> int:
    """Predict, post-process and commit the ``todo`` chunks in order, overlapping reading (``grid``'s threads),
    the network (here) and post-processing (``pool`` of ``workers`` processes, or here when None); returns the
    windows run. At most ``workers`` chunks wait for post-processing while the next one is predicted."""
    from tqdm import tqdm

    geometry, plan = predictor.geometry, planner(predictor)
    scale = predictor.mpp / grid.mpp
    pad = TISSUE_PAD_UM / grid.mpp
    bar = tqdm(total=total, initial=total - len(todo), unit="chunk", desc=stem, disable=not progress, leave=False,
               file=sys.stderr)
    pending: deque = deque()
    windows_run = 0

    def commit(item, windows: int) -> None:
        res = item.result() if isinstance(item, Future) else item
        t1 = time.perf_counter()
        cells, (cy, cx) = res["cells"], res["cell_origin"]
        blob = None if cells is None else zlib.compress(cells.tobytes(), 6)
        h, w = (0, 0) if cells is None else cells.shape
        n = sum(len(r) for r in res["records"].values())
        store.append(res["records"], extra=[("INSERT INTO cerberus_chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                             (res["index"], n, res["dropped"], windows, cy, cx, h, w, blob))])
        timings["write"] += time.perf_counter() - t1
        timings["postprocess"] += res["seconds"]
        bar.update()
        if on_commit is not None:
            on_commit(res["index"])

    try:
        if todo:
            grid.prefetch(read_box(todo[0], plan, fit))
        for i, chunk in enumerate(todo):
            if i + 1 < len(todo):
                grid.prefetch(read_box(todo[i + 1], plan, fit))
            keep = window_keeper(mask, mask_mpp, grid.mpp, scale, chunk.ext[:2], geometry.margin, pad)
            pred = predictor.predict_region(grid, chunk.region, keep=keep, fit=fit)
            grid.release(read_box(chunk, plan, fit))
            timings["infer"] += pred.timings.get("forward", 0.0) + pred.timings.get("stitch", 0.0)
            timings["forward"] += pred.timings.get("forward", 0.0)
            windows_run += pred.windows
            job = {"chunk": chunk, "probs": pred.probs, "mpp": predictor.mpp, "cell": int(predictor.cell),
                   "size": size, "slide_mpp": grid.mpp, "config": config}
            if pool is None:
                commit(finish_chunk(job), pred.windows)
            else:
                pending.append((pool.submit(finish_chunk, job), pred.windows))
                del job, pred  # the worker has its copy; bound what this process holds
                while len(pending) > workers:
                    commit(*pending.popleft())
        while pending:
            commit(*pending.popleft())
    finally:
        bar.close()
    return windows_run


# ---- a model ---------------------------------------------------------------------------------------------
def make_predictor(model, *, input_shape: int | None = None, output_shape: int | None = None,
                   batch_size: int | None = None, device: str = "auto", precision: str = "auto", tta: bool = False,
                   threads: int | None = None, postproc_workers: int | None = None, memory_gb: float | None = None):
    """A :class:`~.engine.Predictor` for whole slides: windows of ``input_shape`` (default 1024) keeping their
    central ``output_shape`` (default ``input_shape - 304``, a multiple of the encoder stride), on one slide-wide
    grid, and float16 probability maps (half the memory of a chunk). Settings left ``None``/``auto`` are chosen
    for the machine (:func:`~.runtime.plan_runtime`; ``predictor.runtime.line()`` states them)."""
    from .engine import Predictor
    from .runtime import plan_runtime

    cell = int(model.encoder.strides[-1])
    i = int(input_shape or 1024)
    o = int(output_shape if output_shape is not None else (i - 304) // cell * cell)
    if o % cell:
        raise CerberusError(f"--output-shape ({o}) must be a multiple of the encoder stride ({cell}) for whole "
                            f"slides; e.g. {max(cell, o // cell * cell)}")
    try:
        geometry = Geometry(i, o, fit=False, align=cell)
    except ValueError as exc:
        raise CerberusError(f"window geometry: {exc}") from None
    runtime = plan_runtime(model, (i, i), device=device, precision=precision, batch_size=batch_size,
                           threads=threads, postproc_workers=postproc_workers, memory_gb=memory_gb)
    return Predictor(model, geometry, tta=tta, prob_dtype=np.float16, runtime=runtime)


def predict_wsi(model, slide: str | Path, output: str | Path = "cerberus-wsi", *, mpp: float | None = None,
                mask: str | Path | None = None, chunk_size: int | None = None, margin_um: float = 256.0,
                centroids_only: bool = False, progress: bool = True, predictor=None, **options) -> WSIResult:
    """See :meth:`~cerberus_histo.models.net.Cerberus.predict_wsi`; ``options`` go to :func:`make_predictor`
    (or pass a ready ``predictor``)."""
    if predictor is None:
        predictor = make_predictor(model, **options)
    elif options:
        raise TypeError(f"pass options to make_predictor, not with predictor=: {', '.join(options)}")
    return predict_slide(predictor, model.config, slide, output, mpp=mpp, mask=mask, chunk_size=chunk_size,
                         margin_um=margin_um, centroids_only=centroids_only, progress=progress,
                         model_id=weights_id(model))


def weights_id(model) -> str:
    """A short hash of the model's weights (a partial result of other weights is never resumed)."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
