"""Annotation records: the one columnar set of objects per task that every output is written from.

:func:`annotation_records` turns ``postprocess`` results (a :class:`~cerberus_histo.postproc.TaskResult` per
task) into :class:`AnnotationRecords`, one columnar table per task, in *output coordinates*: a map pixel
``(x, y)`` goes to ``(x, y) * scale + offset`` (x then y), so with the right ``scale`` and ``offset`` the
geometry lands in a slide's level-0 frame and QuPath / TIAToolbox overlay it without transformation. A slide's
records are appended to its store (:mod:`.store`) chunk by chunk and read back from it in batches
(:meth:`.store.AnnotationStore.records`) as the same :class:`AnnotationRecords`, so tiles and slides reach every
file format through the same writers (:mod:`.writers`).

Conventions:

* ``mpp`` is the resolution of the **output** coordinates (the slide's level 0 for slides); the maps are at
  ``mpp * scale`` µm/px. Areas are reported in µm².
* Instance polygons are the boundary pixels' indices (OpenCV / HoVer-Net convention), made valid (a contour
  that touches itself becomes a MultiPolygon of its lobes); an instance with no area left (one pixel, a
  one-pixel-wide line) becomes a Point at its centroid, so every instance is exported in every format.
* Instance areas are pixel counts (as in :class:`~cerberus_histo.postproc.Instances`), times ``(mpp*scale)²``.
* An instance's class is ``class_names[type]`` of its task when the task's type head is known (trained); without
  one, a task with a single foreground class (``lumen``) gets that class (``class_names[1]``, ``"lumen"``, never
  another task's), and any other task's instances are *untyped*: ``class_index`` :data:`UNTYPED` (-1), no class
  name, the neutral colour :data:`UNTYPED_COLOR`. Every writer follows this one rule (docs/outputs.md, "Instances
  without a type and untrained heads"). Lumina carry their containing gland's id as ``parent_gland``.
* ``heads`` (the model's trusted heads, :func:`~cerberus_histo.config.trusted_heads`) restricts what is written
  (:func:`known_results`): a task whose ``inst`` (or ``class``) head is not among them writes nothing, and one whose
  ``type`` head is not among them writes untyped instances.
* Tissue regions are the exact outlines of the class-map cells (the class map covers the same extent as the
  instance maps, at the same or a coarser resolution), one record per 4-connected region, with holes, clipped to
  the image or slide; class 0 (``background``) is not exported.
* :func:`clip_records` keeps every geometry inside a region (a user's tissue mask).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import shapely
from scipy import ndimage as ndi

from ..errors import CerberusError

#: QuPath object type per task (nuclei are detections: light-weight, many)
OBJECT_TYPES = {"nuclei": "detection"}
#: the order tasks are written in (tissue regions first, nuclei on top)
TASK_ORDER = ("tissue", "gland", "lumen", "nuclei")
INSTANCE_TASKS = ("gland", "lumen", "nuclei")
#: ``class_index`` of an instance without a type (no trained type head): no class name, the neutral colour
UNTYPED = -1
#: the colour of untyped instances in overlays and thumbnails (light grey: no class's colour)
UNTYPED_COLOR = (200, 200, 200)
#: the summary's row name for untyped instances (and the tissue column without a trained tissue head)
UNCLASSIFIED = "unclassified"


@dataclass
class AnnotationRecords:
    """Annotation records of one task, columnar (one row per object), in output coordinates.

    Attributes:
        task: the task name (``gland``, ``lumen``, ``nuclei``, ``tissue``).
        object_type: QuPath object type, ``"detection"`` (nuclei) or ``"annotation"``.
        class_names, class_colors: the task spec's classes; ``class_index`` indexes them.
        ids: instance id in the task's map (tissue: region number 1..N).
        types: the type-head class of each instance, -1 where the task has no (trusted) type head.
        class_index: the class of each object: ``types``; without a type head the task's own class (1) when it
            has a single foreground class (``lumen``), else :data:`UNTYPED` (-1: no class name, neutral colour).
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

    def class_name(self, k: int) -> str | None:
        """The class name of object ``k``, None when it is untyped."""
        c = int(self.class_index[k])
        return None if c < 0 else self.class_names[c]

    def class_color(self, k: int) -> list[int]:
        """The RGB colour of object ``k``'s class (:data:`UNTYPED_COLOR` when it is untyped)."""
        c = int(self.class_index[k])
        return list(UNTYPED_COLOR if c < 0 else self.class_colors[c])

    def colors(self) -> np.ndarray:
        """``N x 3`` uint8: each object's class colour, :data:`UNTYPED_COLOR` for untyped objects."""
        palette = np.asarray([*self.class_colors, UNTYPED_COLOR], np.uint8)
        return palette[np.where(self.class_index >= 0, self.class_index, len(self.class_colors))]

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

    @classmethod
    def from_geometries(cls, spec, ids: np.ndarray, class_index: np.ndarray, geometry: np.ndarray,
                        measurements: Mapping[str, np.ndarray], centroid: np.ndarray | None = None
                        ) -> AnnotationRecords:
        """Records of task ``spec`` (a :class:`~cerberus_histo.tasks.TaskSpec`) from valid geometries, as a store
        gives them back (``class_index`` :data:`UNTYPED` for untyped objects): ``types`` are ``class_index`` where
        the task has a type head (-1 for ``lumen``),
        ``centroid`` defaults to the geometries' centroids, ``bbox`` is their bounds and each contour the exterior
        ring of the geometry (of its largest part for a MultiPolygon; the point itself for a Point)."""
        n = len(ids)
        geometry = np.asarray(geometry, object).reshape(n)
        if centroid is None:
            centroid = shapely.get_coordinates(shapely.centroid(geometry)).reshape(n, 2)
        class_index = np.asarray(class_index, np.int64).reshape(n)
        typed = bool({"type", "class"} & set(spec.kinds))
        types = np.where(class_index >= 0, class_index, -1) if typed else np.full(n, -1, np.int64)
        return cls(spec.name, OBJECT_TYPES.get(spec.name, "annotation"), spec.class_names, spec.class_colors,
                   np.asarray(ids, np.int64).reshape(n), types, class_index, geometry, np.asarray(centroid, np.float64).reshape(n, 2),
                   shapely.bounds(geometry).reshape(n, 4) if n else np.zeros((0, 4)), exterior_rings(geometry),
                   {k: np.asarray(v, np.float64).reshape(n) for k, v in measurements.items()})


