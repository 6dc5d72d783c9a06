"""Tiles: one image (:func:`predict_tile`) or a folder of images (:func:`infer_tiles`, ``cerberus infer-tile``).

Both go through the one engine (:class:`~cerberus_histo.infer.engine.Predictor`) with the image wrapped in an
:class:`~cerberus_histo.io.readers.ArrayReader`, exactly as slides go through it with a slide reader. An image
whose mpp differs from the model's is resampled once, as a whole, to the model's mpp; results stay in model
pixels and ``scale`` (image pixels per model pixel) maps them back.

:func:`infer_tiles` runs the network in this process and post-processing plus writing in a pool of
``workers`` processes, so that image ``i``'s post-processing overlaps image ``i + 1``'s inference. Every file is
written atomically, and a completion marker ``OUTPUT/done/{stem}.json`` (the image's summary: files, counts,
timings) is written last: a re-run skips the images that have one. An unreadable image is reported on one line and
the others are still done. This module imports torch only inside the functions that run the network, so the
workers stay light.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CerberusError
from ..io.files import atomic_write_bytes
from ..io.readers import IMAGE_SUFFIXES, ArrayReader, check_mpp, read_image
from ..postproc import GlandParams, NucleiParams, TaskResult, postprocess
from .results import RegionPrediction, TilePrediction

MARKER_DIR = "done"


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
    """See :meth:`~cerberus_histo.models.net.Cerberus.predict_tile`; ``predictor`` reuses a configured
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
    """The patch head (:meth:`~cerberus_histo.models.net.Cerberus.classify_patches`) on the images of a patch-class
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
    probs = model.classify_patches(np.stack(images), head=f"{task}-class")
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


def output_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Output file stem per image: its name without suffix, or with it where two images share a stem."""
    count: dict[str, int] = {}
    for p in paths:
        count[p.stem] = count.get(p.stem, 0) + 1
    return {p: p.stem if count[p.stem] == 1 else p.name for p in paths}


def check_output(folder: Path) -> Path:
    """Create the output folder; one-line errors when it is a file or cannot be written."""
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
    return Path(output) / MARKER_DIR / f"{stem}.json"


