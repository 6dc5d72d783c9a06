"""Result writers: one place builds annotation records from post-processed results; every writer consumes them.

:func:`annotation_records` turns ``postprocess`` results (a :class:`~cerberus_histo.postproc.TaskResult` per
task) into :class:`AnnotationRecords`, one columnar table per task, in *output coordinates*: a map pixel
``(x, y)`` goes to ``(x, y) * scale + offset`` (x then y), so with the right ``scale`` and ``offset`` the
geometry lands in a slide's level-0 frame and QuPath / TIAToolbox overlay it without transformation.

Conventions:

* ``mpp`` is the resolution of the **output** coordinates (the slide's level 0 for slides); the maps are at
  ``mpp * scale`` µm/px. Areas are reported in µm².
* Instance polygons are the boundary pixels' indices (OpenCV / HoVer-Net convention), made valid (a contour
  that touches itself becomes a MultiPolygon of its lobes); an instance with no area left (one pixel, a
  one-pixel-wide line) becomes a Point at its centroid, so every instance is exported in every format.
* Instance areas are pixel counts (as in :class:`~cerberus_histo.postproc.Instances`), times ``(mpp*scale)²``.
* An instance's class is ``class_names[type]`` of its task; a task without a type head (``lumen``) gets its
  own foreground class (``class_names[1]``, ``"lumen"``), never another task's. Lumina carry their
  containing gland's id as ``parent_gland``.
* Tissue regions are the exact outlines of the class-map cells (the class map covers the same extent as the
  instance maps, at the same or a coarser resolution), one record per 4-connected region, with holes; class 0
  (``background``) is not exported.

:func:`write_outputs` writes every format of a result in one call (each file atomically).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import shapely
from scipy import ndimage as ndi

from .. import __version__
from ..errors import CerberusError
from .files import atomic_write, atomic_write_bytes
from .geojson import write_geojson, write_hovernet_json
from .store import write_store

#: QuPath object type per task (nuclei are detections: light-weight, many)
OBJECT_TYPES = {"nuclei": "detection"}
TASK_ORDER = ("tissue", "gland", "lumen", "nuclei")
FORMATS = ("geojson", "sqlite", "npz", "hovernet", "overlay", "csv")


@dataclass
class AnnotationRecords:
    """Annotation records of one task, columnar (one row per object), in output coordinates.

    Attributes:
        task: the task name (``gland``, ``lumen``, ``nuclei``, ``tissue``).
        object_type: QuPath object type, ``"detection"`` (nuclei) or ``"annotation"``.
        class_names, class_colors: the task spec's classes; ``class_index`` indexes them.
        ids: instance id in the task's map (tissue: region number 1..N).
        types: the type-head class of each instance, -1 where the task has no type head (``lumen``).
        class_index: the class of each object (``types``, or 1 = the task's own class without a type head).
        geometry: shapely Polygon / MultiPolygon / Point per object, valid.
        centroid: ``N x 2`` (x, y); bbox: ``N x 4`` ``[x0, y0, x1, y1]`` (x1, y1 exclusive for instances).
        contours: the raw boundary ring of each object (``K x 2``, x then y), as HoVer-Net stores it.
        measurements: name -> ``N`` floats (``area_um2``; ``type_prob`` with a type head; ``parent_gland``
            for lumina; ``class_prob`` for tissue regions).
    """

    task: str
    object_type: str
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    ids: np.ndarray
    types: np.ndarray
    class_index: np.ndarray
    geometry: np.ndarray
    centroid: np.ndarray
    bbox: np.ndarray
    contours: list = field(repr=False)
    measurements: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_types(self) -> bool:
        """Whether the task has a type head (its ``types`` are class indices, not -1)."""
        return bool(len(self.types) == 0 or self.types.min() >= 0)

    def class_name(self, k: int) -> str:
        return self.class_names[int(self.class_index[k])]

    def class_color(self, k: int) -> list[int]:
        return list(self.class_colors[int(self.class_index[k])])

    def measurement_rows(self) -> list[dict[str, float]]:
        """One ``{name: value}`` dict per object (plain Python floats, JSON-ready)."""
        cols = {name: np.asarray(v, np.float64).tolist() for name, v in self.measurements.items()}
        return [{name: col[k] for name, col in cols.items()} for k in range(len(self))]

    def subset(self, keep: np.ndarray) -> AnnotationRecords:
        """The records selected by a boolean mask or index array."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        return AnnotationRecords(self.task, self.object_type, self.class_names, self.class_colors, self.ids[idx],
                                 self.types[idx], self.class_index[idx], self.geometry[idx], self.centroid[idx],
                                 self.bbox[idx], [self.contours[i] for i in idx],
                                 {k: v[idx] for k, v in self.measurements.items()})