# ---- what the model knows --------------------------------------------------------------------------------
def own_class(task) -> int:
    """The class of an instance of ``task`` (a TaskSpec) that has no type: 1 when the task has a single
    foreground class (``lumen``: the ``inst`` head itself says what it is), else :data:`UNTYPED`."""
    return 1 if len(task.class_names) == 2 else UNTYPED


def known_heads(config, heads: Iterable[str] | None = None) -> tuple[str, ...]:
    """``heads`` (the model's trusted heads) among ``config``'s, in the config's order; None: every head."""
    if heads is None:
        return tuple(config.head_names)
    given = set(heads)
    return tuple(h for h in config.head_names if h in given)


def result_heads(results: Mapping) -> tuple[str, ...]:
    """The heads whose outputs ``postprocess`` results hold: ``{task}-inst`` per instance task, ``{task}-type``
    where it has a type map, ``{task}-class`` per class map."""
    out = []
    for task, res in results.items():
        if res.instances is not None or res.inst_map is not None:
            out.append(f"{task}-inst")
            if res.type_map is not None:
                out.append(f"{task}-type")
        elif res.class_map is not None:
            out.append(f"{task}-class")
    return tuple(out)


def known_results(results: Mapping, heads: Iterable[str]) -> dict:
    """``results`` (task -> :class:`~cerberus_histo.postproc.TaskResult`) restricted to what ``heads`` know: a
    task whose ``inst`` or ``class`` head is not in ``heads`` is left out (no objects, no maps), and an instance task
    whose ``type`` head is not loses its type map and its instances' types (-1: untyped, see the module
    docstring). The results themselves are not changed."""
    heads = set(heads)
    out = {}
    for task, res in results.items():
        if res.instances is None and res.inst_map is None:  # a class head (tissue)
            if f"{task}-class" in heads:
                out[task] = res
            continue
        if f"{task}-inst" not in heads:
            continue
        if f"{task}-type" not in heads:
            inst = res.instances
            if inst is not None:
                inst = replace(inst, types=np.full(len(inst), -1, np.int32),
                               type_probs=np.zeros(len(inst), np.float32))
            res = replace(res, instances=inst, type_map=None)
        out[task] = res
    return out


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
    class_index = np.where(types >= 0, types, own_class(task))  # no type: "lumen" for lumina, else untyped
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
                       cell: float | None = None, heads: Iterable[str] | None = None
                       ) -> dict[str, AnnotationRecords]:
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
        heads: the model's trusted heads (:func:`~cerberus_histo.config.trusted_heads`): ``results`` are first
            restricted to them (:func:`known_results`). None: ``results`` as they are (instances without types
            are untyped, see the module docstring).
    """
    if not (isinstance(mpp, (int, float)) and mpp > 0 and np.isfinite(mpp)):
        raise CerberusError(f"mpp must be microns per pixel > 0 (e.g. 0.25), got {mpp!r}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise CerberusError(f"scale must be > 0 (output pixels per map pixel), got {scale!r}")
    off = np.asarray(offset, np.float64).reshape(2)
    if heads is not None:
        results = known_results(results, heads)
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




def exterior_rings(geoms: np.ndarray) -> list[np.ndarray]:
    """The outline of each geometry as a ``K x 2`` ring without its closing point: a Polygon's exterior, the
    largest part's for a MultiPolygon, the point itself for a Point."""
    out = []
    for g in geoms:
        if g.geom_type == "MultiPolygon":
            g = max(g.geoms, key=lambda q: q.area)
        if g.geom_type == "Polygon":
            out.append(shapely.get_coordinates(g.exterior)[:-1])
        else:
            out.append(shapely.get_coordinates(g)[:1])
    return out


