"""Whole-slide inference in chunks with bounded memory, exact border merging and resume (docs/wsi.md).

A slide run is five stages, read top to bottom in :func:`predict_slide`:

1. **plan** (:func:`plan_slide`): open the slide, load or compute the tissue mask, cut the slide into chunks on
   one slide-wide window grid and keep those with tissue (:mod:`.chunks`); the run's settings form its key.
2. **predict**: the network runs on each chunk's extended region (the chunk and a margin) while threads read the
   next chunk's tiles (:class:`~cerberus_histo.io.grid.GridReader`).
3. **own** (:func:`~.chunks.own_chunk`, in a :class:`~.pool.WorkerPool`): post-process the extended region and
   keep the instances whose centroid is in the chunk, with slide-wide ids, inside the user's mask.
4. **commit**: the chunk's records and its ledger row go to ``{stem}.db.partial`` in one transaction, in chunk
   order (:meth:`~cerberus_histo.outputs.store.AnnotationStore.append`); a killed run resumes after the last one.
5. **finish** (:func:`finish_slide`): add the tissue-class regions, write every output from the store
   (:func:`~cerberus_histo.outputs.writers.write_slide_outputs`) and the metadata, rename the store to
   ``{stem}.db``, and write the completion marker ``done/{stem}.json`` last.

A re-run with the same settings skips the committed chunks, and a slide whose marker records them
(:func:`slide_key`, compared by :func:`redo_reasons` before the slide is opened); a slide finished with other
settings is done again, its files replaced one by one as the run writes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import CerberusError
from ..io.files import write_json
from ..io.grid import GridReader
from .chunks import (
    TISSUE_PAD_UM,
    Chunk,
    dense_channels,
    mask_cells,
    own_chunk,
    plan_chunks,
    planner,
    read_box,
    tissue_chunks,
    window_keeper,
)
from .options import RunOptions
from .pool import (
    WorkerPool,
    changed_settings,
    check_output,
    marker_path,
    read_marker,
    redone_line,
    run_key,
    weights_id,
    write_marker,
)
from .tiling import Geometry

MASK_MPP, MASK_MAX_SIDE = 8.0, 2048  # computed tissue masks: 8 um/px, at most 2048 px per side
DEFAULT_CHUNK = 4096  # model px, for a predictor without a runtime (and so without a memory budget)
RUN_KEY = "cerberus_run"  # the store's metadata key of a run's settings: a partial store of others is not resumed
#: the keys of a slide run's timings (seconds per stage, then the device's share of the wall time)
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


# ---- a finished slide: the settings that made it -----------------------------------------------------------
FINISHED = ("files", "summary", "counts")  # what the marker of a finished slide holds


def mask_id(mask: str | Path | Callable[[], Path | None] | None) -> str:
    """The tissue mask in a slide's settings: ``computed`` (``mask`` None: computed from the slide alone), else
    ``sha1:`` and the hash of the user's mask file (``mask``: its path, or a function giving it), so another
    file or new contents at the same path are another mask; ``unavailable`` when the file cannot be found or
    read (the slide then runs, and fails with the reason)."""
    try:
        if callable(mask):
            mask = mask()
        if mask is None:
            return "computed"
        return "sha1:" + hashlib.sha1(Path(mask).read_bytes()).hexdigest()
    except (CerberusError, OSError):
        return "unavailable"


def slide_key(predictor, config, model_id: str, options: RunOptions, slide_name: str,
              mask: str | Path | Callable[[], Path | None] | None, heads: Sequence[str],
              precision: str | None = None) -> dict:
    """The settings that made a finished slide, recorded in its marker (``settings``) and compared with a
    re-run's (:func:`redo_reasons`): a :func:`~.pool.run_key` of the model (config and ``model_id``), the window,
    ``tta``, the precision used (``precision``: the one the run's workers will use, default the predictor's),
    the trusted ``heads``, and the slide's own: its name, ``--mpp`` as given (None: the slide's metadata),
    the processing mpp, ``--margin-um``, the mask (:func:`mask_id`) and ``--centroids-only``.

    It is the part of the partial store's key (:func:`plan_slide`) that is known before the slide is opened,
    plus ``centroids_only`` (which shapes the GeoJSON, not the store): deciding to skip a finished slide loads
    nothing, opens no slide and computes no mask, and a cohort's parent process decides it for its Dask workers
    (whose chunk it cannot know). Left out, and so not a reason to redo a finished slide: the chunking (chunks merge
    as one pass, docs/wsi.md, and the automatic chunk follows the machine's memory like the batch size), the
    slide's size and metadata mpp (a slide replaced by another under the same name is not noticed), and the
    computed mask (it depends on the slide alone). The partial store keeps the whole key: a partial result is
    resumed only when everything, the chunking included, is the same."""
    geometry = predictor.geometry
    return run_key(config, model_id, window=[geometry.input_shape, int(geometry.output_shape)],
                   tta=getattr(predictor, "tta", False),
                   precision=getattr(predictor, "precision", "") if precision is None else precision,
                   slide=slide_name, mpp=options.mpp, processing_mpp=predictor.mpp, margin_um=options.margin_um,
                   mask=mask_id(mask), heads=list(heads), centroids_only=bool(options.centroids_only))


def redo_reasons(done: dict | None, key: dict) -> list[str] | None:
    """How a slide's completion marker ``done`` (:func:`~.pool.read_marker`) stands to this run's settings
    ``key`` (:func:`slide_key`): None when it is no finished slide's marker (the slide runs: resumed, or from the
    start), ``[]`` when the slide was finished with these settings (it is skipped), else the settings that
    changed (:func:`~.pool.changed_settings`; ``not recorded`` for the marker of an earlier version): the slide is
    done again."""
    if done is None or not set(FINISHED) <= set(done):
        return None
    return changed_settings(done.get("settings"), key)


# ---- stage 1: plan ---------------------------------------------------------------------------------------
@dataclass
class SlidePlan:
    """What a slide run does: the slide's frame, its tissue mask and its chunks.

    ``scale``: level-0 px per model px; ``cell``: model px per tissue-class cell; ``size``: the slide in model px ``(width, height)``; ``mask`` at
    ``mask_mpp`` (``user_mask``: given by the user, so every record is clipped to ``region``, the mask in level-0
    pixels); ``chunks`` (all) and ``tissue`` (those run); ``fit``: whether one chunk covers the slide along x / y
    (then windows are fitted to it as for tiles); ``chunk_px`` and ``margin_px`` as rounded to whole windows;
    ``run``: the settings that key the run's partial store.
    """

    slide_mpp: float
    dimensions: tuple[int, int]
    scale: float
    cell: int
    size: tuple[int, int]
    mask: np.ndarray
    mask_mpp: float
    user_mask: bool
    region: object | None
    chunks: list[Chunk]
    tissue: list[Chunk]
    fit: tuple[bool, bool]
    chunk_px: int
    margin_px: int
    run: dict

    def chunk_region(self, chunk: Chunk):
        """The user's mask around ``chunk``'s extended region (level-0 px), or None without a user mask."""
        if self.region is None:
            return None
        import shapely

        x0, y0, x1, y1 = (v * self.scale for v in chunk.ext)
        return shapely.clip_by_rect(self.region, x0, y0, x1, y1)


def _load_or_compute_mask(reader, mask, echo: Callable[[str], None]) -> tuple[np.ndarray, float]:
    from ..io.tissue import load_mask, tissue_mask

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mask is not None:
            out = load_mask(mask, reader)
        else:  # 8 um/px, coarser for slides over MASK_MAX_SIDE mask pixels: bounded memory
            side_um = max(reader.dimensions) * reader.mpp
            out = tissue_mask(reader, max(MASK_MPP, side_um / MASK_MAX_SIDE))
    for w in caught:
        echo(f"warning: {w.message}")
    return out


def plan_slide(predictor, config, reader, options: RunOptions, mask: Path | None, model_id: str, name: str,
               echo: Callable[[str], None], heads: tuple[str, ...] | None = None) -> SlidePlan:
    """Stage 1: the slide's frame, tissue mask (``mask``: the user's file, or None to compute one) and chunks;
    ``heads`` (the trusted heads, default every head of ``config``) are part of the run's settings."""
    import shapely

    from ..outputs.records import mask_region

    slide_mpp, geometry = reader.mpp, predictor.geometry
    out_side = int(geometry.output_shape)
    scale = predictor.mpp / slide_mpp  # level-0 px per model px
    width, height = (max(1, round(v / scale)) for v in reader.dimensions)
    tmask, mask_mpp = _load_or_compute_mask(reader, mask, echo)
    region = None
    if mask is not None:
        w0, h0 = reader.dimensions
        region = shapely.clip_by_rect(mask_region(tmask, mask_mpp / slide_mpp), 0, 0, w0, h0)
    margin_px = math.ceil(options.margin_um / predictor.mpp / out_side) * out_side
    chunk_size, runtime = options.chunk_size, getattr(predictor, "runtime", None)
    if chunk_size is None and runtime is None:
        chunk_size = DEFAULT_CHUNK
    elif chunk_size is None:
        chunk_size = replace(runtime, postproc_workers=_postproc_workers(predictor, options)).chunk_for(
            width, height, out_side, margin_px, dense_channels(config, predictor.heads))
    chunks = plan_chunks(width, height, out_side, chunk_size, margin_px)
    chunk_px = max(1, math.ceil(chunk_size / out_side)) * out_side  # as plan_chunks rounds them
    run = run_key(config, model_id, window=[geometry.input_shape, out_side], tta=getattr(predictor, "tta", False),
                  precision=getattr(predictor, "precision", ""), slide=name, size=list(reader.dimensions),
                  mpp=slide_mpp, processing_mpp=predictor.mpp, chunks=len(chunks), chunk=chunk_px,
                  margin_um=options.margin_um, mask=hashlib.sha1(np.packbits(tmask).tobytes()).hexdigest(),
                  heads=list(config.head_names if heads is None else heads))
    return SlidePlan(slide_mpp, tuple(reader.dimensions), scale, int(predictor.cell), (width, height), tmask, mask_mpp, mask is not None,
                     region, chunks, tissue_chunks(chunks, tmask, mask_mpp, slide_mpp, scale),
                     (width <= chunks[0].core[2], height <= chunks[0].core[3]), chunk_px, margin_px,
                     run)  # as the store gives it back (lists, not tuples)


