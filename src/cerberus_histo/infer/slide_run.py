"""The stages of a slide run (:func:`~.wsi.predict_slide`; stage 1's plan is :mod:`.slide_plan`'s), and its result.

A :class:`SlideRun` carries one slide through them: it skips a slide finished with these settings
(:meth:`~SlideRun.finished`), plans its chunks (:meth:`~SlideRun.plan`, :func:`~.slide_plan.plan_slide`), opens the
partial store (:meth:`~SlideRun.open_store`), predicts each chunk (:meth:`~SlideRun.predict_chunk`) while a
:class:`~.pool.WorkerPool` owns the instances at the seams (:func:`~.chunks.own_chunk`) and this process commits
each chunk to the store in order (:meth:`~SlideRun.commit`), and finishes the outputs (:meth:`~SlideRun.finish`,
:func:`finish_slide`): metadata, the store renamed to ``{stem}.db``, and the completion marker last.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._version import __version__
from ..errors import CerberusError
from ..io.files import write_json
from ..io.grid import GridReader
from .chunks import (
    TISSUE_PAD_UM,
    Chunk,
    dense_channels,
    ext_maps,
    mask_cells,
    own_chunk,
    planner,
    read_box,
    window_keeper,
)
from .options import RunOptions
from .pool import WorkerPool, check_output, marker_path, read_marker, redone_line, write_marker
from .slide_plan import SlideJob, SlidePlan, mask_for, plan_slide, postproc_workers, redo_reasons, slide_key

RUN_KEY = "cerberus_run"  # the store's metadata key of a run's settings: a partial store of others is not resumed
UNREADABLE = "unreadable_regions"  # the store's metadata key of the slide's unreadable level-0 boxes
#: the keys of a slide run's timings (seconds per stage, then the device's share of the wall time)
SPARE_BYTES = 512 * 2**20  # the window cache's memory for a predictor without a memory budget (no runtime)
TIMING_KEYS = ("mask", "read", "infer", "forward", "postprocess", "write", "outputs", "total", "device_utilisation")


@dataclass
class WSIResult:
    """What :func:`predict_slide` produced for one slide.

    Attributes:
        slide: the slide file.
        paths: output name -> file: ``store`` (``{stem}.db``), ``geojson``, ``hovernet`` (``{stem}.json``),
            ``summary_json``, ``summary_csv``, ``thumbnail`` (overlay PNG), ``mask`` (tissue mask PNG), ``tissue``
            (class map PNG, one pixel per cell, values = class index; none without a trusted tissue head),
            ``metadata`` (JSON), ``marker`` (``done/{stem}.json``).
        summary: the summary (:func:`~cerberus_histo.outputs.summary.summarize`; docs/outputs.md).
        counts: objects per task in the store.
        timings: seconds per stage of the run that finished the slide (``mask``, ``read``, ``infer``, ``forward``,
            ``postprocess``, ``write``, ``outputs``, ``total``) and ``device_utilisation``, the share of its wall
            time the network ran. A slide finished before (``skipped``) gives the timings recorded then (from its
            marker, else its metadata file; NaN where neither has them), with the same keys.
        skipped: True when the slide was finished before and nothing was done.

    ``unreadable`` lists the level-0 boxes ``(x, y, w, h)`` of the slide that stayed unreadable after a retry
    (filled white and recorded: the slide completed with unreadable regions).
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

    @property
    def unreadable(self) -> list[list[int]]:
        return list(self.summary.get(UNREADABLE, []))


def merge_boxes(*lists) -> list[list[int]]:
    """Level-0 boxes of several lists, each once, in the order met."""
    out: list[list[int]] = []
    for boxes in lists:
        for box in boxes:
            box = [int(v) for v in box]
            if box not in out:
                out.append(box)
    return out


