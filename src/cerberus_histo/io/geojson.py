"""JSON writers of annotation records: QuPath GeoJSON and the HoVer-Net JSON layout.

Both take the records of :func:`cerberus_histo.io.export.annotation_records` (task name -> records), whose
coordinates are already in the output frame (slide level 0), and write atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely

from .files import atomic_write

if TYPE_CHECKING:
    from .export import AnnotationRecords


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: (v if np.isfinite(v) else None) for k, v in values.items()}


def geojson_features(rec: AnnotationRecords, centroids_only: bool = False):
    """``(geometry_json, properties)`` per record: the geometry as GeoJSON text, the QuPath properties
    (``objectType``, ``classification = {"name", "color"}``, ``measurements``). With ``centroids_only``
    detections (nuclei) are Points at their centroids."""
    if centroids_only and rec.object_type == "detection":
        geoms = shapely.points(rec.centroid) if len(rec) else np.empty(0, object)
    else:
        geoms = rec.geometry
    texts = shapely.to_geojson(geoms) if len(rec) else []
    classes = [{"name": n, "color": list(c)} for n, c in zip(rec.class_names, rec.class_colors, strict=True)]
    for k, (text, meas) in enumerate(zip(texts, rec.measurement_rows(), strict=True)):
        props = {"objectType": rec.object_type, "classification": classes[int(rec.class_index[k])],
                 "measurements": _finite(meas)}
        yield text, props


def write_geojson(path: Path, records: Mapping[str, AnnotationRecords], centroids_only: bool = False) -> None:
    """A QuPath-readable GeoJSON FeatureCollection of every record: nuclei are ``"detection"`` objects,
    glands, lumina and tissue regions ``"annotation"`` objects; ``properties.classification`` carries the
    class name and RGB colour, ``properties.measurements`` the numbers. ``centroids_only`` writes nuclei as
    Points (millions of polygons are slow in QuPath). Streamed to disk, written atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [')
            first = True
            for rec in records.values():
                for text, props in geojson_features(rec, centroids_only):
                    f.write("\n" if first else ",\n")
                    first = False
                    f.write(f'{{"type": "Feature", "geometry": {text}, "properties": {json.dumps(props)}}}')
            f.write("\n]}\n")

    atomic_write(Path(path), write)


def _numbers(a: np.ndarray) -> list:
    """Nested lists of Python numbers, integers where every value is integral (as HoVer-Net writes them)."""
    a = np.asarray(a, np.float64)
    if a.size and np.all(a == np.round(a)):
        return a.astype(np.int64).tolist()
    return a.tolist()


#: HoVer-Net section name per task ("nuc" is HoVer-Net's own)
HOVERNET_SECTIONS = {"nuclei": "nuc", "gland": "gland", "lumen": "lumen"}


def hovernet_dict(records: Mapping[str, AnnotationRecords], mag: float | None = None) -> dict:
    """The HoVer-Net JSON layout: ``{"mag": mag, "nuc": {"<id>": {"bbox": [[y0, x0], [y1, x1]], "centroid":
    [x, y], "contour": [[x, y], ...], "type": int, "type_prob": float}}, "gland": {...}, "lumen": {...}}``.

    As HoVer-Net, bbox is ``[[rmin, cmin], [rmax, cmax]]`` (max exclusive) while centroid and contour are x, y.
    Lumina have ``"type": null``, ``"type_prob": null`` and ``"parent"``: their gland's id (0 = none).
    """
    out: dict = {"mag": mag}
    for task, section in HOVERNET_SECTIONS.items():
        rec = records.get(task)
        if rec is None:
            continue
        typed = rec.has_types and len(rec) > 0
        probs = rec.measurements.get("type_prob")
        parents = rec.measurements.get("parent_gland")
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in rec.contours], dtype=np.int64)])
        coords = np.concatenate(rec.contours).reshape(-1, 2) if len(rec) else np.zeros((0, 2))
        coords, bbox, centroid = _numbers(coords), _numbers(rec.bbox), rec.centroid.tolist()
        types = rec.types.tolist()
        probs = None if probs is None else probs.tolist()
        parents = None if parents is None else parents.astype(np.int64).tolist()
        starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
        objs = {}
        for k, i in enumerate(rec.ids.tolist()):
            x0, y0, x1, y1 = bbox[k]
            entry = {"bbox": [[y0, x0], [y1, x1]], "centroid": centroid[k], "contour": coords[starts[k]:ends[k]],
                     "type": types[k] if typed else None,
                     "type_prob": probs[k] if typed and probs is not None else None}
            if parents is not None:
                entry["parent"] = parents[k]
            objs[str(i)] = entry
        out[section] = objs
    return out


def write_hovernet_json(path: Path, records: Mapping[str, AnnotationRecords], mag: float | None = None) -> None:
    """Write :func:`hovernet_dict` as JSON, atomically."""
    data = hovernet_dict(records, mag)
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data)))