def _postproc_workers(predictor, options: RunOptions) -> int:
    if options.postproc_workers is not None:
        return options.postproc_workers
    runtime = getattr(predictor, "runtime", None)
    return 0 if runtime is None else runtime.postproc_workers


# ---- the run ---------------------------------------------------------------------------------------------
def mask_for(mask: str | Path | None, slide: Path, stem: str) -> Path | None:
    """The mask of ``slide``: ``mask`` itself when it is a file, ``{mask}/{stem}.png`` (or ``{stem}_mask.png``,
    ``{slide name}.png``) when it is a folder; a folder without the slide's mask is an error for that slide."""
    if mask is None:
        return None
    mask = Path(mask)
    if not mask.is_dir():
        return mask  # a missing or unreadable file is reported by the slide that uses it
    names = (f"{stem}.png", f"{stem}_mask.png", f"{Path(slide).name}.png")
    for name in names:
        if (mask / name).is_file():
            return mask / name
    raise CerberusError(f"no mask for {Path(slide).name} in {mask} (looked for {', '.join(names)})")


@dataclass(frozen=True)
class SlideJob:
    """One slide of a run, and what the run records with it (:func:`predict_slide`); the run's settings are its
    :class:`~.options.RunOptions`.

    Attributes:
        slide: the slide file.
        stem: the name of its outputs (default: the file's stem).
        model_id: identifies the weights (:func:`~.pool.weights_id`), so a partial result of other weights is
            never resumed.
        heads: the model's trusted heads (default: the predictor's ``heads``, which a :class:`~.engine.Predictor`
            takes from the model's provenance, else every head of the config): nothing of another head is kept or
            written (docs/outputs.md), and the metadata lists them as ``trusted_heads``.
        metadata: keys added to ``{stem}_metadata.json``.
        read_threads: threads reading the slide's tiles a chunk ahead of the network.
        on_commit: called with each chunk's index after its records are committed (tests interrupt runs here).
        redo_line: say when a slide finished with other settings is done again (a cohort that said it for all
            its slides passes False).
    """

    slide: Path
    stem: str | None = None
    model_id: str = ""
    heads: tuple[str, ...] | None = None
    metadata: dict | None = field(default=None, compare=False)
    read_threads: int = 2
    on_commit: Callable[[int], None] | None = field(default=None, compare=False)
    redo_line: bool = True

    def __post_init__(self):
        object.__setattr__(self, "slide", Path(self.slide))
        object.__setattr__(self, "stem", self.stem or self.slide.stem)
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(self.heads))
        t = self.read_threads
        if not (isinstance(t, int) and not isinstance(t, bool) and t >= 1):
            raise CerberusError(f"read_threads must be a positive number of threads, got {t!r}")


