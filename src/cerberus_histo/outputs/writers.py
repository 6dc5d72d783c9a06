"""Every output file of a result, for a tile (:func:`write_outputs`) and a slide (:func:`write_slide_outputs`).

Both go through the same writers: GeoJSON and HoVer-Net JSON (:mod:`.geojson`), the summary (:mod:`.summary`),
the overlay or thumbnail (:mod:`.overlay`) and PNG (:func:`~cerberus_histo.io.files.write_png`). A tile's records
are built here from its post-processed results; a slide's are streamed back from its store batch by batch, so
nothing holds a slide's objects in memory. Every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import shapely

from .._version import __version__
from ..errors import CerberusError
from ..io.files import atomic_write, json_text, no_space_error, write_png
from .geojson import write_geojson, write_hovernet_json
from .overlay import render_overlay
from .records import (
    INSTANCE_TASKS,
    AnnotationRecords,
    annotation_records,
    clip_records,
    known_heads,
    known_results,
    result_heads,
)
from .store import write_store
from .summary import summarize, write_summary

FORMATS = ("geojson", "sqlite", "npz", "hovernet", "overlay", "csv")


def _smallest_uint(a: np.ndarray) -> np.ndarray:
    top = int(a.max(initial=0))
    if int(a.min(initial=0)) < 0:
        return a.astype(np.int32)
    return a.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32)


def write_label_maps(path: Path, results: Mapping, meta: Mapping | None = None) -> None:
    """Compressed ``.npz`` of the maps, at map resolution: ``{task}_inst`` and ``{task}_type`` per instance
    task, ``tissue_class`` (and ``tissue_prob``, float16) for the tissue task, in the smallest unsigned
    integer type that holds them; ``meta`` (JSON text) records the frame (mpp, scale, offset and, for tiles,
    ``tissue_cell``: map pixels per ``tissue_class`` value)."""
    arrays: dict[str, np.ndarray] = {}
    for task, res in results.items():
        if res.inst_map is not None:
            arrays[f"{task}_inst"] = _smallest_uint(np.asarray(res.inst_map))
        if res.type_map is not None:
            arrays[f"{task}_type"] = _smallest_uint(np.asarray(res.type_map))
        if res.class_map is not None:
            arrays[f"{task}_class"] = _smallest_uint(np.asarray(res.class_map))
        if res.class_prob is not None:
            arrays[f"{task}_prob"] = np.asarray(res.class_prob, np.float16)
    arrays["meta"] = np.array(json_text(dict(meta or {})))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a path
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)


def _file_name(stem: str, fmt: str) -> str:
    return {"geojson": f"{stem}.geojson", "sqlite": f"{stem}.db", "npz": f"{stem}.npz", "hovernet": f"{stem}.json",
            "overlay": f"{stem}_overlay.png", "csv": f"{stem}_summary.csv"}[fmt]


def _cannot_write(folder: Path, exc: OSError) -> CerberusError:
    if (full := no_space_error(exc, default=folder)) is not None:  # room is made, not another folder chosen
        return full
    why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc)).lower()
    return CerberusError(f"cannot write to {folder}: {why}; choose another --output")


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The formats as a tuple; an unknown name is a one-line error naming the valid ones."""
    fmts = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown:
        raise CerberusError(f"unknown output format(s) {', '.join(map(repr, unknown))}; "
                            f"choose from {', '.join(FORMATS)}")
    return fmts


def _tissue_map(results: Mapping) -> np.ndarray | None:
    return next((np.asarray(r.class_map) for r in results.values() if r.class_map is not None), None)