def output_paths(output: Path, stem: str) -> dict[str, Path]:
    """Every file a slide run writes into ``output``, by name (see :class:`WSIResult`)."""
    o = Path(output)
    return {"store": o / f"{stem}.db", "geojson": o / f"{stem}.geojson", "hovernet": o / f"{stem}.json",
            "summary_json": o / f"{stem}_summary.json", "summary_csv": o / f"{stem}_summary.csv",
            "thumbnail": o / f"{stem}_thumbnail.png", "mask": o / f"{stem}_mask.png",
            "tissue": o / f"{stem}_tissue.png", "metadata": o / f"{stem}_metadata.json",
            "marker": marker_path(o, stem)}


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


def recorded_timings(marker: dict, metadata: Path) -> dict[str, float]:
    """The timings of the run that finished a slide, with the keys of a fresh run's (:data:`TIMING_KEYS`): its
    marker's ``timings_s``, else those of its metadata file, NaN for a key neither has."""
    got = marker.get("timings_s")
    if not isinstance(got, dict):
        try:
            got = json.loads(Path(metadata).read_text()).get("timings_s")
        except (OSError, ValueError, AttributeError):
            got = None
    got = got if isinstance(got, dict) else {}
    return {k: float(got[k]) if isinstance(got.get(k), (int, float)) else math.nan for k in TIMING_KEYS}