def predict_slide(predictor, config, slide: SlideJob | str | Path, output: str | Path,
                  options: RunOptions | None = None) -> WSIResult:
    """Predict one slide in chunks and write its outputs into ``output`` (see the module docstring).

    A slide whose completion marker records this run's settings (:func:`slide_key`) is skipped at once
    (``skipped``); one finished with other settings, or by an earlier version that recorded none, is done again,
    with one line naming what changed (unless the job's ``redo_line`` is False). Its marker goes first, and each of
    its files is replaced as this run writes it.

    Args:
        predictor: a :class:`~.engine.Predictor` whose geometry has ``fit=False`` and an output side that is a
            multiple of its ``cell`` (see :func:`make_predictor`), or any object with the same ``mpp``, ``cell``,
            ``geometry``, ``predict_region(reader, region, keep=..., fit=...)`` and optionally ``runtime``.
        config: the model's :class:`~cerberus_histo.config.ModelConfig` (class names and colours).
        slide: the slide file, or a :class:`SlideJob` (the slide with its stem, model id, trusted heads, metadata).
        output: the results folder (created by the first file written).
        options: the run's :class:`~.options.RunOptions` (default: every default): ``mpp`` overrides the slide's
            resolution; ``mask`` is a tissue mask image of the slide (any size) or a folder holding it (default:
            computed, :func:`~cerberus_histo.io.tissue.tissue_mask`; every record is clipped to a given mask);
            ``chunk_size`` (model px, rounded up to whole windows; default: the largest that fits the predictor's
            memory budget, :meth:`~.runtime.Runtime.chunk_for`); ``margin_um`` (context around each chunk; objects
            larger than this from their centroid are cut and dropped, counted in the metadata);
            ``postproc_workers`` (default: the runtime's); ``centroids_only``; ``progress``; ``echo`` (where the
            lines go). ``workers`` and ``scheduler`` are a cohort's (:func:`~.cohort.infer_wsi`): an error here.
            Along an axis that one chunk covers, windows are fitted to the slide as for tiles.
    """
    from ..io.slides import open_slide
    from ..io.tissue import save_mask
    from ..outputs.records import known_heads
    from ..outputs.store import open_run_store

    job = slide if isinstance(slide, SlideJob) else SlideJob(slide)
    opts = (options if options is not None else RunOptions()).check_for("slide")
    echo = opts.say
    t_start = time.perf_counter()
    slide, stem, model_id = job.slide, job.stem, job.model_id
    output = check_output(Path(output))
    paths = output_paths(output, stem)
    heads = known_heads(config, job.heads if job.heads is not None else getattr(predictor, "heads", None))

    def slide_mask():  # the user's mask file of this slide (None: computed), found once the slide is opened
        return mask_for(opts.mask, slide, stem)

    key = slide_key(predictor, config, model_id, opts, slide.name, slide_mask, heads)
    done = read_marker(output, stem)
    changed = redo_reasons(done, key)
    if changed == []:  # finished with these settings
        return WSIResult(slide, {k: Path(v) for k, v in done["files"].items()}, done["summary"], done["counts"],
                         recorded_timings(done, paths["metadata"]), skipped=True)
    if changed and job.redo_line:
        echo(redone_line({slide: changed}))
    geometry = predictor.geometry
    if geometry.fit or int(geometry.output_shape) % int(predictor.cell):
        raise CerberusError(f"whole-slide windows must keep their size and an output side that is a multiple of "
                            f"{int(predictor.cell)}; got {geometry}. Build the predictor with make_predictor")
    timings = dict.fromkeys(TIMING_KEYS[:-2], 0.0)  # total and device_utilisation at the end
    reader = open_slide(slide, opts.mpp)
    grid = GridReader(reader, predictor.mpp, threads=job.read_threads)
    store = None
    try:
        t0 = time.perf_counter()
        mask = slide_mask()
        plan = plan_slide(predictor, config, reader, opts, mask, model_id, slide.name, echo, heads)
        # a marker here is another run's (of other settings, or unreadable): gone before the first file is replaced,
        # so that its slide never passes for finished with a mix of files
        paths["marker"].unlink(missing_ok=True)
        save_mask(paths["mask"], plan.mask)
        timings["mask"] = time.perf_counter() - t0
        meta = {"slide": slide.name, "mpp": plan.slide_mpp, "processing_mpp": predictor.mpp, "scale": plan.scale,
                "offset": [0.0, 0.0], "level0_dimensions": list(plan.dimensions),
                "software": {"cerberus_histo": __version__}, "model": config.to_dict(), "trusted_heads": list(heads),
                RUN_KEY: plan.run}
        store = open_run_store(paths["store"], output / f"{stem}.db.partial", meta, RUN_KEY, echo)
        done_before = store.chunks_done()
        todo = [c for c in plan.tissue if c.index not in done_before]
        chunk_plan = planner(predictor)
        echo(f"{stem}: {plan.size[0]} x {plan.size[1]} model px, {len(plan.tissue)} of {len(plan.chunks)} chunks of "
             f"{plan.chunk_px} px with tissue (margin {plan.margin_px} px), windows "
             f"{chunk_plan(*plan.chunks[0].region[2:], plan.fit).window_shape[::-1]}")
        windows_run = _predict_chunks(predictor, config, grid, store, plan, todo, stem, opts, timings, job.on_commit,
                                      heads)
        t_loop = time.perf_counter()
        summary = finish_slide(store, config, reader, plan, paths, opts.centroids_only, heads)
        timings["outputs"] = time.perf_counter() - t_loop
        timings["read"] += grid.read_seconds
        timings["total"] = time.perf_counter() - t_start
        timings["device_utilisation"] = timings["forward"] / timings["total"] if timings["total"] else 0.0
        totals = store.chunk_totals()
        if totals["dropped"]:
            echo(f"warning: {stem}: {totals['dropped']} objects larger than the margin were cut at chunk borders "
                 f"and dropped; raise --margin-um (now {opts.margin_um:g})")
        windows = {"run": totals["windows"],
                   "in_tissue_chunks": sum(len(chunk_plan(c.region[2], c.region[3], plan.fit)) for c in plan.tissue),
                   "run_now": windows_run}
        info = {**(job.metadata or {}), "slide": str(slide), "stem": stem, "level0_dimensions": list(plan.dimensions),
                "mpp": plan.slide_mpp, "mpp_source": "--mpp" if opts.mpp is not None else "metadata",
                "processing_mpp": predictor.mpp, "model": config.to_dict(), "model_id": model_id,
                "trusted_heads": list(heads),
                "window": {"input": geometry.input_shape, "output": int(geometry.output_shape)},
                "chunk_size": plan.chunk_px, "margin_um": opts.margin_um, "margin_px": plan.margin_px,
                "chunks": {"total": len(plan.chunks), "with_tissue": len(plan.tissue),
                           "done_before": len(done_before), "done_now": len(todo)},
                "windows": windows, "dropped_large_objects": totals["dropped"],
                "tissue_mask": {"source": str(mask) if mask is not None else "computed", "mpp": plan.mask_mpp},
                "counts": summary["counts"], "software": software_versions(),
                "timings_s": {k: round(v, 4) for k, v in timings.items()}}
        write_json(paths["metadata"], info)
        store.close()
        store = None
        partial = output / f"{stem}.db.partial"
        if partial.exists():
            os.replace(partial, paths["store"])
        if "tissue-class" not in heads:  # no tissue map in this run: one left by a run of other heads is not its own
            paths["tissue"].unlink(missing_ok=True)
        files = {k: str(v) for k, v in paths.items() if k != "marker" and v.exists()}
        write_marker(output, stem, {"slide": str(slide), "files": files, "counts": summary["counts"],
                                    "summary": summary, "timings_s": info["timings_s"], "settings": key})
        t = timings
        echo(f"{stem}: {sum(v for k, v in summary['counts'].items() if k != 'tissue')} objects in {t['total']:.1f} s "
             f"(read {t['read']:.1f} s, infer {t['infer']:.1f} s, post-process {t['postprocess']:.1f} s, write "
             f"{t['write']:.1f} s, outputs {t['outputs']:.1f} s; device busy {t['device_utilisation']:.0%})")
        return WSIResult(slide, {k: Path(v) for k, v in files.items()} | {"marker": paths["marker"]}, summary,
                         summary["counts"], timings)
    finally:
        if store is not None:
            store.close()
        grid.close()
        reader.close()


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


