"""The one overlay renderer: tissue classes tinted, instance outlines in their class colours, for a tile's overlay
and a slide's thumbnail alike (records given whole, or streamed from a store)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

from .records import AnnotationRecords, ragged


def render_overlay(image: np.ndarray, records: Mapping[str, AnnotationRecords] | Iterable[AnnotationRecords],
                   config=None, *, class_map: np.ndarray | None = None, cell: float = 1.0, scale: float = 1.0,
                   offset: Sequence[float] = (0.0, 0.0), max_side: int | None = 4096, alpha: float = 0.35,
                   thumbnail: bool = False) -> np.ndarray:
    """RGB overlay of ``image`` (``H x W x 3``, or grey): the tissue ``class_map`` tinted (class 0 left clear),
    then the outlines of glands, lumina and nuclei in the order the record sets come (tissue regions are shown
    by the tint). Objects are drawn in their class colours, untyped ones (no trained type head) in the neutral
    :data:`~.records.UNTYPED_COLOR`.

    Geometry: image pixel = (record coordinate - ``offset``) x ``scale``; class-map cell ``(i, j)`` covers record
    coordinates ``offset + [j, j + 1) x cell`` (x) by ``offset + [i, i + 1) x cell`` (y). Images larger than
    ``max_side`` are downscaled first. ``thumbnail``: a slide's picture, where nuclei are one-pixel dots at
    their centroids and outlines one pixel wide; otherwise nuclei are outlined and glands drawn 2 px wide once
    they are at least half size. ``config`` (the model's) colours the tissue classes.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    h, w = img.shape[:2]
    s = 1.0 if not max_side or max(h, w) <= max_side else max_side / max(h, w)
    if s != 1.0:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    oh, ow = img.shape[:2]
    f = float(scale) * s  # image pixels per record unit
    off = np.asarray(offset, np.float64)
    if class_map is not None and config is not None and any(t.name == "tissue" for t in config.tasks):
        colors = np.asarray(config.task("tissue").class_colors, np.uint8)
        ch, cw = class_map.shape
        big = cv2.resize(np.asarray(class_map, np.uint8), (max(1, round(cw * cell * f)), max(1, round(ch * cell * f))),
                         interpolation=cv2.INTER_NEAREST)
        cmap = np.zeros((oh, ow), np.uint8)  # the cells may end before or reach past the image's last pixel
        cmap[:min(oh, big.shape[0]), :min(ow, big.shape[1])] = big[:oh, :ow]
        blend = cv2.addWeighted(img, 1 - alpha, colors[cmap], alpha, 0)
        np.copyto(img, blend, where=(cmap > 0)[..., None])
    for rec in records.values() if isinstance(records, Mapping) else records:
        if rec.task == "tissue" or not len(rec):
            continue
        colors = rec.colors()  # untyped objects in the neutral UNTYPED_COLOR
        if thumbnail and rec.task == "nuclei":
            xy = ((rec.centroid - off) * f).astype(np.int64)
            ok = (xy[:, 0] >= 0) & (xy[:, 0] < ow) & (xy[:, 1] >= 0) & (xy[:, 1] < oh)
            img[xy[ok, 1], xy[ok, 0]] = colors[ok]
            continue
        thick = 2 if rec.task == "gland" and f >= 0.5 and not thumbnail else 1
        coords, offsets = ragged(rec.contours)
        pts = np.split(np.round((coords - off) * f).astype(np.int32).reshape(-1, 1, 2), offsets[1:-1])
        for c in np.unique(rec.class_index):
            members = np.flatnonzero(rec.class_index == c)
            color = tuple(int(v) for v in colors[members[0]])
            cv2.polylines(img, [pts[i] for i in members], True, color, thick)
    return img


__all__ = ["render_overlay"]
