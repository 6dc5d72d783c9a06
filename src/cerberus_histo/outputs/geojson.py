"""JSON writers of annotation records: QuPath GeoJSON and the HoVer-Net JSON layout.

Both take :class:`~.records.AnnotationRecords` in the output frame (slide level 0): a tile's (task name ->
records) or a slide's, streamed from its store batch by batch (:meth:`.store.AnnotationStore.records`), and write
atomically, one object at a time, so a slide with millions of nuclei is written in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import shapely

from ..io.files import atomic_write, json_text
from .records import AnnotationRecords


def _sets(records: Mapping[str, AnnotationRecords] | AnnotationRecords | Iterable[AnnotationRecords]
          ) -> Iterable[AnnotationRecords]:
    if isinstance(records, AnnotationRecords):
        return [records]
    return records.values() if isinstance(records, Mapping) else records


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: (v if np.isfinite(v) else None) for k, v in values.items()}


def geojson_features(rec: AnnotationRecords, centroids_only: bool = False):
    """``(geometry_json, properties)`` per record: the geometry as GeoJSON text, the QuPath properties
    (``objectType``, ``classification = {"name", "color"}``, ``measurements``). An untyped object (no trained type
    head, :data:`~.records.UNTYPED`) has no ``classification``: QuPath imports it unclassified, as its own
    detections are. With ``centroids_only`` detections (nuclei) are Points at their centroids."""
    if centroids_only and rec.object_type == "detection":
        geoms = shapely.points(rec.centroid) if len(rec) else np.empty(0, object)
    else:
        geoms = rec.geometry
    texts = shapely.to_geojson(geoms) if len(rec) else []
    classes = [{"name": n, "color": list(c)} for n, c in zip(rec.class_names, rec.class_colors, strict=True)]
    class_index = rec.class_index.tolist()
    for text, meas, c in zip(texts, rec.measurement_rows(), class_index, strict=True):
        props = {"objectType": rec.object_type}
        if c >= 0:
            props["classification"] = classes[c]
        props["measurements"] = _finite(meas)
        yield text, props


def write_geojson(path: Path, records: Mapping[str, AnnotationRecords] | Iterable[AnnotationRecords],
                  centroids_only: bool = False) -> int:
    """A QuPath-readable GeoJSON FeatureCollection of every record (task -> records, or record sets in the order
    to write): nuclei are ``"detection"`` objects, glands, lumina and tissue regions ``"annotation"`` objects;
    ``properties.classification`` carries the class name and RGB colour (none for untyped objects),
    ``properties.measurements`` the numbers.
    ``centroids_only`` writes nuclei as Points (millions of polygons are slow in QuPath). Streamed to disk, written
    atomically; returns the number of features."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [')
            for rec in _sets(records):
                for text, props in geojson_features(rec, centroids_only):
                    f.write("\n" if count == 0 else ",\n")
                    count += 1
                    f.write(f'{{"type": "Feature", "geometry": {text}, "properties": {json_text(props)}}}')
            f.write("\n]}\n")

    atomic_write(Path(path), write)
    return count


def _numbers(a: np.ndarray) -> list:
    """Nested lists of Python numbers, integers where every value is integral (as HoVer-Net writes them)."""
    a = np.asarray(a, np.float64)
    if a.size and np.all(a == np.round(a)):
        return a.astype(np.int64).tolist()
    return a.tolist()


#: HoVer-Net section name per task ("nuc" is HoVer-Net's own)
HOVERNET_SECTIONS = {"nuclei": "nuc", "gland": "gland", "lumen": "lumen"}


def _hovernet_entries(rec: AnnotationRecords):
    """``(id, entry)`` per object of one task in the HoVer-Net layout (see :func:`hovernet_dict`)."""
    probs = rec.measurements.get("type_prob")
    parents = rec.measurements.get("parent_gland")
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in rec.contours], dtype=np.int64)])
    coords = np.concatenate(rec.contours).reshape(-1, 2) if len(rec) else np.zeros((0, 2))
    coords, bbox, centroid = _numbers(coords), _numbers(rec.bbox), rec.centroid.tolist()
    types = rec.types.tolist()
    probs = None if probs is None else probs.tolist()
    parents = None if parents is None else parents.astype(np.int64).tolist()
    starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
    for k, i in enumerate(rec.ids.tolist()):
        x0, y0, x1, y1 = bbox[k]
        typed = types[k] >= 0  # untyped (no trained type head) and lumina: null
        entry = {"bbox": [[y0, x0], [y1, x1]], "centroid": centroid[k], "contour": coords[starts[k]:ends[k]],
                 "type": types[k] if typed else None,
                 "type_prob": probs[k] if typed and probs is not None else None}
        if parents is not None:
            entry["parent"] = parents[k]
        yield str(i), entry


def hovernet_dict(records: Mapping[str, AnnotationRecords], mag: float | None = None) -> dict:
    """The HoVer-Net JSON layout: ``{"mag": mag, "nuc": {"<id>": {"bbox": [[y0, x0], [y1, x1]], "centroid":
    [x, y], "contour": [[x, y], ...], "type": int, "type_prob": float}}, "gland": {...}, "lumen": {...}}``.

    As HoVer-Net, bbox is ``[[rmin, cmin], [rmax, cmax]]`` (max exclusive) while centroid and contour are x, y.
    Untyped instances (no trained type head) have ``"type": null`` and ``"type_prob": null``; so do lumina, which
    also have ``"parent"``: their gland's id (0 = none).
    """
    out: dict = {"mag": mag}
    for task, section in HOVERNET_SECTIONS.items():
        if task in records:
            out[section] = dict(_hovernet_entries(records[task]))
    return out


def write_hovernet_json(path: Path, records: Mapping[str, AnnotationRecords | Iterable[AnnotationRecords]],
                        mag: float | None = None) -> None:
    """Write :func:`hovernet_dict` as JSON, atomically, one object at a time: ``records`` maps each task to its
    records, or to record sets streamed from a store (one section per task present)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f'{{"mag": {json_text(mag)}')
            for task, section in HOVERNET_SECTIONS.items():
                if task not in records:
                    continue
                f.write(f', "{section}": {{')
                first = True
                for rec in _sets(records[task]):
                    for key, entry in _hovernet_entries(rec):
                        f.write(f'"{key}": ' if first else f', "{key}": ')
                        first = False
                        f.write(json_text(entry))
                f.write("}")
            f.write("}")

    atomic_write(Path(path), write)