# ---- stages 2-4: predict, own, commit --------------------------------------------------------------------
def _predict_chunks(predictor, config, grid: GridReader, store, plan: SlidePlan, todo: list[Chunk], stem: str,
                    opts: RunOptions, timings: dict[str, float], on_commit: Callable[[int], None] | None,
                    heads: tuple[str, ...]) -> int:
    """Predict the ``todo`` chunks in order (stage 2) while the pool post-processes and owns the previous ones
    (stage 3) and this process commits each finished chunk to the store (stage 4); returns the windows run.
    Reading (``grid``'s threads), the network (here) and post-processing overlap; at most ``postproc_workers``
    chunks wait for post-processing while the next one is predicted."""
    from ..outputs.store import ChunkEntry
    from ..progress import progress_bar

    geometry, chunk_plan = predictor.geometry, planner(predictor)
    pad = TISSUE_PAD_UM / grid.mpp
    total = len(plan.tissue)
    bar = progress_bar(total=total, initial=total - len(todo), unit="chunk", desc=stem, progress=opts.progress,
                       leave=False)
    windows_run = 0

    def commit(windows: int, result: Future) -> None:
        res = result.result()  # a failed chunk fails the slide (its committed chunks stay for the re-run)
        t1 = time.perf_counter()
        entry = ChunkEntry(res["index"], sum(len(r) for r in res["records"].values()), res["dropped"], windows,
                           res["cells"], res["cell_origin"])
        store.append(res["records"], chunk=entry)
        timings["write"] += time.perf_counter() - t1
        timings["postprocess"] += res["seconds"]
        bar.update()
        if on_commit is not None:
            on_commit(res["index"])

    try:
        with WorkerPool(_postproc_workers(predictor, opts) if todo else 0, commit) as pool:
            if todo:
                grid.prefetch(read_box(todo[0], chunk_plan, plan.fit))
            for i, chunk in enumerate(todo):
                if i + 1 < len(todo):
                    grid.prefetch(read_box(todo[i + 1], chunk_plan, plan.fit))
                keep = window_keeper(plan.mask, plan.mask_mpp, grid.mpp, plan.scale, chunk.ext[:2], geometry.margin,
                                     pad)
                pred = predictor.predict_region(grid, chunk.region, keep=keep, fit=plan.fit)
                grid.release(read_box(chunk, chunk_plan, plan.fit))
                timings["infer"] += pred.timings.get("forward", 0.0) + pred.timings.get("stitch", 0.0)
                timings["forward"] += pred.timings.get("forward", 0.0)
                windows_run += pred.windows
                job = {"chunk": chunk, "probs": pred.probs, "mpp": predictor.mpp, "cell": int(predictor.cell),
                       "size": plan.size, "slide_mpp": grid.mpp, "config": config, "heads": heads,
                       "region": plan.chunk_region(chunk)}
                pool.submit(own_chunk, job, pred.windows)
                del job, pred  # a worker has its copy; bound what this process holds
            pool.drain()
    finally:
        bar.close()
    return windows_run


