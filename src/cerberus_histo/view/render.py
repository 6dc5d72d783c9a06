"""Overlay tiles: the objects of a result drawn as transparent RGBA tiles on the image's Deep Zoom grid.

An overlay tile has exactly the size and the place of the image tile at the same address (same ``tile_size``,
``overlap`` and levels), so the browser lays the two on each other and never receives a polygon. Drawn with NumPy
and OpenCV, bottom to top:

* tissue regions: a translucent fill (alpha :data:`TISSUE_ALPHA`) in their class colours;
* glands, then lumina: 2-px outlines in their class colours;
* nuclei: filled polygons (alpha :data:`NUCLEI_ALPHA`) with an opaque outline in their type colours (grey:
  untyped). Where a tile covers much (more than :data:`POLYGON_MAX_DOWNSAMPLE` level-0 px per tile px, or more
  than :data:`POLYGON_MAX_NUCLEI` nuclei) nuclei are dots at their centroids, sized to the nucleus at that zoom.

Speed at every zoom: each item's nuclei centroids (:meth:`~cerberus_histo.outputs.store.AnnotationStore.centroids`,
no geometry decoded), its glands, lumina and tissue regions (a few thousand shapes) and a tissue-class raster (at
most :data:`RASTER_SIDE` px a side) are read once and kept; only nuclei polygons of a zoomed-in tile are read from
the store's R-tree per tile. Coordinates: DZI level ``l`` of ``L`` has ``2**(L-1-l)`` level-0 px per pixel.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import shapely

from ..outputs.records import UNCLASSIFIED, UNTYPED_COLOR

TILE_SIZE = 254  # the Deep Zoom grid of image and overlay tiles
OVERLAP = 1
TISSUE_ALPHA = 90
NUCLEI_ALPHA = 160
DOT_ALPHA = 220
LINE = 2
RASTER_SIDE = 4096
POLYGON_MAX_DOWNSAMPLE = 4
POLYGON_MAX_NUCLEI = 3000
NUCLEUS_RADIUS_UM = 3.5  # a dot's radius at zoom levels where nuclei are dots
SHIFT = 4  # fixed-point bits of OpenCV drawing coordinates


def parse_hide(text: str | None) -> frozenset[str]:
    """``"tissue,nuclei:epithelial"`` -> the tokens (``task`` or ``task:class``) left out of the overlay."""
    return frozenset(t.strip() for t in (text or "").split(",") if t.strip())


def _palette(spec) -> np.ndarray:
    """Colour per label: 0 none, ``c + 1`` class ``c``, the last slot untyped (class index -1)."""
    return np.asarray([(0, 0, 0), *spec.class_colors, UNTYPED_COLOR], np.uint8)


def _slots(cls: np.ndarray, n: int) -> np.ndarray:
    """Labels of class indices (``c + 1``; untyped: ``n + 1``)."""
    return np.where(cls >= 0, cls + 1, n + 1).astype(np.uint8)


def _hidden_slots(spec, hide: frozenset[str]) -> set[int]:
    names = list(spec.class_names)
    out = {c + 1 for c, name in enumerate(names) if f"{spec.name}:{name}" in hide}
    return out | ({len(names) + 1} if f"{spec.name}:{UNCLASSIFIED}" in hide else set())


class Shapes:
    """Geometries as rings for OpenCV: ring coordinates (float64, x y), the object of each ring, each object's
    label and bounds."""

    def __init__(self, labels: np.ndarray, geoms: np.ndarray):
        n = len(geoms)
        self.labels = np.asarray(labels, np.uint8).reshape(n)
        self.bounds = shapely.bounds(geoms).reshape(n, 4) if n else np.zeros((0, 4))
        parts, owner = shapely.get_parts(geoms, return_index=True)
        kind = shapely.get_type_id(parts)
        polys, powner = parts[kind == shapely.GeometryType.POLYGON], owner[kind == shapely.GeometryType.POLYGON]
        points = kind == shapely.GeometryType.POINT
        self.points = shapely.get_coordinates(parts[points]).reshape(-1, 2)
        self.point_owner = owner[points]
        rings, rowner = shapely.get_rings(polys, return_index=True)
        coords, cidx = shapely.get_coordinates(rings, return_index=True)
        self.coords = coords
        self.coord_ring = cidx
        self.ring_owner = powner[rowner]
        self.ring_length = np.bincount(cidx, minlength=len(rings)).astype(np.int64)

    def select(self, box) -> np.ndarray:
        """Objects whose bounds intersect ``box = (x0, y0, x1, y1)``."""
        x0, y0, x1, y1 = box
        b = self.bounds
        return (b[:, 2] >= x0) & (b[:, 0] <= x1) & (b[:, 3] >= y0) & (b[:, 1] <= y1)

    def _pieces(self, keep: np.ndarray, transform) -> tuple[list[np.ndarray], np.ndarray]:
        """The kept objects' rings as int32 fixed-point tile coordinates (``transform``: level-0 x y -> tile px),
        and the object of each (an object's rings are consecutive)."""
        ring_mask = keep[self.ring_owner]
        ring_keep = np.flatnonzero(ring_mask)
        if not len(ring_keep):
            return [], np.zeros(0, np.int64)
        pts = np.round(transform(self.coords[ring_mask[self.coord_ring]]) * (1 << SHIFT)).astype(np.int32)
        return np.split(pts, np.cumsum(self.ring_length[ring_keep])[:-1]), self.ring_owner[ring_keep]

    def rings(self, keep: np.ndarray, transform) -> dict[int, list[np.ndarray]]:
        """Label -> the kept objects' rings (see :meth:`_pieces`): for outlines, and fills of objects that never
        overlap (tissue regions: one even-odd fill per class keeps their holes)."""
        pieces, owner = self._pieces(keep, transform)
        out: dict[int, list[np.ndarray]] = {}
        for label, ring in zip(self.labels[owner].tolist(), pieces, strict=True):
            out.setdefault(label, []).append(ring)
        return out

    def fill(self, image: np.ndarray, keep: np.ndarray, transform) -> None:
        """Fill each kept object on its own (its holes left out) with its label, in id order: instance polygons
        may overlap (the exterior ring of one with a hole covers what lies in the hole)."""
        pieces, owner = self._pieces(keep, transform)
        if not pieces:
            return
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]).tolist() + [len(pieces)]
        labels = self.labels[owner].tolist()
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            cv2.fillPoly(image, pieces[a:b], labels[a], cv2.LINE_8, SHIFT)


