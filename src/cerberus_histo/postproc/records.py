"""Per-instance records: id, bounding box, centroid, contour, area, type and type probability (no torch).

:class:`Instances` is columnar (NumPy arrays, one row per instance) so that writers (GeoJSON, SQLite, the
HoVer-Net JSON) and metrics take what they need without per-object dicts; :meth:`Instances.records` gives
dicts when wanted. Coordinates are pixels of the map, x then y; ``scale`` and ``offset`` map them to other
frames (for example level-0 slide pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi


def instance_types(inst: np.ndarray, type_map: np.ndarray, num_classes: int | None = None):
    """Majority type of each instance in a per-pixel class map (0 = background), and its pixel fraction.

    As the original: the most frequent class over the instance's pixels; if that is 0 and another class
    occurs, the most frequent non-zero class. Returns ``(ids, types, probs)`` for ids 1..max present.
    """
    inst = np.asarray(inst)
    ids = np.flatnonzero(np.bincount(inst.ravel()))
    ids = ids[ids > 0]
    if ids.size == 0:
        return ids.astype(np.int32), ids.astype(np.int32), ids.astype(np.float32)
    fg = inst > 0
    n = int(num_classes or int(type_map.max(initial=0)) + 1)
    counts = np.bincount(inst[fg].astype(np.int64) * n + type_map[fg], minlength=(int(ids.max()) + 1) * n)
    counts = counts.reshape(-1, n)[ids]
    best = counts.argmax(1)
    nonzero = counts[:, 1:].argmax(1) + 1 if n > 1 else best
    use_nonzero = (best == 0) & (counts[:, 1:].sum(1) > 0 if n > 1 else False)
    types = np.where(use_nonzero, nonzero, best)
    probs = counts[np.arange(len(ids)), types] / np.maximum(counts.sum(1), 1)
    return ids.astype(np.int32), types.astype(np.int32), probs.astype(np.float32)


@dataclass
class Instances:
    """Instances of one task. ``bbox`` is ``[x0, y0, x1, y1]`` (x1, y1 exclusive), ``centroid`` ``[x, y]``
    (mean of the pixel centres), ``contours[i]`` a ``K x 2`` float array of (x, y) vertices (outer boundary,
    pixel centres), ``area`` in pixels. ``types``/``type_probs`` are -1/0 when the task has no type head;
    ``parents`` holds the containing gland id for lumina (0 otherwise)."""

    ids: np.ndarray
    bbox: np.ndarray
    centroid: np.ndarray
    area: np.ndarray
    contours: list = field(repr=False)
    types: np.ndarray = None
    type_probs: np.ndarray = None
    parents: np.ndarray = None

    def __post_init__(self):
        n = len(self.ids)
        if self.types is None:
            self.types = np.full(n, -1, np.int32)
        if self.type_probs is None:
            self.type_probs = np.zeros(n, np.float32)
        if self.parents is None:
            self.parents = np.zeros(n, np.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def transformed(self, scale: float = 1.0, offset=(0.0, 0.0)) -> Instances:
        """The same instances with coordinates ``x * scale + offset`` (areas times ``scale**2``)."""
        off = np.asarray(offset, np.float64)
        return Instances(self.ids, self.bbox * scale + np.tile(off, 2), self.centroid * scale + off,
                         self.area * scale * scale, [c * scale + off for c in self.contours], self.types,
                         self.type_probs, self.parents)

    def records(self) -> list[dict]:
        return [{"id": int(i), "bbox": self.bbox[k].tolist(), "centroid": self.centroid[k].tolist(),
                 "contour": self.contours[k].tolist(), "area": float(self.area[k]), "type": int(self.types[k]),
                 "type_prob": float(self.type_probs[k]), "parent": int(self.parents[k])}
                for k, i in enumerate(self.ids)]


def measure(inst: np.ndarray, type_map: np.ndarray | None = None, num_classes: int | None = None,
            parents: dict[int, int] | None = None) -> Instances:
    """Records of every instance of ``inst`` (ids as in the map), with types from ``type_map`` if given."""
    inst = np.asarray(inst)
    slices = ndi.find_objects(inst)
    ids = np.array([i + 1 for i, s in enumerate(slices) if s is not None], np.int32)
    n = len(ids)
    if n == 0:
        empty = np.zeros((0, 4)), np.zeros((0, 2))
        return Instances(ids, empty[0], empty[1], np.zeros(0), [])
    fg = inst > 0
    ys, xs = np.nonzero(fg)
    labels = inst[fg].astype(np.int64)
    area = np.bincount(labels, minlength=int(ids.max()) + 1)[ids].astype(np.float64)
    cx = np.bincount(labels, weights=xs, minlength=int(ids.max()) + 1)[ids] / area
    cy = np.bincount(labels, weights=ys, minlength=int(ids.max()) + 1)[ids] / area
    bbox = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in (slices[i - 1] for i in ids)], np.float64)
    contours = []
    for i in ids:  # findContours needs one object at a time; each call is on the object's small crop
        sy, sx = slices[i - 1]
        crop = np.ascontiguousarray(inst[sy, sx] == i, np.uint8)
        found, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(sx.start, sy.start))
        c = max(found, key=len).reshape(-1, 2) if found else np.zeros((0, 2), np.int32)
        contours.append(c.astype(np.float64))
    types = probs = None
    if type_map is not None:
        _, types, probs = instance_types(inst, type_map, num_classes)
    par = None if parents is None else np.array([parents.get(int(i), 0) for i in ids], np.int32)
    return Instances(ids, bbox, np.stack([cx, cy], 1), area, contours, types, probs, par)