# ---- stage 5: finish -------------------------------------------------------------------------------------
def finish_slide(store, config, reader, plan: SlidePlan, paths: dict[str, Path], centroids_only: bool,
                 heads: tuple[str, ...] | None = None) -> dict:
    """Once every chunk is in: add the tissue-class regions (once; the store is marked complete in the same
    transaction), then write the GeoJSON, HoVer-Net JSON, summary, tissue-class PNG and thumbnail from the store
    (:func:`~cerberus_histo.outputs.writers.write_slide_outputs`); returns the summary. Without a trusted tissue head
    (``heads``, default every head of ``config``) there are no tissue regions and no tissue-class map."""
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
    return write_slide_outputs(store, config, paths, mpp=plan.slide_mpp, class_map=class_map, cell=cell_l0,
                               analysed_area_um2=float(plan.mask.sum()) * plan.mask_mpp ** 2, thumbnail=thumb,
                               thumbnail_scale=thumb.shape[1] / plan.dimensions[0], centroids_only=centroids_only,
                               heads=heads)


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


def predict_wsi(model, slide: str | Path, output: str | Path = "cerberus-wsi", *, predictor=None,
                **settings) -> WSIResult:
    """See :meth:`~cerberus_histo.api.Cerberus.predict_wsi`: ``settings`` are :class:`~.options.RunOptions`
    fields; those of the network's run (window, ``tta`` and the machine settings) build the predictor
    (:func:`make_predictor`), unless a ready ``predictor`` is passed (then they must be left out)."""
    opts = RunOptions.from_settings(**settings)
    if predictor is None:
        predictor = make_predictor(model, **opts.predictor_settings())
    elif building := sorted(set(settings) & (set(opts.predictor_settings()) - {"postproc_workers"})):
        raise TypeError(f"pass these settings to make_predictor, not with predictor=: {', '.join(building)}")
    return predict_slide(predictor, model.config, SlideJob(slide, model_id=weights_id(model)), output, opts)