def is_finished(output: Path, stem: str, formats: Iterable[str]) -> bool:
    """Whether a completion marker exists for ``stem`` and lists every requested format."""
    try:
        done = json.loads(marker_path(output, stem).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and set(formats) <= set(done.get("formats", ()))


def finish_tile(job: dict) -> dict:
    """Post-process one image's probabilities, write its outputs and then its completion marker (a worker's
    task; no torch). Returns the marker's content."""
    from ..io.export import write_outputs

    t0 = time.perf_counter()
    pred: RegionPrediction = job["pred"]
    results = postprocess_region(pred)
    t1 = time.perf_counter()
    files = write_outputs(job["output"], job["stem"], results, job["config"], mpp=job["image_mpp"],
                          image=job["image"], scale=job["scale"], formats=job["formats"],
                          centroids_only=job["centroids_only"], cell=pred.cell,
                          metadata={**job["metadata"], "tissue_cell": pred.cell})
    t2 = time.perf_counter()
    timings = dict(job["timings"], **pred.timings, postprocess=t1 - t0, export=t2 - t1)
    counts = {t: len(r.instances) for t, r in results.items() if r.instances is not None}
    marker = {"input": job["source"], "image_shape": list(job["image"].shape[:2]), "image_mpp": job["image_mpp"],
              "model_mpp": pred.mpp, "scale": job["scale"], "formats": list(job["formats"]),
              "files": {k: Path(v).name for k, v in files.items()}, "counts": counts,
              "timings_s": {k: round(v, 4) for k, v in timings.items()}, **job["metadata"]}
    atomic_write_bytes(marker_path(job["output"], job["stem"]), json.dumps(marker, indent=2).encode())
    return marker


def _echo(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def infer_tiles(model_dir: Path, input_path: Path, output: Path, *, mpp: float | None = None,
                batch_size: int | None = None, device: str = "auto", workers: int | None = None,
                precision: str = "auto", threads: int | None = None, tta: bool = False,
                formats: Sequence[str] | None = None, input_shape: int | None = None,
                output_shape: int | None = None, centroids_only: bool = False, progress: bool = True,
                echo: Callable[[str], None] = _echo) -> TileRunSummary:
    """Predict every image of ``input_path`` (a file or a folder) with the model in ``model_dir`` and write
    the results to ``output`` (see the module docstring). Per-image problems are reported through ``echo``
    and collected in the summary's ``failed``; problems with the model, the options or the output folder raise
    a one-line :class:`CerberusError` before any work. Settings left ``None``/``auto`` are chosen for the machine
    (:mod:`.runtime`; ``workers``: the cores the network leaves free) and stated through ``echo`` first."""
    from ..io.export import FORMATS, check_formats

    fmts = check_formats(FORMATS if formats is None else formats)
    if mpp is not None:
        mpp = check_mpp(mpp, "--mpp")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise CerberusError(f"--workers must be 0 (post-process in this process) or more, got {workers!r}")
    images = list_images(input_path)
    output = check_output(output)
    stems = output_stems(images)
    todo = [p for p in images if not is_finished(output, stems[p], fmts)]
    summary = TileRunSummary(output, skipped=[p.name for p in images if p not in todo])
    if not todo:
        return summary

    from ..models.net import Cerberus
    from .engine import Predictor
    from .runtime import plan_runtime

    model = Cerberus.load(model_dir)
    side = input_shape or 1024
    runtime = plan_runtime(model, (side, side), device=device, precision=precision, batch_size=batch_size,
                           threads=threads, postproc_workers=workers)
    predictor = Predictor(model, input_shape=input_shape, output_shape=output_shape, tta=tta, runtime=runtime)
    echo(runtime.line(chunks=False))
    workers = runtime.postproc_workers
    g = predictor.geometry
    metadata = {"model_dir": str(model_dir), "mpp_given": mpp is not None, "precision": runtime.precision,
                "tta": bool(tta), "window": f"{g.input_shape}/{g.output_shape}{' fit' if g.fit else ''}"}
    pool = None
    if workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="image", desc="infer-tile", disable=not progress, file=sys.stderr)
    pending: deque = deque()

    def collect(name: str, result) -> None:
        try:
            marker = result.result() if pool is not None else result
        except Exception as exc:  # one image's post-processing or writing failed: report it, go on
            summary.failed[name] = _one_line(exc)
            echo(f"failed: {name}: {summary.failed[name]}")
        else:
            summary.done.append(name)
            summary.add_timings(marker["timings_s"])
        bar.update()

    try:
        for path in todo:
            stem, name = stems[path], path.name
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    image = read_image(path)
            except CerberusError as exc:
                summary.failed[name] = str(exc)
                echo(f"failed: {exc}")
                bar.update()
                continue
            for w in caught:
                echo(f"warning: {w.message}")
            t_read = time.perf_counter() - t0
            try:
                pred, rgb, image_mpp, scale = predict_probs(predictor, image, mpp, path.name)
            except CerberusError as exc:
                summary.failed[name] = str(exc)
                echo(f"failed: {name}: {exc}")
                bar.update()
                continue
            job = {"pred": pred, "image": rgb, "image_mpp": image_mpp, "scale": scale, "config": model.config,
                   "output": output, "stem": stem, "formats": fmts, "centroids_only": centroids_only,
                   "metadata": metadata, "source": str(path), "timings": {"decode": t_read}}
            if pool is None:
                try:
                    collect(name, finish_tile(job))
                except Exception as exc:
                    summary.failed[name] = _one_line(exc)
                    echo(f"failed: {name}: {summary.failed[name]}")
                    bar.update()
            else:
                pending.append((name, pool.submit(finish_tile, job)))
                while len(pending) > workers:  # bound the probability maps held in memory
                    collect(*pending.popleft())
        while pending:
            collect(*pending.popleft())
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return summary


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, CerberusError) else f"{type(exc).__name__}: {first}".rstrip(": ")


__all__ = ["MARKER_DIR", "TileRunSummary", "check_output", "finish_tile", "infer_tiles", "is_finished",
           "list_images", "output_stems", "postprocess_region", "predict_probs", "predict_tile"]