def write_outputs(folder: Path, stem: str, results: Mapping, config, *, mpp: float, image: np.ndarray | None = None,
                  scale: float = 1.0, offset: Sequence[float] = (0.0, 0.0), formats: Iterable[str] = FORMATS,
                  centroids_only: bool = False, metadata: Mapping | None = None,
                  overlay_max_side: int | None = 4096,
                  records: Mapping[str, AnnotationRecords] | None = None,
                  cell: float | None = None, heads: Iterable[str] | None = None,
                  region=None) -> dict[str, Path]:
    """Write the results of one image in ``formats``, each file atomically; returns format -> path.

    Files: ``{stem}.geojson`` (QuPath), ``{stem}.db`` (TIAToolbox SQLiteStore), ``{stem}.npz`` (label maps),
    ``{stem}.json`` (HoVer-Net layout), ``{stem}_overlay.png`` (only when ``image`` is given) and
    ``{stem}_summary.csv`` (:func:`~.summary.write_summary`). ``mpp`` is the resolution of the output coordinates
    and the maps are at ``mpp * scale`` (see :func:`~.records.annotation_records`); ``metadata`` adds keys to
    the store's metadata beside ``mpp``, ``processing_mpp``, ``scale``, ``offset``, ``software`` and ``model``.
    Every geometry is clipped to the image (``image``'s extent, else the maps' times ``scale``) and, when
    ``region`` (a user's mask as a shapely geometry in output coordinates, :func:`~.records.mask_region`) is given,
    to it by :func:`~.records.clip_records`' rule; the summary's analysed area is then the region's inside the image.
    ``records``: the :func:`~.records.annotation_records` of these results with the same ``mpp``, ``scale`` and
    ``offset``, when already built; built here otherwise. ``cell``: map pixels per tissue class cell. ``heads``:
    the model's trusted heads (:func:`~cerberus_histo.config.trusted_heads`; None: every head ``results`` hold);
    every file says only what they know (:func:`~.records.known_results`: no objects or maps of an untrusted
    ``inst``/``class`` head, untyped instances without a trusted ``type`` head), and the store's and the ``.npz``'s
    metadata list them as ``trusted_heads``. Unknown formats and folders that cannot be written are one-line
    :class:`CerberusError` s.
    """
    fmts = check_formats(formats)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _cannot_write(folder, PermissionError())
    held = set(result_heads(results))
    known = [h for h in known_heads(config, heads) if h in held]
    results = known_results(results, known)
    if records is None:
        records = annotation_records(results, config, mpp, scale, offset, cell=cell)
    records = {t: r for t, r in records.items() if t in results}
    shape = next((tuple(r.inst_map.shape) for r in results.values() if r.inst_map is not None), None)
    size = image.shape[:2] if image is not None else (None if shape is None else (shape[0] * scale, shape[1] * scale))
    bounds = None
    if size is not None:  # every geometry inside the image (resampled maps may reach half a pixel past it)
        x0, y0 = (float(v) for v in offset)
        bounds = shapely.box(x0, y0, x0 + float(size[1]), y0 + float(size[0]))
    if region is not None:  # and inside the user's mask
        bounds = region if bounds is None else shapely.intersection(bounds, region)
    if bounds is not None:
        records = {t: clip_records(r, bounds, mpp) for t, r in records.items()}
    class_map = _tissue_map(results)
    if class_map is not None and cell is None:  # stretched over the maps' extent
        cell = (shape[1] if shape else class_map.shape[1]) / class_map.shape[1]
    cell_out = float(cell or 1.0) * float(scale)  # output units per class-map cell

    meta = {"mpp": float(mpp), "processing_mpp": float(mpp) * float(scale), "scale": float(scale),
            "offset": [float(v) for v in offset], "software": {"cerberus_histo": __version__},
            "model": config.to_dict(), "trusted_heads": known, **dict(metadata or {})}
    paths: dict[str, Path] = {}
    try:
        for fmt in fmts:
            path = folder / _file_name(stem, fmt)
            if fmt == "geojson":
                write_geojson(path, records, centroids_only=centroids_only)
            elif fmt == "sqlite":
                write_store(path, records, meta)
            elif fmt == "npz":
                frame = ("mpp", "processing_mpp", "scale", "offset", "tissue_cell", "trusted_heads")
                write_label_maps(path, results, {k: meta[k] for k in frame if k in meta})
            elif fmt == "hovernet":
                write_hovernet_json(path, records, mag=round(10.0 / float(mpp), 2))
            elif fmt == "overlay":
                if image is None:
                    continue
                write_png(path, render_overlay(image, records, config, class_map=class_map, cell=cell_out,
                                               offset=offset, max_side=overlay_max_side))
            elif fmt == "csv":
                area = 0.0 if size is None else float(size[0]) * float(size[1]) * float(mpp) ** 2
                if region is not None:
                    area = float(shapely.area(bounds)) * float(mpp) ** 2
                summary = summarize(records, config, analysed_area_um2=area, class_map=class_map, cell=cell_out,
                                    offset=offset, heads=known)
                write_summary(None, path, summary)
            paths[fmt] = path
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    return paths


def write_slide_outputs(store, config, paths: Mapping[str, Path], *, mpp: float, class_map: np.ndarray | None,
                        cell: float, analysed_area_um2: float, thumbnail: np.ndarray, thumbnail_scale: float,
                        centroids_only: bool = False, heads: Iterable[str] | None = None,
                        unreadable: Iterable[Iterable[int]] = ()) -> dict:
    """Write a finished slide's files from its store (``store``: an :class:`~.store.AnnotationStore` in level-0
    pixels at ``mpp``), streaming its records: ``paths["geojson"]``, ``paths["hovernet"]``, the summary
    (``paths["summary_json"]``, ``paths["summary_csv"]``), the tissue-class map PNG (``paths["tissue"]``, one
    pixel per ``cell`` level-0 pixels, values = class index) and the overlay on ``thumbnail``
    (``thumbnail_scale`` thumbnail pixels per level-0 pixel) at ``paths["thumbnail"]``. ``heads``: the model's
    trusted heads (None: every head of ``config``): the store holds only their objects (the slide run keeps to
    them), and without a trusted tissue head no tissue map is written. ``unreadable``: the level-0 boxes
    ``(x, y, w, h)`` of the slide that could not be read (the summary's ``unreadable_regions``). Returns the
    summary."""
    known = known_heads(config, heads)
    tasks = [t for t in INSTANCE_TASKS if f"{t}-inst" in known]
    if "tissue-class" not in known:
        class_map = None
    write_geojson(paths["geojson"], store.records(config), centroids_only=centroids_only)
    write_hovernet_json(paths["hovernet"], {t: store.records(config, task=t) for t in tasks},
                        mag=round(10.0 / float(mpp), 2))
    summary = summarize(store.records(config), config, analysed_area_um2=analysed_area_um2, class_map=class_map,
                        cell=cell, heads=known)
    summary["unreadable_regions"] = [[int(v) for v in box] for box in unreadable]
    write_summary(paths["summary_json"], paths["summary_csv"], summary)
    if class_map is not None:
        write_png(paths["tissue"], class_map)
    outlines = chain.from_iterable(store.records(config, task=t) for t in tasks)
    write_png(paths["thumbnail"], render_overlay(thumbnail, outlines, config, class_map=class_map, cell=cell,
                                                 scale=thumbnail_scale, max_side=None, thumbnail=True))
    return summary


__all__ = ["FORMATS", "check_formats", "write_label_maps", "write_outputs", "write_slide_outputs"]