# ---- building records ------------------------------------------------------------------------------------
def _polygonal(geom):
    """The polygonal part of a geometry made valid: a Polygon, a MultiPolygon, or None when it has no area."""
    fixed = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(fixed) if p.geom_type == "Polygon" and p.area > 0]
    if not parts:
        for p in shapely.get_parts(fixed):  # a GeometryCollection may nest a MultiPolygon
            if p.geom_type == "MultiPolygon":
                parts.extend(q for q in shapely.get_parts(p) if q.area > 0)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def ragged(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(coords, offsets)``: ``K_i x 2`` arrays concatenated (float64) and the ``N + 1`` offsets of each."""
    lengths = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    coords = np.concatenate(arrays).reshape(-1, 2).astype(np.float64) if len(arrays) else np.zeros((0, 2))
    return coords, offsets


def contour_geometries(contours: Sequence[np.ndarray], centroids: np.ndarray) -> np.ndarray:
    """Valid geometries of boundary rings (``K x 2`` each, x then y): a Polygon where the ring encloses area,
    a MultiPolygon where it touches itself, else a Point at the matching centroid. Vectorised; only the
    invalid rings are fixed one by one."""
    n = len(contours)
    out = np.empty(n, object)
    if n == 0:
        return out
    coords, offsets = ragged(contours)
    lengths = np.diff(offsets)
    ok = lengths >= 3
    if ok.any():
        # closed rings of the good contours: each ring's points, then its first point again
        starts, ends = offsets[:-1][ok], offsets[1:][ok]
        keep = np.repeat(ok, lengths)
        idx = np.insert(np.flatnonzero(keep), np.cumsum(lengths[ok]), starts)
        ring_off = np.concatenate([[0], np.cumsum(ends - starts + 1)])
        polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords[idx],
                                          (ring_off, np.arange(len(starts) + 1)))
        bad = ~shapely.is_valid(polys) | (shapely.area(polys) <= 0)
        for i in np.flatnonzero(bad):
            polys[i] = _polygonal(polys[i])
        out[ok] = polys
    empty = np.array([g is None for g in out], bool)
    if empty.any():
        out[empty] = shapely.points(np.asarray(centroids, np.float64)[empty])
    return out


def _transform(geoms: np.ndarray, scale: float, offset: np.ndarray) -> np.ndarray:
    if scale == 1.0 and not offset.any():
        return geoms
    return shapely.transform(geoms, lambda c: c * scale + offset)


def _instance_records(task, inst, mpp: float, scale: float, offset: np.ndarray) -> AnnotationRecords:
    n = len(inst)
    types = np.asarray(inst.types, np.int64)
    class_index = np.where(types >= 0, types, 1)  # no type head: the task's own class, "lumen" for lumina
    geoms = _transform(contour_geometries(inst.contours, inst.centroid), scale, offset)
    area_um2 = np.asarray(inst.area, np.float64) * (mpp * scale) ** 2
    meas = {"area_um2": area_um2}
    if n and types.min() >= 0:
        meas["type_prob"] = np.asarray(inst.type_probs, np.float64)
    if task.name == "lumen":
        meas["parent_gland"] = np.asarray(inst.parents, np.float64)
    centroid = np.asarray(inst.centroid, np.float64).reshape(-1, 2) * scale + offset
    bbox = np.asarray(inst.bbox, np.float64).reshape(-1, 4) * scale + np.tile(offset, 2)
    coords, offsets = ragged(inst.contours)
    contours = np.split(coords * scale + offset, offsets[1:-1]) if n else []
    return AnnotationRecords(task.name, OBJECT_TYPES.get(task.name, "annotation"), task.class_names,
                             task.class_colors, np.asarray(inst.ids, np.int64), types, class_index, geoms, centroid,
                             bbox, contours, meas)


def _class_regions(mask: np.ndarray) -> object:
    """Exact outline of the cells of a boolean mask (cell (i, j) = square [j, j+1) x [i, i+1)): the union of
    its row runs, runs with the same ends in consecutive rows merged first into one box. A valid Polygon /
    MultiPolygon with holes, or an empty geometry."""
    m = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(m, axis=1)
    ys, x0 = np.nonzero(d == 1)
    _, x1 = np.nonzero(d == -1)  # runs end in the same raster order as they start
    if len(ys) == 0:
        return shapely.GeometryCollection()
    order = np.lexsort((ys, x1, x0))
    ys, x0, x1 = ys[order], x0[order], x1[order]
    new = np.ones(len(ys), bool)  # a box starts where the run's ends change or a row is skipped
    new[1:] = (x0[1:] != x0[:-1]) | (x1[1:] != x1[:-1]) | (ys[1:] != ys[:-1] + 1)
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:], [len(ys)]]) - 1
    boxes = shapely.box(x0[first], ys[first], x1[first], ys[last] + 1)
    return shapely.simplify(shapely.union_all(boxes), 0)  # simplify(0) drops collinear vertices


def _tissue_records(task, res, shape: tuple[int, int] | None, mpp: float, scale: float,
                    offset: np.ndarray, cell: float | None = None) -> AnnotationRecords:
    cmap = np.asarray(res.class_map)
    h, w = cmap.shape
    if cell is not None:  # cells of cell x cell map pixels, the last ones clipped to the map's extent
        fy = fx = float(cell)
        shape = shape or (h * cell, w * cell)
    else:  # stretched over the map's extent
        fy, fx = (1.0, 1.0) if shape is None else (shape[0] / h, shape[1] / w)
    cls, geoms, probs = [], [], []
    for c in range(1, len(task.class_names)):  # class 0 is background: not exported
        mask = cmap == c
        if not mask.any():
            continue
        parts = [p for p in shapely.get_parts(_class_regions(mask)) if p.geom_type == "Polygon"]
        if res.class_prob is not None:
            comp, _ = ndi.label(mask)  # 4-connected, as the union's parts
            mean = ndi.mean(np.asarray(res.class_prob, np.float64), comp, np.arange(1, comp.max() + 1))
        for p in parts:
            if res.class_prob is not None:
                rp = shapely.get_coordinates(p.representative_point())[0]
                prob = float(mean[comp[int(rp[1]), int(rp[0])] - 1])
            p = shapely.transform(p, lambda xy: xy * np.array([fx, fy]))  # map pixels
            if shape is not None and cell is not None:  # inside the image: the last cells may reach past it
                p = shapely.clip_by_rect(p, 0, 0, shape[1], shape[0])
            for g in shapely.get_parts(p):
                if g.geom_type == "Polygon" and not g.is_empty:
                    cls.append(c)
                    geoms.append(g)
                    if res.class_prob is not None:
                        probs.append(prob)
    n = len(geoms)
    geoms_arr = np.empty(n, object)
    geoms_arr[:] = geoms
    if n:
        geoms_arr = shapely.transform(geoms_arr, lambda xy: xy * scale + offset)
    meas = {"area_um2": shapely.area(geoms_arr).astype(np.float64) * mpp * mpp if n else np.zeros(0)}
    if res.class_prob is not None:
        meas["class_prob"] = np.asarray(probs, np.float64)
    ids = np.arange(1, n + 1, dtype=np.int64)
    cls_arr = np.asarray(cls, np.int64)
    centroid = shapely.get_coordinates(shapely.centroid(geoms_arr)).reshape(-1, 2) if n else np.zeros((0, 2))
    bbox = shapely.bounds(geoms_arr).reshape(-1, 4) if n else np.zeros((0, 4))
    contours = [shapely.get_coordinates(g.exterior)[:-1] for g in geoms_arr]
    return AnnotationRecords(task.name, "annotation", task.class_names, task.class_colors, ids, cls_arr, cls_arr,
                             geoms_arr, centroid, bbox, contours, meas)


def annotation_records(results: Mapping, config, mpp: float, scale: float = 1.0,
                       offset: Sequence[float] = (0.0, 0.0), shape: tuple[int, int] | None = None,
                       cell: float | None = None) -> dict[str, AnnotationRecords]:
    """Annotation records of every task in ``results`` (``postprocess`` output), by task name.

    Args:
        results: task name -> :class:`~cerberus_histo.postproc.TaskResult`.
        config: the :class:`~cerberus_histo.config.ModelConfig` whose task specs name and colour the classes.
        mpp: microns per pixel of the output coordinates (the maps are at ``mpp * scale``).
        scale, offset: output coordinate = map pixel * ``scale`` + ``offset`` (x, y).
        shape: ``(H, W)`` of the instance maps in map pixels; taken from any ``inst_map`` in ``results`` when
            omitted (the tissue class map covers this extent at its own resolution).
        cell: map pixels per tissue class cell (the encoder's stride, 16). Given, each cell is ``cell`` pixels
            and the tissue regions are clipped to ``shape``, so none reaches past the image or slide; omitted,
            the class map is stretched over ``shape``.
    """
    if not (isinstance(mpp, (int, float)) and mpp > 0 and np.isfinite(mpp)):
        raise CerberusError(f"mpp must be microns per pixel > 0 (e.g. 0.25), got {mpp!r}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise CerberusError(f"scale must be > 0 (output pixels per map pixel), got {scale!r}")
    off = np.asarray(offset, np.float64).reshape(2)
    if shape is None:
        shape = next((tuple(r.inst_map.shape) for r in results.values() if r.inst_map is not None), None)
    out: dict[str, AnnotationRecords] = {}
    for name in sorted(results, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t)):
        res, task = results[name], config.task(name)
        if res.instances is not None:
            out[name] = _instance_records(task, res.instances, mpp, float(scale), off)
        elif res.class_map is not None:
            out[name] = _tissue_records(task, res, shape, mpp, float(scale), off, cell)
    return out


# ---- summary ---------------------------------------------------------------------------------------------
def summarize(records: Mapping[str, AnnotationRecords]) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {class: {"count", "area_um2", "mean_area_um2"}}}`` over every class of each task (class 0
    only where objects have it), so that absent classes show a zero count."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, rec in records.items():
        area = rec.measurements.get("area_um2", np.zeros(len(rec)))
        rows: dict[str, dict[str, float]] = {}
        classes = range(0 if (rec.class_index == 0).any() else 1, len(rec.class_names))
        for c in classes:
            sel = rec.class_index == c
            n, total = int(sel.sum()), float(area[sel].sum())
            rows[rec.class_names[c]] = {"count": n, "area_um2": total, "mean_area_um2": total / n if n else 0.0}
        out[task] = rows
    return out


def write_summary_csv(path: Path, records: Mapping[str, AnnotationRecords]) -> dict:
    """Write ``task,class,count,area_um2,mean_area_um2`` (one row per (task, class) of :func:`summarize`)
    atomically and return the summary dict."""
    summary = summarize(records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "class", "count", "area_um2", "mean_area_um2"])
    for task, rows in summary.items():
        for cls, r in rows.items():
            w.writerow([task, cls, r["count"], f"{r['area_um2']:.3f}", f"{r['mean_area_um2']:.3f}"])
    atomic_write_bytes(Path(path), buf.getvalue().encode())
    return summary


# ---- label maps and overlay ------------------------------------------------------------------------------
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
    arrays["meta"] = np.array(json.dumps(dict(meta or {})))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a path
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)


def render_overlay(image: np.ndarray, records: Mapping[str, AnnotationRecords], results: Mapping | None = None,
                   config=None, *, scale: float = 1.0, offset: Sequence[float] = (0.0, 0.0),
                   max_side: int | None = 4096, alpha: float = 0.35) -> np.ndarray:
    """RGB overlay of ``image`` (the maps' image, ``H x W x 3``): tissue classes tinted (class map upsampled
    nearest, class 0 left clear), instance outlines coloured by class (glands, lumina, then nuclei on top).
    Records are mapped back to image pixels with ``scale`` and ``offset``; images larger than ``max_side``
    are downscaled first."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    h, w = img.shape[:2]
    s = 1.0 if not max_side or max(h, w) <= max_side else max_side / max(h, w)
    if s != 1.0:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    oh, ow = img.shape[:2]
    for task, res in (results or {}).items():
        if res.class_map is None or config is None:
            continue
        colors = np.asarray(config.task(task).class_colors, np.uint8)
        cmap = cv2.resize(np.asarray(res.class_map).astype(np.uint16), (ow, oh), interpolation=cv2.INTER_NEAREST)
        blend = cv2.addWeighted(img, 1 - alpha, colors[cmap], alpha, 0)
        np.copyto(img, blend, where=(cmap > 0)[..., None])
    off = np.asarray(offset, np.float64)
    # records -> map pixels (undo scale, offset) -> image pixels (the image may be the maps' at another size)
    map_w = next((r.inst_map.shape[1] for r in (results or {}).values() if r.inst_map is not None), w)
    k = (w / map_w) * s
    for task in ("gland", "lumen", "nuclei"):
        rec = records.get(task)
        if rec is None or not len(rec):
            continue
        thick = 2 if task == "gland" and k >= 0.5 else 1
        coords, offsets = ragged(rec.contours)
        pts = np.split(np.round((coords - off) / scale * k).astype(np.int32).reshape(-1, 1, 2), offsets[1:-1])
        for c in np.unique(rec.class_index):
            color = tuple(int(v) for v in rec.class_colors[int(c)])
            cv2.polylines(img, [pts[i] for i in np.flatnonzero(rec.class_index == c)], True, color, thick)
    return img


def write_overlay(path: Path, image: np.ndarray, records: Mapping[str, AnnotationRecords],
                  results: Mapping | None = None, config=None, **kwargs) -> None:
    """PNG of :func:`render_overlay`, written atomically."""
    rgb = render_overlay(image, records, results, config, **kwargs)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise CerberusError(f"could not encode the overlay {path} as PNG")
    atomic_write_bytes(Path(path), buf.tobytes())


# ---- everything at once ----------------------------------------------------------------------------------
def _file_name(stem: str, fmt: str) -> str:
    return {"geojson": f"{stem}.geojson", "sqlite": f"{stem}.db", "npz": f"{stem}.npz", "hovernet": f"{stem}.json",
            "overlay": f"{stem}_overlay.png", "csv": f"{stem}_summary.csv"}[fmt]


def _cannot_write(folder: Path, exc: OSError) -> CerberusError:
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


def write_outputs(folder: Path, stem: str, results: Mapping, config, *, mpp: float, image: np.ndarray | None = None,
                  scale: float = 1.0, offset: Sequence[float] = (0.0, 0.0), formats: Iterable[str] = FORMATS,
                  centroids_only: bool = False, metadata: Mapping | None = None,
                  overlay_max_side: int | None = 4096,
                  records: Mapping[str, AnnotationRecords] | None = None,
                  cell: float | None = None) -> dict[str, Path]:
    """Write the results of one image or slide in ``formats``, each file atomically; returns format -> path.

    Files: ``{stem}.geojson`` (QuPath), ``{stem}.db`` (TIAToolbox SQLiteStore), ``{stem}.npz`` (label maps),
    ``{stem}.json`` (HoVer-Net layout), ``{stem}_overlay.png`` (only when ``image`` is given) and
    ``{stem}_summary.csv``. ``mpp`` is the resolution of the output coordinates and the maps are at
    ``mpp * scale`` (see :func:`annotation_records`); ``metadata`` adds keys to the store's metadata (slide
    name, ...) beside ``mpp``, ``processing_mpp``, ``scale``, ``offset``, ``software`` and ``model``.
    ``records``: the :func:`annotation_records` of these results with the same ``mpp``, ``scale`` and
    ``offset``, when already built (for example to :func:`summarize` them too); built here otherwise.
    Unknown formats and folders that cannot be written are one-line :class:`CerberusError` s. ``cell``: map pixels
    per tissue class cell (see :func:`annotation_records`).
    """
    fmts = check_formats(formats)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _cannot_write(folder, PermissionError())
    if records is None:
        records = annotation_records(results, config, mpp, scale, offset, cell=cell)

    meta = {"mpp": float(mpp), "processing_mpp": float(mpp) * float(scale), "scale": float(scale),
            "offset": [float(v) for v in offset], "software": {"cerberus_histo": __version__},
            "model": config.to_dict(), **dict(metadata or {})}
    paths: dict[str, Path] = {}
    try:
        for fmt in fmts:
            path = folder / _file_name(stem, fmt)
            if fmt == "geojson":
                write_geojson(path, records, centroids_only=centroids_only)
            elif fmt == "sqlite":
                write_store(path, records, meta)
            elif fmt == "npz":
                frame = ("mpp", "processing_mpp", "scale", "offset", "tissue_cell")
                write_label_maps(path, results, {k: meta[k] for k in frame if k in meta})
            elif fmt == "hovernet":
                write_hovernet_json(path, records, mag=round(10.0 / float(mpp), 2))
            elif fmt == "overlay":
                if image is None:
                    continue
                write_overlay(path, image, records, results, config, scale=scale, offset=offset,
                              max_side=overlay_max_side)
            elif fmt == "csv":
                write_summary_csv(path, records)
            paths[fmt] = path
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    return paths