# ---- one slide through the stages ------------------------------------------------------------------------
class SlideRun:
    """One slide's run through the stages of :func:`~.wsi.predict_slide`: what they share (the job, the settings,
    the output paths, the trusted heads, the settings key and the timings) and the partial store while it is
    open (``store``; :meth:`close` closes it)."""

    def __init__(self, predictor, config, job: SlideJob, output: str | Path, opts: RunOptions):
        from ..outputs.records import known_heads

        self.predictor, self.config, self.job, self.opts, self.echo = predictor, config, job, opts, opts.say
        self.t_start = time.perf_counter()
        self.output = check_output(Path(output))
        self.paths = output_paths(self.output, job.stem)
        self.heads = known_heads(config, job.heads if job.heads is not None else getattr(predictor, "heads", None))
        self.key = slide_key(predictor, config, job.model_id, opts, job.slide.name, self.slide_mask, self.heads)
        self.timings = dict.fromkeys(TIMING_KEYS[:-2], 0.0)  # total and device_utilisation at the end
        self.store = None
        self.cache = None
        self.cache_stats: dict[str, int] = {}
        self.mask: Path | None = None
        self.done_before: set[int] = set()
        self.reader = None
        self.unreadable: list[list[int]] = []  # level-0 boxes recorded in the store (this run's and a killed one's)

    def slide_mask(self) -> Path | None:
        """The user's mask file of this slide (None: computed), found once the slide is opened."""
        return mask_for(self.opts.mask, self.job.slide, self.job.stem)

    def finished(self) -> WSIResult | None:
        """The result of a slide finished before with these settings (``skipped``), else None: the slide runs
        (with a line naming the settings that changed, unless the job's ``redo_line`` is False); a predictor whose
        windows cannot tile a slide is an error."""
        slide, predictor = self.job.slide, self.predictor
        done = read_marker(self.output, self.job.stem)
        changed = redo_reasons(done, self.key)
        if changed == []:  # finished with these settings
            return WSIResult(slide, {k: Path(v) for k, v in done["files"].items()}, done["summary"], done["counts"],
                             recorded_timings(done, self.paths["metadata"]), skipped=True)
        if changed and self.job.redo_line:
            self.echo(redone_line({slide: changed}))
        geometry = predictor.geometry
        if geometry.fit or int(geometry.output_shape) % int(predictor.cell):
            raise CerberusError(f"whole-slide windows must keep their size and an output side that is a multiple of "
                                f"{int(predictor.cell)}; got {geometry}. Build the predictor with make_predictor")
        return None

    # ---- stage 1: plan chunks
    def plan(self, reader) -> SlidePlan:
        """Plan the slide (:func:`~.slide_plan.plan_slide`), remove another run's marker and save the mask."""
        from ..io.tissue import save_mask

        t0 = time.perf_counter()
        self.reader = reader
        self.mask = self.slide_mask()
        plan = plan_slide(self.predictor, self.config, reader, self.opts, self.mask, self.job.model_id,
                          self.job.slide.name, self.echo, self.heads)
        # a marker here is another run's (of other settings, or unreadable): gone before the first file is replaced,
        # so that its slide never passes for finished with a mix of files
        self.paths["marker"].unlink(missing_ok=True)
        save_mask(self.paths["mask"], plan.mask)
        self.timings["mask"] = time.perf_counter() - t0
        return plan

    def open_store(self, plan: SlidePlan) -> list[Chunk]:
        """Open the partial store ``{stem}.db.partial`` (resumed when its key is this run's); returns the chunks
        with tissue that it does not hold yet."""
        from ..outputs.store import open_run_store

        predictor, stem = self.predictor, self.job.stem
        meta = {"slide": self.job.slide.name, "mpp": plan.slide_mpp, "processing_mpp": predictor.mpp,
                "scale": plan.scale, "offset": [0.0, 0.0], "level0_dimensions": list(plan.dimensions),
                "software": {"cerberus_histo": __version__}, "model": self.config.to_dict(),
                "trusted_heads": list(self.heads), RUN_KEY: plan.run}
        self.store = open_run_store(self.paths["store"], self.output / f"{stem}.db.partial", meta, RUN_KEY, self.echo)
        self.done_before = self.store.chunks_done()
        self.record_unreadable(self.store.metadata.get(UNREADABLE, []))
        todo = [c for c in plan.tissue if c.index not in self.done_before]
        chunk_plan = planner(predictor)
        self.echo(f"{stem}: {plan.size[0]} x {plan.size[1]} model px, {len(plan.tissue)} of {len(plan.chunks)} chunks "
                  f"of {plan.chunk_px} px with tissue (margin {plan.margin_px} px), windows "
                  f"{chunk_plan(*plan.chunks[0].region[2:], plan.fit).window_shape[::-1]}")
        return todo

    # ---- stages 2-4: predict a chunk, own its instances, commit it
    def predict_chunks(self, grid: GridReader, plan: SlidePlan, todo: list[Chunk]) -> int:
        """Predict the ``todo`` chunks in order (:meth:`predict_chunk`) while the pool post-processes and owns the
        previous ones (:func:`~.chunks.own_chunk`) and this process commits each finished chunk to the store
        (:meth:`commit`); returns the windows run. Reading (``grid``'s threads), the network (here) and
        post-processing overlap; at most ``postproc_workers`` chunks wait for post-processing while the next one
        is predicted. Each window runs once: what a later chunk needs is kept for it (:meth:`window_cache`)."""
        from ..progress import progress_bar

        chunk_plan = planner(self.predictor)
        total = len(plan.tissue)
        self.bar = progress_bar(total=total, initial=total - len(todo), unit="chunk", desc=self.job.stem,
                                progress=self.opts.progress, leave=False)
        windows_run = 0
        self.cache = self.window_cache(todo)
        try:
            with WorkerPool(postproc_workers(self.predictor, self.opts) if todo else 0, self.commit) as pool:
                if todo:
                    grid.prefetch(read_box(todo[0], chunk_plan, plan.fit))
                for i, chunk in enumerate(todo):
                    if i + 1 < len(todo):
                        grid.prefetch(read_box(todo[i + 1], chunk_plan, plan.fit))
                    if self.cache is not None:
                        self.cache.start(i)
                    pred = self.predict_chunk(grid, plan, chunk)
                    grid.release(read_box(chunk, chunk_plan, plan.fit))
                    windows_run += pred.windows
                    pool.submit(own_chunk, self.own_job(grid, plan, chunk, pred), pred.windows)
                    del pred  # a worker has its copy; bound what this process holds
                pool.drain()
        finally:
            self.bar.close()
            if self.cache is not None:
                self.cache_stats = self.cache.stats()
                self.cache.close()
        return windows_run

    def window_cache(self, todo: list[Chunk]):
        """The :class:`~.window_cache.WindowCache` of this run's chunks (None for a predictor that takes no
        ``cache``, or one chunk): in memory what the budget leaves beside the largest chunk, the rest in
        ``{stem}.windows.partial/`` beside the store."""
        import inspect

        from .window_cache import WindowCache

        if len(todo) < 2 or "cache" not in inspect.signature(self.predictor.predict_region).parameters:
            return None
        runtime = getattr(self.predictor, "runtime", None)
        budget = SPARE_BYTES
        if runtime is not None:
            largest = max(c.region[2] * c.region[3] for c in todo)
            budget = replace(runtime, postproc_workers=postproc_workers(self.predictor, self.opts)).spare_bytes(
                largest, dense_channels(self.config, self.heads))
        return WindowCache(todo, budget, self.output / f"{self.job.stem}.windows.partial")

    def predict_chunk(self, grid: GridReader, plan: SlidePlan, chunk: Chunk):
        """Stage 2: the network on ``chunk``'s network region, on the windows that touch tissue and that no chunk
        before it ran (those come from the window cache)."""
        predictor = self.predictor
        keep = window_keeper(plan.mask, plan.mask_mpp, grid.mpp, plan.scale, chunk.net[:2], predictor.geometry.margin,
                             TISSUE_PAD_UM / grid.mpp)
        extra = {} if self.cache is None else {"cache": self.cache}
        pred = predictor.predict_region(grid, chunk.region, keep=keep, fit=plan.fit, **extra)
        self.timings["infer"] += pred.timings.get("forward", 0.0) + pred.timings.get("stitch", 0.0)
        self.timings["forward"] += pred.timings.get("forward", 0.0)
        return pred

    def own_job(self, grid: GridReader, plan: SlidePlan, chunk: Chunk, pred) -> dict:
        """Stage 3's work for a pool worker (:func:`~.chunks.own_chunk`): post-process ``pred`` on the chunk's
        extended region and keep the instances whose centroid is in ``chunk``, inside the user's mask."""
        coarse = {h for h in pred.probs if self.config.head(h)[1].kind == "class"}
        return {"chunk": chunk, "probs": ext_maps(chunk, pred.probs, int(self.predictor.cell), coarse),
                "mpp": self.predictor.mpp, "cell": int(self.predictor.cell), "size": plan.size,
                "slide_mpp": grid.mpp, "config": self.config, "heads": self.heads, "region": plan.chunk_region(chunk)}

    def commit(self, windows: int, result: Future) -> None:
        """Stage 4: a chunk's records and its ledger row go to the store in one transaction, in chunk order."""
        from ..outputs.store import ChunkEntry

        res = result.result()  # a failed chunk fails the slide (its committed chunks stay for the re-run)
        t1 = time.perf_counter()
        entry = ChunkEntry(res["index"], sum(len(r) for r in res["records"].values()), res["dropped"], windows,
                           res["cells"], res["cell_origin"])
        self.store.append(res["records"], chunk=entry)
        self.record_unreadable()
        self.timings["write"] += time.perf_counter() - t1
        self.timings["postprocess"] += res["seconds"]
        self.bar.update()
        if self.job.on_commit is not None:
            self.job.on_commit(res["index"])

    def record_unreadable(self, before=()) -> None:
        """Add the regions the reader could not read (and ``before``, those of a killed run) to the store's
        metadata, each with one warning line: a resumed run reports them too."""
        boxes = merge_boxes(self.unreadable, before, getattr(self.reader, "unreadable", ()))
        new = boxes[len(self.unreadable):]
        if not new:
            return
        for x, y, w, h in new[:5]:
            self.echo(f"warning: {self.job.slide.name}: unreadable region at level 0 x={x} y={y} {w}x{h} px after a "
                      "retry; filled white, recorded, and the rest of the slide goes on")
        if len(new) > 5:
            self.echo(f"warning: {self.job.slide.name}: {len(new) - 5} more unreadable regions (see the metadata)")
        self.unreadable = boxes
        self.store.set_metadata({UNREADABLE: boxes})

    # ---- stage 5: finish the outputs
    def finish(self, reader, grid: GridReader, plan: SlidePlan, todo: list[Chunk], windows_run: int) -> WSIResult:
        """Write the outputs (:func:`finish_slide`) and the metadata, rename the store to ``{stem}.db`` and write
        the completion marker last."""
        stem, timings, heads, paths = self.job.stem, self.timings, self.heads, self.paths
        t_loop = time.perf_counter()
        summary = finish_slide(self.store, self.config, reader, plan, paths, self.opts.centroids_only, heads,
                               self.record_unreadable)
        timings["outputs"] = time.perf_counter() - t_loop
        timings["read"] += grid.read_seconds
        timings["total"] = time.perf_counter() - self.t_start
        timings["device_utilisation"] = timings["forward"] / timings["total"] if timings["total"] else 0.0
        totals = self.store.chunk_totals()
        if totals["dropped"]:
            self.echo(f"warning: {stem}: {totals['dropped']} objects larger than the margin were cut at chunk borders "
                      f"and dropped; raise --margin-um (now {self.opts.margin_um:g})")
        info = self.metadata(plan, todo, windows_run, totals, summary)
        write_json(paths["metadata"], info)
        self.close()
        partial = self.output / f"{stem}.db.partial"
        if partial.exists():
            os.replace(partial, paths["store"])
        if "tissue-class" not in heads:  # no tissue map in this run: one left by a run of other heads is not its own
            paths["tissue"].unlink(missing_ok=True)
        files = {k: str(v) for k, v in paths.items() if k != "marker" and v.exists()}
        write_marker(self.output, stem, {"slide": str(self.job.slide), "files": files, "counts": summary["counts"],
                                         "summary": summary, "timings_s": info["timings_s"], "settings": self.key})
        t = timings
        self.echo(f"{stem}: {sum(v for k, v in summary['counts'].items() if k != 'tissue')} objects in "
                  f"{t['total']:.1f} s (read {t['read']:.1f} s, infer {t['infer']:.1f} s, post-process "
                  f"{t['postprocess']:.1f} s, write {t['write']:.1f} s, outputs {t['outputs']:.1f} s; device busy "
                  f"{t['device_utilisation']:.0%})")
        return WSIResult(self.job.slide, {k: Path(v) for k, v in files.items()} | {"marker": paths["marker"]},
                         summary, summary["counts"], timings)

    def metadata(self, plan: SlidePlan, todo: list[Chunk], windows_run: int, totals: dict, summary: dict) -> dict:
        """The contents of ``{stem}_metadata.json``."""
        predictor, opts = self.predictor, self.opts
        geometry, chunk_plan = predictor.geometry, planner(predictor)
        windows = {"run": totals["windows"], "one_pass": self.one_pass_windows(plan),
                   "in_tissue_chunks": sum(len(chunk_plan(c.region[2], c.region[3], plan.fit)) for c in plan.tissue),
                   "run_now": windows_run, "cache": self.cache_stats}
        return {**(self.job.metadata or {}), "slide": str(self.job.slide), "stem": self.job.stem,
                "level0_dimensions": list(plan.dimensions), "mpp": plan.slide_mpp,
                "mpp_source": "--mpp" if opts.mpp is not None else "metadata", "processing_mpp": predictor.mpp,
                "model": self.config.to_dict(), "model_id": self.job.model_id, "trusted_heads": list(self.heads),
                "window": {"input": geometry.input_shape, "output": int(geometry.output_shape)},
                "chunk_size": plan.chunk_px, "margin_um": opts.margin_um, "margin_px": plan.margin_px,
                "chunks": {"total": len(plan.chunks), "with_tissue": len(plan.tissue),
                           "done_before": len(self.done_before), "done_now": len(todo)},
                "windows": windows, "dropped_large_objects": totals["dropped"], UNREADABLE: self.unreadable,
                "tissue_mask": {"source": str(self.mask) if self.mask is not None else "computed",
                                "mpp": plan.mask_mpp},
                "counts": summary["counts"], "software": software_versions(),
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()}}

    def one_pass_windows(self, plan: SlidePlan) -> int:
        """The windows of one pass over the slide's tissue: those of the slide-wide grid that touch tissue (what
        the chunks together would run if the slide were one chunk)."""
        tiles = planner(self.predictor)(*plan.size, plan.fit).tiles()
        keep = window_keeper(plan.mask, plan.mask_mpp, plan.slide_mpp, plan.scale, (0, 0),
                             self.predictor.geometry.margin, TISSUE_PAD_UM / plan.slide_mpp)
        return int(sum(keep(tiles))) if tiles else 0

    def close(self) -> None:
        """Close the partial store, if open (after a failure too: its committed chunks stay for the re-run)."""
        if self.store is not None:
            self.store.close()
            self.store = None