def raster_cell(width: int, height: int, max_side: int | None = None) -> int:
    """Level-0 px per pixel of an item's rasters: the smallest power of two keeping their sides <= ``max_side``
    (default :data:`RASTER_SIDE`)."""
    cell, max_side = 1, max_side or RASTER_SIDE
    while max(width, height) / cell > max_side:
        cell *= 2
    return cell


def _max_pool(a: np.ndarray) -> np.ndarray:
    """Half the size: each pixel the largest label of its 2 x 2 block (a one-pixel line stays connected)."""
    h, w = a.shape
    p = np.pad(a, ((0, h % 2), (0, w % 2)))
    return p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2).max(axis=(1, 3))


def tissue_raster(store, config, width: int, height: int, max_side: int | None = None) -> tuple[np.ndarray, int]:
    """The tissue regions of ``store`` as a ``uint8`` class map (0: none) with ``cell`` level-0 px per pixel (the
    smallest power of two keeping its sides <= ``max_side``); a pixel takes the class of the region over its centre."""
    cell = raster_cell(width, height, max_side)
    out = np.zeros((-(-height // cell), -(-width // cell)), np.uint8)
    try:
        spec = config.task("tissue")
    except Exception:
        return out, cell
    cls, geoms = store.shapes("tissue", None, spec.class_names)
    shapes = Shapes(np.clip(cls, 0, 254), geoms)
    for label, rings in shapes.rings(np.ones(len(geoms), bool), lambda xy: xy / cell - 0.5).items():
        if label:
            cv2.fillPoly(out, rings, int(label), cv2.LINE_8, SHIFT)
    return out, cell


class Overlay:
    """The overlay tiles of one item (see the module docstring); thread-safe, the caches built on first use."""

    def __init__(self, item):
        self.item = item
        self.config = item.config
        dz = item.deepzoom
        self.levels = dz.level_count
        self.specs = {t.name: t for t in self.config.tasks}
        self.palettes = {name: _palette(spec) for name, spec in self.specs.items()}
        self._lock = threading.Lock()
        self._cache: dict[str, object] = {}
        self._building: dict[str, threading.Lock] = {}

    # ---- caches --------------------------------------------------------------------------------------------
    def _get(self, key: str, build):
        """The cached value of ``key``, built once (one lock per key: a tile waits only for what it needs)."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            value = build()
            with self._lock:
                self._cache[key] = value
            return value

    def shapes(self, task: str) -> Shapes | None:
        """Every object of a task with few objects (glands, lumina, tissue regions), read once."""
        if task not in self.specs or not self.item.counts.get(task):
            return None

        def build():
            spec = self.specs[task]
            cls, geoms = self.item.store().shapes(task, None, spec.class_names)
            return Shapes(_slots(cls, len(spec.class_names)), geoms)

        return self._get(f"shapes:{task}", build)

    def centroids(self):
        """Every nucleus's centroid and label, sorted by x: ``(x, y, label)``."""

        def build():
            spec = self.specs["nuclei"]
            x, y, cls = self.item.store().centroids("nuclei", None, spec.class_names)
            order = np.argsort(x, kind="stable")
            return x[order], y[order], _slots(cls[order], len(spec.class_names))

        return self._get("centroids", build)

    def raster(self):
        return self._get("raster", lambda: tissue_raster(self.item.store(), self.config, self.item.width,
                                                          self.item.height))

    def outlines(self, task: str) -> list[np.ndarray] | None:
        """A task's outlines (1 px, labels) drawn once at :func:`raster_cell` level-0 px per pixel, and its
        max-pooled halvings: entry ``j`` is the Deep Zoom level with ``cell * 2**j`` level-0 px per pixel."""
        shapes = self.shapes(task)
        if shapes is None:
            return None

        def build():
            cell = raster_cell(self.item.width, self.item.height)
            base = np.zeros((-(-self.item.height // cell), -(-self.item.width // cell)), np.uint8)
            for label, rings in shapes.rings(np.ones(len(shapes.labels), bool),
                                             lambda xy: (xy + 0.5) / cell - 0.5).items():
                cv2.polylines(base, rings, True, int(label), 1, cv2.LINE_8, SHIFT)
            pyramid = [base]
            while max(pyramid[-1].shape) > 1:
                pyramid.append(_max_pool(pyramid[-1]))
            return pyramid

        return self._get(f"outlines:{task}", build)

    def preload(self) -> None:
        """Build every cache now (a server does it in the background when an item is opened)."""
        if self.item.counts.get("nuclei") and "nuclei" in self.specs:
            self.centroids()
        for task in ("gland", "lumen"):
            self.outlines(task)
        if self.item.counts.get("tissue") and "tissue" in self.specs:
            self.raster()
            if raster_cell(self.item.width, self.item.height) > 1:  # zoomed in past the raster: the polygons
                self.shapes("tissue")

    def clear(self) -> None:
        """Drop the caches (rebuilt when next needed): a viewer keeps those of the items it showed last."""
        with self._lock:
            self._cache.clear()

    # ---- drawing -------------------------------------------------------------------------------------------
    def tile(self, level: int, col: int, row: int, hide: frozenset[str] = frozenset()) -> np.ndarray:
        """The RGBA overlay tile at a Deep Zoom address (the image tile's size; ValueError outside the grid)."""
        dz = self.item.deepzoom
        w, h = dz.get_tile_dimensions(level, (col, row))  # ValueError for a bad address
        f = float(2 ** (self.levels - 1 - level))
        ox = col * TILE_SIZE - (OVERLAP if col else 0)
        oy = row * TILE_SIZE - (OVERLAP if row else 0)
        box = (ox * f, oy * f, (ox + w) * f, (oy + h) * f)
        canvas = np.zeros((h, w, 4), np.uint8)

        def centre(xy):  # instance vertices are level-0 pixel indices
            return (xy + 0.5) / f - 0.5 - (ox, oy)

        if "tissue" not in hide and self.item.counts.get("tissue") and "tissue" in self.specs:
            self._tissue(canvas, f, ox, oy, box, hide)
        pad = (LINE + 1) * f
        outer = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
        cell = raster_cell(self.item.width, self.item.height)
        for task in ("gland", "lumen"):
            shapes = None if task in hide else self.shapes(task)
            if shapes is None:
                continue
            lines = np.zeros((h, w), np.uint8)
            if f >= cell:  # a crop of the outline raster of this level
                pyramid = self.outlines(task)
                r = pyramid[min((int(f) // cell).bit_length() - 1, len(pyramid) - 1)]
                part = r[max(oy, 0):oy + h, max(ox, 0):ox + w]
                lines[:part.shape[0], :part.shape[1]] = part
            else:
                for label, rings in shapes.rings(shapes.select(outer), centre).items():
                    cv2.polylines(lines, rings, True, int(label), 1, cv2.LINE_8, SHIFT)
            gone = _hidden_slots(self.specs[task], hide)
            if gone:
                lines[np.isin(lines, list(gone))] = 0
            lines = cv2.dilate(lines, np.ones((LINE, LINE), np.uint8))  # 2-px lines, cheaper than thick ones
            drawn = lines > 0
            canvas[drawn, :3] = self.palettes[task][lines[drawn]]
            canvas[drawn, 3] = 255
        if "nuclei" not in hide and self.item.counts.get("nuclei") and "nuclei" in self.specs:
            self._nuclei(canvas, f, ox, oy, outer, centre, hide)
        return canvas

    def _tissue(self, canvas, f, ox, oy, box, hide) -> None:
        h, w = canvas.shape[:2]
        spec = self.specs["tissue"]
        raster, cell = self.raster()
        if f >= cell:  # sample the raster at the tile pixels' centres
            k = int(f) // cell
            rows = np.clip((oy + np.arange(h)) * k + k // 2, 0, raster.shape[0] - 1)
            cols = np.clip((ox + np.arange(w)) * k + k // 2, 0, raster.shape[1] - 1)
            label = raster[rows[:, None], cols[None, :]]
            label = np.where(label > 0, label + 1, 0).astype(np.uint8)  # class c -> label c + 1
        else:  # zoomed in further than the raster: the regions' exact outlines
            shapes = self.shapes("tissue")
            label = np.zeros((h, w), np.uint8)
            for lab, rings in shapes.rings(shapes.select(box), lambda xy: xy / f - 0.5 - (ox, oy)).items():
                cv2.fillPoly(label, rings, int(lab), cv2.LINE_8, SHIFT)
        gone = _hidden_slots(spec, hide) | {1}  # class 0 (background) is never drawn
        alpha = np.full(len(self.palettes["tissue"]), TISSUE_ALPHA, np.uint8)
        alpha[0] = 0
        alpha[[g for g in gone if g < len(alpha)]] = 0
        canvas[..., :3] = self.palettes["tissue"][label]
        canvas[..., 3] = alpha[label]

    def _nuclei(self, canvas, f, ox, oy, box, centre, hide) -> None:
        h, w = canvas.shape[:2]
        spec = self.specs["nuclei"]
        gone = _hidden_slots(spec, hide)
        x, y, labels = self.centroids()
        lo, hi = np.searchsorted(x, [box[0], box[2]])
        inside = (y[lo:hi] >= box[1]) & (y[lo:hi] <= box[3])
        label = np.zeros((h, w), np.uint8)
        if f <= POLYGON_MAX_DOWNSAMPLE and inside.sum() <= POLYGON_MAX_NUCLEI:
            cls, geoms = self.item.store().shapes("nuclei", box, spec.class_names)
            shapes = Shapes(_slots(cls, len(spec.class_names)), geoms)
            keep = ~np.isin(shapes.labels, list(gone))
            edge = np.zeros((h, w), np.uint8)
            shapes.fill(label, keep, centre)
            for lab, rings in shapes.rings(keep, centre).items():
                cv2.polylines(edge, rings, True, int(lab), 1, cv2.LINE_8, SHIFT)
            pk = keep[shapes.point_owner]
            self._dots(label, centre(shapes.points[pk]), shapes.labels[shapes.point_owner[pk]], 1)
            alpha = np.where(edge > 0, 255, np.where(label > 0, NUCLEI_ALPHA, 0)).astype(np.uint8)
            label = np.where(edge > 0, edge, label)
        else:
            xs, ys, lab = x[lo:hi][inside], y[lo:hi][inside], labels[lo:hi][inside]
            if gone:
                keep = ~np.isin(lab, list(gone))
                xs, ys, lab = xs[keep], ys[keep], lab[keep]
            radius = int(min(3, round(NUCLEUS_RADIUS_UM / self.item.mpp / f)))
            self._dots(label, centre(np.stack([xs, ys], 1)), lab, radius)
            alpha = np.where(label > 0, DOT_ALPHA, 0).astype(np.uint8)
        _over(canvas, self.palettes["nuclei"][label], alpha)

    @staticmethod
    def _dots(label: np.ndarray, uv: np.ndarray, labels: np.ndarray, radius: int) -> None:
        """Discs of ``radius`` px (0: one pixel) at tile coordinates ``uv``."""
        if not len(uv):
            return
        h, w = label.shape
        px, py = np.round(uv[:, 0]).astype(np.int64), np.round(uv[:, 1]).astype(np.int64)
        r = max(0, radius)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dx * dx + dy * dy > r * r + r:
                    continue
                xx, yy = px + dx, py + dy
                ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
                label[yy[ok], xx[ok]] = labels[ok]


def _over(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray) -> None:
    """Composite ``rgb`` with ``alpha`` over the RGBA ``canvas`` (straight alpha), in place."""
    m = alpha > 0
    if not m.any():
        return
    a = alpha[m].astype(np.float32) / 255.0
    da = canvas[..., 3][m].astype(np.float32) / 255.0 * (1.0 - a)
    oa = a + da
    src, dst = rgb[m].astype(np.float32), canvas[..., :3][m].astype(np.float32)
    canvas[..., :3][m] = np.round((src * a[:, None] + dst * da[:, None]) / oa[:, None]).astype(np.uint8)
    canvas[..., 3][m] = np.round(oa * 255.0).astype(np.uint8)


__all__ = ["OVERLAP", "TILE_SIZE", "Overlay", "Shapes", "parse_hide", "raster_cell", "tissue_raster"]
