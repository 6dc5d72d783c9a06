"""Whole-slide outputs written from an annotation store, streamed in batches (no torch, bounded memory).

A slide's objects live in its SQLite store (:mod:`.store`); nothing holds them all in memory. This module reads
the rows back in id order, ``BATCH`` at a time, to write the QuPath GeoJSON (:func:`write_geojson_from_store`),
the summary (:func:`summarize_store`, :func:`write_summary`) and the thumbnail overlay (:func:`render_thumbnail`).
Coordinates in the store are level-0 pixels; the tissue-class map is a low-resolution ``uint8`` array whose cell
``(i, j)`` covers level-0 ``[j * cell_px, (j + 1) * cell_px) x [i * cell_px, (i + 1) * cell_px)``.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import shapely

from .export import OBJECT_TYPES
from .files import atomic_write, atomic_write_bytes

BATCH = 20000
INSTANCE_TASKS = ("gland", "lumen", "nuclei")


def _batches(con: sqlite3.Connection, sql: str, params: tuple = ()) -> Iterator[list[tuple]]:
    cur = con.execute(sql, params)
    while True:
        rows = cur.fetchmany(BATCH)
        if not rows:
            return
        yield rows


def _geometries(rows: list[tuple], centroids_only_tasks: set[str], tasks: list[str]) -> np.ndarray:
    """Shapely geometry per row ``(cx, cy, blob, ...)``: Points for NULL blobs and for ``centroids_only_tasks``."""
    out = np.empty(len(rows), object)
    poly = [k for k, r in enumerate(rows) if r[2] is not None and tasks[k] not in centroids_only_tasks]
    if poly:
        out[poly] = shapely.from_wkb([zlib.decompress(rows[k][2]) for k in poly])
    pts = [k for k in range(len(rows)) if out[k] is None]
    if pts:
        out[pts] = shapely.points(np.array([(rows[k][0], rows[k][1]) for k in pts], np.float64))
    return out


def write_geojson_from_store(path: Path, con: sqlite3.Connection, config, centroids_only: bool = False) -> int:
    """A QuPath GeoJSON FeatureCollection of every row of the store, as :func:`~.geojson.write_geojson` writes
    records (``objectType``, ``classification`` with the task's class colour, ``measurements``); with
    ``centroids_only`` nuclei (detections) are Points at their centroids. Streamed, written atomically; returns
    the number of features."""
    colors = {t.name: dict(zip(t.class_names, (list(c) for c in t.class_colors), strict=True)) for t in config.tasks}
    points_for = {t for t, kind in OBJECT_TYPES.items() if kind == "detection"} if centroids_only else set()
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [')
            first = True
            for rows in _batches(con, "SELECT cx, cy, geometry, properties FROM annotations ORDER BY id"):
                props = [json.loads(r[3]) for r in rows]
                tasks = [p.get("task", "") for p in props]
                texts = shapely.to_geojson(_geometries(rows, points_for, tasks))
                for text, p, task in zip(texts, props, tasks, strict=True):
                    name = p.get("type", "")
                    out = {"objectType": OBJECT_TYPES.get(task, "annotation"),
                           "classification": {"name": name, "color": colors.get(task, {}).get(name, [128, 128, 128])},
                           "measurements": {k: v for k, v in p.items() if k not in ("type", "task", "id")}}
                    f.write("\n" if first else ",\n")
                    first = False
                    f.write(f'{{"type": "Feature", "geometry": {text}, "properties": {json.dumps(out)}}}')
                    count += 1
            f.write("\n]}\n")

    atomic_write(Path(path), write)
    return count


def summarize_store(con: sqlite3.Connection, config, class_map: np.ndarray | None, cell_px: float, mpp: float,
                    tissue_area_um2: float) -> dict:
    """The slide's summary.

    ``{"tissue_area_um2": ..., "tissue": {class: {"area_um2", "fraction"}}, "nuclei": {"total": {class: count},
    "by_tissue": {tissue class: {nucleus class: count}}}, "gland" / "lumen": {class: {"count", "area_um2",
    "mean_area_um2"}}, "counts": {task: n}}``. A nucleus's tissue class is the class-map cell under its centroid
    (``"unclassified"`` without a tissue head). ``cell_px`` is level-0 pixels per class-map cell, ``mpp`` the
    level-0 resolution; ``tissue_area_um2`` the tissue mask's area.
    """
    tasks = {t.name: t for t in config.tasks}
    out: dict = {"tissue_area_um2": float(tissue_area_um2)}
    tissue_names = list(tasks["tissue"].class_names) if "tissue" in tasks and class_map is not None else None
    if tissue_names is not None:
        cell_area = (cell_px * mpp) ** 2
        cells = np.bincount(class_map.ravel(), minlength=len(tissue_names))
        classified = float(cells[1:].sum()) or 1.0
        out["tissue"] = {n: {"area_um2": float(cells[c]) * cell_area,
                             "fraction": float(cells[c]) / classified if c else 0.0}
                         for c, n in enumerate(tissue_names) if c}
    for task in INSTANCE_TASKS:
        if task not in tasks:
            continue
        names = list(tasks[task].class_names)
        if task == "nuclei":
            cols = tissue_names or ["unclassified"]
            table = np.zeros((len(cols), len(names)), np.int64)
            for rows in _batches(con, "SELECT cx, cy, json_extract(properties, '$.type') FROM annotations "
                                      "WHERE json_extract(properties, '$.task') = ?", (task,)):
                xy = np.array([(r[0], r[1]) for r in rows], np.float64)
                cls = np.array([names.index(r[2]) if r[2] in names else 0 for r in rows], np.int64)
                if tissue_names is not None:
                    h, w = class_map.shape
                    i = np.clip((xy[:, 1] // cell_px).astype(np.int64), 0, h - 1)
                    j = np.clip((xy[:, 0] // cell_px).astype(np.int64), 0, w - 1)
                    tis = class_map[i, j].astype(np.int64)
                else:
                    tis = np.zeros(len(rows), np.int64)
                np.add.at(table, (tis, cls), 1)
            start = 1 if not table[:, 0].any() else 0
            out["nuclei"] = {"total": {names[c]: int(table[:, c].sum()) for c in range(start, len(names))},
                             "by_tissue": {cols[t]: {names[c]: int(table[t, c]) for c in range(start, len(names))}
                                           for t in range(len(cols)) if table[t].any() or t}}
        else:
            count = np.zeros(len(names), np.int64)
            area = np.zeros(len(names), np.float64)
            for rows in _batches(con, "SELECT json_extract(properties, '$.type'), json_extract(properties, "
                                      "'$.area_um2') FROM annotations WHERE json_extract(properties, '$.task') = ?",
                                 (task,)):
                for name, a in rows:
                    c = names.index(name) if name in names else 0
                    count[c] += 1
                    area[c] += float(a or 0.0)
            start = 1 if count[0] == 0 else 0
            out[task] = {names[c]: {"count": int(count[c]), "area_um2": float(area[c]),
                                    "mean_area_um2": float(area[c] / count[c]) if count[c] else 0.0}
                         for c in range(start, len(names))}
    out["counts"] = {task: int(con.execute("SELECT COUNT(*) FROM annotations WHERE json_extract(properties, "
                                           "'$.task') = ?", (task,)).fetchone()[0])
                     for task in (*INSTANCE_TASKS, "tissue") if task in tasks}
    return out


def write_summary(json_path: Path, csv_path: Path, summary: dict) -> None:
    """The summary as JSON and as CSV rows ``task,class,tissue_class,count,area_um2`` (tissue rows: the class's
    area; nuclei rows: one per (tissue class, nucleus class) and ``all``), both written atomically."""
    atomic_write_bytes(Path(json_path), json.dumps(summary, indent=2).encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "class", "tissue_class", "count", "area_um2"])
    w.writerow(["tissue", "all", "", "", f"{summary['tissue_area_um2']:.1f}"])
    for cls, r in summary.get("tissue", {}).items():
        w.writerow(["tissue", cls, "", "", f"{r['area_um2']:.1f}"])
    nuclei = summary.get("nuclei")
    if nuclei:
        for cls, n in nuclei["total"].items():
            w.writerow(["nuclei", cls, "all", n, ""])
        for tissue, row in nuclei["by_tissue"].items():
            for cls, n in row.items():
                w.writerow(["nuclei", cls, tissue, n, ""])
    for task in ("gland", "lumen"):
        for cls, r in summary.get(task, {}).items():
            w.writerow([task, cls, "all", r["count"], f"{r['area_um2']:.1f}"])
    atomic_write_bytes(Path(csv_path), buf.getvalue().encode())


def render_thumbnail(image: np.ndarray, scale: float, con: sqlite3.Connection, config,
                     class_map: np.ndarray | None, cell_px: float, alpha: float = 0.35) -> np.ndarray:
    """RGB overlay on a slide thumbnail (``image``, ``scale`` thumbnail pixels per level-0 pixel): tissue classes
    tinted (class 0 clear), gland and lumen outlines and nucleus dots in their class colours, streamed from the
    store."""
    img = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    h, w = img.shape[:2]
    tasks = {t.name: t for t in config.tasks}
    if class_map is not None and "tissue" in tasks:
        colors = np.asarray(tasks["tissue"].class_colors, np.uint8)
        # the class map's cells as thumbnail pixels (it may reach past the slide's last pixel)
        ch, cw = class_map.shape
        big = cv2.resize(class_map, (max(1, round(cw * cell_px * scale)), max(1, round(ch * cell_px * scale))),
                         interpolation=cv2.INTER_NEAREST)
        cmap = np.zeros((h, w), np.uint8)
        cmap[:min(h, big.shape[0]), :min(w, big.shape[1])] = big[:h, :w]
        blend = cv2.addWeighted(img, 1 - alpha, colors[cmap], alpha, 0)
        np.copyto(img, blend, where=(cmap > 0)[..., None])
    for task in ("gland", "lumen", "nuclei"):
        if task not in tasks:
            continue
        spec = tasks[task]
        color_of = {n: tuple(int(v) for v in c) for n, c in zip(spec.class_names, spec.class_colors, strict=True)}
        for rows in _batches(con, "SELECT cx, cy, geometry, json_extract(properties, '$.type') FROM annotations "
                                  "WHERE json_extract(properties, '$.task') = ?", (task,)):
            if task == "nuclei":
                for cx, cy, _, name in rows:
                    x, y = int(cx * scale), int(cy * scale)
                    if 0 <= x < w and 0 <= y < h:
                        img[y, x] = color_of.get(name, (0, 0, 0))
                continue
            for _cx, _cy, blob, name in rows:
                if blob is None:
                    continue
                geom = shapely.from_wkb(zlib.decompress(blob))
                rings = [np.round(np.asarray(p.exterior.coords) * scale).astype(np.int32).reshape(-1, 1, 2)
                         for p in shapely.get_parts(geom) if p.geom_type == "Polygon"]
                cv2.polylines(img, rings, True, color_of.get(name, (0, 0, 0)), 1)
    return img


def write_png(path: Path, image: np.ndarray) -> None:
    """An RGB (or single-channel) uint8 image as PNG, written atomically."""
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    atomic_write_bytes(Path(path), buf.tobytes())


__all__ = ["render_thumbnail", "summarize_store", "write_geojson_from_store", "write_png", "write_summary"]