# ---- stage 5: finish -------------------------------------------------------------------------------------
def finish_slide(store, config, reader, plan: SlidePlan, paths: dict[str, Path], centroids_only: bool,
                 heads: tuple[str, ...] | None = None, record_unreadable=None) -> dict:
    """Once every chunk is in: add the tissue-class regions (once; the store is marked complete in the same
    transaction), then write the GeoJSON, HoVer-Net JSON, summary, tissue-class PNG and thumbnail from the store
    (:func:`~cerberus_histo.outputs.writers.write_slide_outputs`); returns the summary. Without a trusted tissue head
    (``heads``, default every head of ``config``) there are no tissue regions and no tissue-class map. The
    summary's ``unreadable_regions`` are the store's (``record_unreadable()`` first adds those the thumbnail met)."""
    from ..outputs.records import annotation_records, clip_records
    from ..outputs.writers import write_slide_outputs
    from ..postproc import TaskResult

    cell, (width, height) = plan.cell, plan.size
    cshape = (math.ceil(height / cell), math.ceil(width / cell))
    heads = config.head_names if heads is None else heads
    class_map = store.tissue_cells(cshape) if "tissue-class" in heads else None
    cell_l0 = cell * plan.scale
    if class_map is not None:
        class_map[~mask_cells(plan.mask, plan.mask_mpp, cshape, cell_l0, plan.slide_mpp)] = 0
    if not store.complete:
        tissue = {}
        if class_map is not None and any(t.name == "tissue" for t in config.tasks):
            w0, h0 = plan.dimensions  # regions clipped to the slide's level-0 extent, and to the user's mask
            tissue = annotation_records({"tissue": TaskResult(class_map=class_map)}, config, plan.slide_mpp,
                                        plan.scale, (0.0, 0.0), (h0 / plan.scale, w0 / plan.scale), cell)
            if plan.region is not None:
                tissue = {t: clip_records(r, plan.region, plan.slide_mpp) for t, r in tissue.items()}
        store.append(tissue, complete=True)
    ideal = max(plan.slide_mpp, max(plan.dimensions) * plan.slide_mpp / 2048)  # <= 2048 px per side
    levels = [m for m in reader.level_mpps if m >= ideal * 0.99]
    thumb = reader.thumbnail(min(levels) if levels else ideal)  # a pyramid level when one is that coarse
    if record_unreadable is not None:
        record_unreadable()
    return write_slide_outputs(store, config, paths, mpp=plan.slide_mpp, class_map=class_map, cell=cell_l0,
                               analysed_area_um2=float(plan.mask.sum()) * plan.mask_mpp ** 2, thumbnail=thumb,
                               thumbnail_scale=thumb.shape[1] / plan.dimensions[0], centroids_only=centroids_only,
                               heads=heads, unreadable=store.metadata.get(UNREADABLE, []))


__all__ = ["RUN_KEY", "TIMING_KEYS", "UNREADABLE", "SlideRun", "WSIResult", "finish_slide", "output_paths", "recorded_timings",
           "software_versions"]
