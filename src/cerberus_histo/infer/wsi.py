"""Whole-slide inference in chunks with bounded memory, exact border merging and resume (docs/wsi.md).

A slide run is five stages, read top to bottom in :func:`predict_slide`:

1. **plan chunks** (:func:`~.slide_plan.plan_slide`, :mod:`.slide_plan`): open the slide, load or compute the tissue
   mask, cut the slide into chunks on one slide-wide window grid and keep those with tissue (:mod:`.chunks`); the
   run's settings form its key.
2. **predict a chunk** (:meth:`~.slide_run.SlideRun.predict_chunk`): the network runs on each chunk's extended
   region (the chunk and a margin) while threads read the next chunk's tiles
   (:class:`~cerberus_histo.io.grid.GridReader`).
3. **own** (:func:`~.chunks.own_chunk`, in a :class:`~.pool.WorkerPool`): post-process the extended region and
   keep the instances whose centroid is in the chunk, with slide-wide ids, inside the user's mask.
4. **commit** (:meth:`~.slide_run.SlideRun.commit`): the chunk's records and its ledger row go to
   ``{stem}.db.partial`` in one transaction, in chunk order
   (:meth:`~cerberus_histo.outputs.store.AnnotationStore.append`); a killed run resumes after the last one.
5. **finish** (:meth:`~.slide_run.SlideRun.finish`, :func:`~.slide_run.finish_slide`): add the tissue-class
   regions, write every output from the store (:func:`~cerberus_histo.outputs.writers.write_slide_outputs`) and the
   metadata, rename the store to ``{stem}.db``, and write the completion marker ``done/{stem}.json`` last.

A re-run with the same settings skips the committed chunks, and a slide whose marker records them
(:func:`~.slide_plan.slide_key`, compared by :func:`~.slide_plan.redo_reasons` before the slide is opened); a slide
finished with other settings is done again, its files replaced one by one as the run writes them. The slide and
its plan live in :mod:`.slide_plan`, the stages after it in :mod:`.slide_run`; this module keeps their names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CerberusError
from ..io.grid import GridReader
from ..io.locks import ResultLock
from .chunks import plan_chunks
from .options import RunOptions
from .pool import read_marker, weights_id
from .slide_plan import (
    DEFAULT_CHUNK,
    FINISHED,
    MASK_MAX_SIDE,
    MASK_MPP,
    SlideJob,
    SlidePlan,
    mask_for,
    mask_id,
    plan_slide,
    redo_reasons,
    slide_key,
)
from .slide_run import (
    RUN_KEY,
    TIMING_KEYS,
    SlideRun,
    WSIResult,
    finish_slide,
    output_paths,
    recorded_timings,
    software_versions,
)
from .tiling import Geometry


def predict_slide(predictor, config, slide: SlideJob | str | Path, output: str | Path,
                  options: RunOptions | None = None) -> WSIResult:
    """Predict one slide in chunks and write its outputs into ``output`` (see the module docstring).

    A slide whose completion marker records this run's settings (:func:`~.slide_plan.slide_key`) is skipped at once
    (``skipped``); one finished with other settings, or by an earlier version that recorded none, is done again,
    with one line naming what changed (unless the job's ``redo_line`` is False). Its marker goes first, and each of
    its files is replaced as this run writes it. Everything after that first check is done holding the slide's lock
    (:class:`~cerberus_histo.io.locks.ResultLock`): a slide another run on the same output folder holds is waited
    for, with one line, and skipped if that run finished it; one a killed run held is taken over and resumed.

    Args:
        predictor: a :class:`~.engine.Predictor` whose geometry has ``fit=False`` and an output side that is a
            multiple of its ``cell`` (see :func:`make_predictor`), or any object with the same ``mpp``, ``cell``,
            ``geometry``, ``predict_region(reader, region, keep=..., fit=...)`` and optionally ``runtime``.
        config: the model's :class:`~cerberus_histo.config.ModelConfig` (class names and colours).
        slide: the slide file, or a :class:`~.slide_plan.SlideJob` (the slide with its stem, model id, trusted heads, metadata).
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

    job = slide if isinstance(slide, SlideJob) else SlideJob(slide)
    opts = (options if options is not None else RunOptions()).check_for("slide")
    run = SlideRun(predictor, config, job, output, opts)
    if (finished := run.finished()) is not None:  # finished before with these settings
        return finished
    reader = open_slide(job.slide, opts.mpp, "raise" if opts.strict else "record")
    grid = GridReader(reader, predictor.mpp, threads=job.read_threads)
    lock = ResultLock(run.output, job.stem)  # another run on this output folder may be on this slide
    try:
        lock.acquire(on_wait=lambda holder: run.echo(f"{job.slide.name} is being processed by another run "
                                                     f"({holder}); waiting"))
        if lock.took_over is not None:
            run.echo(f"took over {job.slide.name} from a run that ended ({lock.took_over})")
        if redo_reasons(read_marker(run.output, job.stem), run.key) == []:  # that run finished it meanwhile
            return run.finished()
        plan = run.plan(reader)  # 1. plan chunks
        todo = run.open_store(plan)  # the chunks the partial store does not hold yet
        windows = run.predict_chunks(grid, plan, todo)  # 2-4. predict a chunk, own at the seams, commit to the store
        return run.finish(reader, grid, plan, todo, windows)  # 5. finish the outputs
    finally:
        run.close()
        grid.close()
        reader.close()
        lock.release()


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


__all__ = ["DEFAULT_CHUNK", "FINISHED", "MASK_MAX_SIDE", "MASK_MPP", "RUN_KEY", "TIMING_KEYS", "SlideJob", "SlidePlan",
           "WSIResult", "finish_slide", "make_predictor", "mask_for", "mask_id", "output_paths", "plan_chunks",
           "plan_slide", "predict_slide", "predict_wsi", "recorded_timings", "redo_reasons", "slide_key",
           "software_versions", "weights_id"]