def clip_records(rec: AnnotationRecords, region, mpp: float) -> AnnotationRecords:
    """The records inside ``region`` (a shapely geometry in the records' coordinates, e.g. a user's tissue mask):
    an instance whose centroid lies outside is dropped and one that crosses the region's edge is cut at it; tissue
    regions are cut at it. A cut object's contour and box follow its new outline and its ``area_um2`` becomes its
    polygon's area (``mpp``: µm per output unit)."""
    if not len(rec):
        return rec
    shapely.prepare(region)
    if rec.task != "tissue":
        rec = rec.subset(shapely.intersects_xy(region, rec.centroid[:, 0], rec.centroid[:, 1]))
    inside = shapely.contains(region, rec.geometry) | (shapely.get_type_id(rec.geometry) == 0)
    if inside.all():
        return rec
    geoms = rec.geometry.copy()
    cut = np.flatnonzero(~inside)
    for i in cut:
        geoms[i] = _polygonal(shapely.intersection(geoms[i], region))
    keep = np.array([g is not None for g in geoms])
    rec = rec.subset(keep)
    geoms, cut_mask = geoms[keep], (~inside)[keep]
    contours = list(rec.contours)
    for i, ring in zip(np.flatnonzero(cut_mask), exterior_rings(geoms[cut_mask]), strict=True):
        contours[i] = ring
    bbox = rec.bbox.copy()
    bbox[cut_mask] = shapely.bounds(geoms[cut_mask]).reshape(-1, 4)
    meas = dict(rec.measurements)
    if "area_um2" in meas:
        meas["area_um2"] = np.where(cut_mask, shapely.area(geoms) * mpp * mpp, meas["area_um2"])
    return AnnotationRecords(rec.task, rec.object_type, rec.class_names, rec.class_colors, rec.ids, rec.types,
                             rec.class_index, geoms, rec.centroid, bbox, contours, meas)


def mask_region(mask: np.ndarray, scale: float):
    """A boolean mask as one valid geometry in output coordinates: mask pixel ``(i, j)`` is the square
    ``[j, j + 1) x [i, i + 1)`` times ``scale`` (output units per mask pixel)."""
    region = _class_regions(np.asarray(mask, bool))
    return shapely.transform(region, lambda xy: xy * scale) if scale != 1 else region
