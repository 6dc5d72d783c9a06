"""Tiles: one image (:func:`predict_tile`) or a folder of images (:func:`infer_tiles`, ``cerberus infer-tile``).

Both go through the one engine (:class:`~cerberus_histo.infer.engine.Predictor`) with the image wrapped in an
:class:`~cerberus_histo.io.readers.ArrayReader`, exactly as slides go through it with a slide reader. An image
whose mpp differs from the model's is resampled once, as a whole, to the model's mpp; results stay in model
pixels and ``scale`` (image pixels per model pixel) maps them back.

:func:`infer_tiles` runs the network in this process and post-processing plus writing in a pool of
``postproc_workers`` processes, so that image ``i``'s post-processing overlaps image ``i + 1``'s inference. Every
file is written atomically, and a completion marker ``OUTPUT/done/{stem}.json`` (the image's summary: files,
counts, timings, and the settings that made it, :func:`~.pool.run_key`) is written last: a re-run skips the images
that have one made with the same settings and redoes the others, saying so. With ``mask`` (one mask image for
every tile, or a folder of masks named after the tiles, :func:`tile_mask`) every record is clipped to the tile's
mask by the rule slides use (:func:`~cerberus_histo.outputs.records.clip_records`), and the mask's content hash is
one of the settings. An unreadable image is reported on one line and the others are still done; a write that finds
no room stops the run with one line (:class:`~cerberus_histo.io.files.NoSpaceError`), and the same command resumes.
This module imports torch only inside the functions that run the network, so the workers stay light.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CerberusError
from ..io.files import no_space_error
from ..io.locks import ResultLock, held_by
from ..io.readers import IMAGE_SUFFIXES, ArrayReader, check_mpp, read_image
from ..postproc import GlandParams, NucleiParams, TaskResult, postprocess
from .options import RunOptions
from .pool import (
    WorkerPool,
    changed_settings,
    check_output,
    file_id,
    one_line,
    output_stems,
    read_marker,
    redone_line,
    run_key,
    weights_id,
    write_marker,
)
from .results import RegionPrediction, TilePrediction


# ---- one image -------------------------------------------------------------------------------------------
def _model_reader(image: np.ndarray, mpp: float | None, model_mpp: float, name: str):
    """``(reader at the model's mpp, image RGB uint8, image mpp, scale, resample seconds)``."""
    reader = ArrayReader(image, model_mpp if mpp is None else check_mpp(mpp), name)
    image_mpp = reader.mpp
    if math.isclose(image_mpp, model_mpp, rel_tol=1e-6):
        return reader, reader.image, image_mpp, 1.0, 0.0
    t0 = time.perf_counter()
    w, h = reader.dimensions
    f = image_mpp / model_mpp
    resampled = reader.read_region((0, 0), (max(1, round(w * f)), max(1, round(h * f))), model_mpp)
    return ArrayReader(resampled, model_mpp, name), reader.image, image_mpp, model_mpp / image_mpp, \
        time.perf_counter() - t0


def predict_probs(predictor, image: np.ndarray, mpp: float | None = None, name: str = "image"):
    """Network probabilities of a whole image: ``(RegionPrediction, rgb image, image mpp, scale, resample s)``."""
    reader, rgb, image_mpp, scale, t_resample = _model_reader(image, mpp, predictor.mpp, name)
    pred = predictor.predict_region(reader)
    if t_resample:
        pred.timings["resample"] = t_resample
    return pred, rgb, image_mpp, scale


def postprocess_region(pred: RegionPrediction, nuclei: NucleiParams | None = None, gland: GlandParams | None = None,
                       lumen: GlandParams | None = None) -> dict[str, TaskResult]:
    """Instances of every task of a :class:`RegionPrediction` (float16 maps are widened first)."""
    probs = {k: np.asarray(v, np.float32) for k, v in pred.probs.items()}
    return postprocess(probs, pred.mpp, nuclei=nuclei, gland=gland, lumen=lumen)


def predict_tile(model, image: np.ndarray, mpp: float | None = None, *, predictor=None,
                 nuclei: NucleiParams | None = None, gland: GlandParams | None = None,
                 lumen: GlandParams | None = None, **options) -> TilePrediction:
    """See :meth:`~cerberus_histo.api.Cerberus.predict_tile`; ``predictor`` reuses a configured
    :class:`~cerberus_histo.infer.engine.Predictor` (then ``options`` must be empty)."""
    if predictor is None:
        from .engine import Predictor

        predictor = Predictor(model, **options)
    elif options:
        raise TypeError(f"pass options to the Predictor, not with predictor=: {', '.join(options)}")
    pred, rgb, image_mpp, scale = predict_probs(predictor, image, mpp)
    t0 = time.perf_counter()
    results = postprocess_region(pred, nuclei, gland, lumen)
    timings = dict(pred.timings, postprocess=time.perf_counter() - t0)
    return TilePrediction(results, pred.mpp, pred.shape, tuple(rgb.shape[:2]), image_mpp, scale, pred.cell, timings)


# ---- a folder of images ----------------------------------------------------------------------------------
@dataclass
class TileRunSummary:
    """What :func:`infer_tiles` did: image file names done now, skipped (finished before) and failed (name ->
    one-line reason), and total seconds per stage over the images done now."""

    output: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def add_timings(self, timings: dict[str, float]) -> None:
        for k, v in timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + float(v)


def classify_patch_set(model, spec, names: Sequence[str] | None = None, task: str = "tissue"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The patch head (:meth:`~cerberus_histo.api.Cerberus.classify_patches`) on the images of a patch-class
    dataset (a :class:`~cerberus_histo.data.dataset.DatasetSpec` with ``classes.csv``), each brought to the model's
    mpp: ``(predicted, true)`` class indices in the order of ``names`` (default: every image, sorted)."""
    from ..data.resolution import scaled_shape
    from ..io.readers import resize

    names = sorted(spec.names()) if names is None else list(names)
    classes = spec.image_classes(task)
    images = []
    for n in names:
        image = spec.read_image(n)
        h, w = scaled_shape(image.shape[:2], spec.image_mpp(n), model.config.mpp)
        images.append(resize(image, (w, h)))
    from .engine import classify_patches

    probs = classify_patches(model, np.stack(images), head=f"{task}-class")
    return probs.argmax(1), np.array([classes[n] for n in names])


def list_images(path: Path) -> list[Path]:
    """An image file as ``[path]``, or the image files (by suffix) directly inside a folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CerberusError(f"--input {path} not found; pass an image file or a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CerberusError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return files


def is_finished(output: Path, stem: str, formats: Iterable[str], settings: dict | None = None) -> bool:
    """Whether a completion marker exists for ``stem``, lists every requested format and, when ``settings`` (a
    :func:`~.pool.run_key`) is given, was made with those settings."""
    done = read_marker(output, stem)
    return _has_formats(done, formats) and (settings is None or not changed_settings(done.get("settings"), settings))


def _has_formats(done: dict | None, formats: Iterable[str]) -> bool:
    return done is not None and set(formats) <= set(done.get("formats", ()))


def _recorded_files(done: dict | None) -> list[str]:
    """The file names a marker lists."""
    files = (done or {}).get("files")
    return [v for v in files.values() if isinstance(v, str)] if isinstance(files, dict) else []


def finish_tile(job: dict) -> dict:
    """Post-process one image's probabilities, write its outputs and then its completion marker (a worker's
    task; no torch). The files of the image's earlier result that this one does not replace (``stale_files``:
    made with other settings) are removed before the marker is written. Returns the marker's content."""
    from ..outputs.records import known_results
    from ..outputs.writers import write_outputs

    t0 = time.perf_counter()
    pred: RegionPrediction = job["pred"]
    results = known_results(postprocess_region(pred), job["metadata"]["trusted_heads"])
    t1 = time.perf_counter()
    files = write_outputs(job["output"], job["stem"], results, job["config"], mpp=job["image_mpp"],
                          image=job["image"], scale=job["scale"], formats=job["formats"],
                          centroids_only=job["centroids_only"], cell=pred.cell,
                          metadata={**job["metadata"], "tissue_cell": pred.cell},
                          heads=job["metadata"]["trusted_heads"], region=job.get("region"))
    t2 = time.perf_counter()
    timings = dict(job["timings"], **pred.timings, postprocess=t1 - t0, export=t2 - t1)
    counts = {t: len(r.instances) for t, r in results.items() if r.instances is not None}
    marker = {"input": job["source"], "image_shape": list(job["image"].shape[:2]), "image_mpp": job["image_mpp"],
              "model_mpp": pred.mpp, "scale": job["scale"], "formats": list(job["formats"]),
              "files": {k: Path(v).name for k, v in files.items()}, "counts": counts,
              "timings_s": {k: round(v, 4) for k, v in timings.items()}, **job["metadata"],
              "settings": job["settings"]}
    written = {Path(v).name for v in files.values()}
    for name in job.get("stale_files", ()):
        if name not in written and Path(name).name == name:  # a bare file name: never a path out of the folder
            (Path(job["output"]) / name).unlink(missing_ok=True)
    write_marker(job["output"], job["stem"], marker)
    return marker


def tile_mask(mask: Path | None, image: Path, stem: str) -> Path | None:
    """The mask of tile ``image``: ``mask`` itself when it is a file (one mask for every tile), ``{mask}/{stem}.png``
    (or ``{stem}_mask.png``, ``{image name}.png``) when it is a folder; None without ``mask``. A folder without the
    tile's mask is a one-line error for that tile."""
    if mask is None:
        return None
    mask = Path(mask)
    if not mask.is_dir():
        return mask
    names = (f"{stem}.png", f"{stem}_mask.png", f"{Path(image).name}.png")
    for name in names:
        if (mask / name).is_file():
            return mask / name
    raise CerberusError(f"no mask for {Path(image).name} in {mask} (looked for {', '.join(names)})")


def _mask_key(mask: Path | None, image: Path, stem: str) -> dict:
    """The mask's part of a tile's run key: none without a mask (so keys of runs without one stay as they were),
    else ``sha1:`` and the hash of the tile's mask file (``unavailable`` when it cannot be found or read)."""
    if mask is None:
        return {}
    try:
        return {"mask": file_id(tile_mask(mask, image, stem))}
    except (OSError, CerberusError):
        return {"mask": "unavailable"}


def _mask_region(mask_file: Path, rgb: np.ndarray, image_mpp: float, name: str, echo):
    """The tile's mask as a shapely geometry in image pixels, inside the image (as slides do, docs/wsi.md)."""
    import shapely

    from ..io.tissue import load_mask
    from ..outputs.records import mask_region

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask, mask_mpp = load_mask(mask_file, ArrayReader(rgb, image_mpp, name))
    for w in caught:
        echo(f"warning: {name}: {w.message}")
    h, w = rgb.shape[:2]
    return shapely.clip_by_rect(mask_region(mask, mask_mpp / image_mpp), 0, 0, w, h)


def infer_tiles(model_dir: Path, input_path: Path, output: Path, options: RunOptions | None = None,
                **settings) -> TileRunSummary:
    """Predict every image of ``input_path`` (a file or a folder) with the model in ``model_dir`` and write
    the results to ``output`` (see the module docstring).

    ``options`` (a :class:`~.options.RunOptions`), or its fields as keyword ``settings``
    (``infer_tiles(model_dir, input, output, postproc_workers=2, mpp=0.25)``), set the run: ``mpp``, the machine
    settings, ``tta``, the window, ``postproc_workers`` (the pool's processes), ``formats``, ``centroids_only``,
    ``progress``, ``echo`` (where its lines go; default stderr) and ``mask`` (:func:`tile_mask`). Left ``None``/``auto`` they are chosen for the
    machine (:mod:`.runtime`; ``postproc_workers``: the cores the network leaves free) and stated first. A slide
    setting (``workers``, ``scheduler``) is an error. Per-image problems are reported on one line each
    and collected in the summary's ``failed``; problems with the model, the options or the output folder raise a
    one-line :class:`CerberusError` before any work, and before ``output`` is created. An image whose marker was
    made with other settings (:func:`~.pool.run_key`: the model's weights and config, the images' mpp, the window,
    ``tta``, the precision used, ``centroids_only``, the trusted heads, the mask's content) is done again, with one line for all such
    images. Each image is predicted and written holding its lock (:class:`~cerberus_histo.io.locks.ResultLock`,
    released once its marker is written): an image another run on ``output`` holds is done last, waited for, and
    skipped if that run finished it."""
    if options is not None and settings:
        raise TypeError(f"pass settings in options or as keywords, not both: {', '.join(settings)}")
    opts = (options if options is not None else RunOptions.from_settings(**settings)).check_for("tiles")
    echo = opts.say
    images = list_images(input_path)
    output = check_output(output)
    if opts.mask is not None and not opts.mask.exists():
        raise CerberusError(f"--mask {opts.mask} not found; pass a mask image or a folder of masks named after the "
                            "tiles")
    stems = output_stems(images)
    markers = {p: read_marker(output, stems[p]) for p in images}

    from ..models.checkpoint import load_model
    from .engine import Predictor
    from .runtime import plan_runtime

    model = load_model(model_dir)
    side = opts.input_shape or 1024
    runtime = plan_runtime(model, (side, side), **opts.runtime_settings())
    predictor = Predictor(model, input_shape=opts.input_shape, output_shape=opts.output_shape, tta=opts.tta,
                          runtime=runtime)
    g = predictor.geometry
    window = f"{g.input_shape}/{g.output_shape}{' fit' if g.fit else ''}"
    key = run_key(model.config, weights_id(model), window=window, tta=opts.tta, precision=runtime.precision,
                  heads=list(predictor.heads), mpp=predictor.mpp if opts.mpp is None else opts.mpp,
                  centroids_only=opts.centroids_only)
    keys = {p: {**key, **_mask_key(opts.mask, p, stems[p])} for p in images}  # the mask is a setting per tile
    changed = {p: c for p, m in markers.items()
               if m is not None and (c := changed_settings(m.get("settings"), keys[p]))}
    todo = [p for p in images if p in changed or not _has_formats(markers[p], opts.formats)]
    summary = TileRunSummary(output, skipped=[p.name for p in images if p not in todo])
    if not todo:
        return summary
    echo(runtime.line(chunks=False))
    if changed:
        echo(redone_line(changed))
    untrained = [h for h in model.head_names if h not in predictor.heads]
    if untrained:
        echo(f"heads never trained (not run, nothing written): {', '.join(untrained)}")
    # only the trusted heads run (the predictor's default), and every file says only what they know
    metadata = {"model_dir": str(model_dir), "trusted_heads": list(predictor.heads),
                "mpp_given": opts.mpp is not None, "precision": runtime.precision,
                "tta": bool(opts.tta), "window": window}
    from ..progress import progress_bar

    bar = progress_bar(total=len(todo), unit="image", desc="infer-tile", progress=opts.progress)

    locks: dict[str, ResultLock] = {}  # image name -> its lock, held from its prediction until its marker is written

    def unlock(name: str) -> None:
        if (lock := locks.pop(name, None)) is not None:
            lock.release()

    def failed(name: str, reason: str, line: str | None = None) -> None:
        unlock(name)
        summary.failed[name] = reason
        echo(f"failed: {line or f'{name}: {reason}'}")
        bar.update()

    def collect(name: str, result: Future) -> None:
        try:
            marker = result.result()
            unlock(name)
        except Exception as exc:  # one image's post-processing or writing failed: report it, go on
            if (full := no_space_error(exc, default=output)) is not None:
                raise full from None  # unless the disk is full: every other image would fail the same way
            failed(name, one_line(exc))
        else:
            summary.done.append(name)
            summary.add_timings(marker["timings_s"])
            bar.update()

    try:
        with WorkerPool(runtime.postproc_workers, collect) as pool:
            queue, later = list(todo), set()
            for path in queue:  # an image another run on this folder holds goes once to the end, then is waited for
                if path not in later and (holder := held_by(output, stems[path])) is not None:
                    echo(f"{path.name} is held by another run ({holder}); doing the others first")
                    later.add(path)
                    queue.append(path)
                    continue
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        image = read_image(path)
                except CerberusError as exc:  # the message names the file
                    failed(path.name, str(exc), str(exc))
                    continue
                for w in caught:
                    echo(f"warning: {w.message}")
                t_read = time.perf_counter() - t0
                lock = locks[path.name] = ResultLock(output, stems[path])
                lock.acquire(on_wait=lambda holder, name=path.name: echo(
                    f"{name} is being processed by another run ({holder}); waiting"))
                if lock.took_over is not None:
                    echo(f"took over {path.name} from a run that ended ({lock.took_over})")
                if is_finished(output, stems[path], opts.formats, keys[path]):  # that run finished it meanwhile
                    unlock(path.name)
                    echo(f"{path.name}: finished by another run; skipped")
                    summary.skipped.append(path.name)
                    bar.update()
                    continue
                try:
                    pred, rgb, image_mpp, scale = predict_probs(predictor, image, opts.mpp, path.name)
                    mask_file = tile_mask(opts.mask, path, stems[path])
                    region = None if mask_file is None else _mask_region(mask_file, rgb, image_mpp, path.name, echo)
                except CerberusError as exc:
                    failed(path.name, str(exc))
                    continue
                job = {"pred": pred, "image": rgb, "image_mpp": image_mpp, "scale": scale, "config": model.config,
                       "output": output, "stem": stems[path], "formats": opts.formats,
                       "centroids_only": opts.centroids_only, "metadata": metadata, "source": str(path),
                       "timings": {"decode": t_read}, "settings": keys[path], "region": region,
                       "stale_files": _recorded_files(markers[path]) if path in changed else []}
                pool.submit(finish_tile, job, path.name)
                del job, pred  # a worker has its copy: bound the probability maps held here
            pool.drain()
    finally:
        for name in list(locks):
            unlock(name)
        bar.close()
    return summary


__all__ = ["TileRunSummary", "classify_patch_set", "finish_tile", "infer_tiles", "is_finished", "list_images",
           "postprocess_region", "predict_probs", "predict_tile", "tile_mask"]
