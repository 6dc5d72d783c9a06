"""The summary of a result, one schema for a tile and a slide, accumulated over record sets (bounded memory).

:func:`summarize` reads the records once (a tile's, or a slide's streamed from its store) and gives::

    {"analysed_area_um2": float,            # the slide's tissue mask, or the whole tile
     "counts": {task: objects},             # tissue: regions
     "tissue": {class: {"count", "area_um2", "mean_area_um2", "fraction"}},
     "gland" / "lumen" / "nuclei": {class: {"count", "area_um2", "mean_area_um2"}},
     "nuclei_by_tissue": {tissue class: {nucleus class: {"count", "area_um2", "mean_area_um2"}}}}

Every class of a task is listed (absent ones with a zero count), class 0 only where objects have it. A nucleus's
tissue class is that of the tissue-class cell under its centroid (``"unclassified"`` without a trained tissue
head). Only the model's trusted heads count (``heads``): a task whose ``inst``/``class`` head is not among them is
left out, and the instances of a task without a trusted type head (and more than one foreground class) are counted
in one ``"unclassified"`` row, its classes not listed; untyped objects of a typed task add an ``"unclassified"`` row.
:func:`write_summary` writes it as JSON and as the CSV ``task,class,tissue_class,count,area_um2,mean_area_um2``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..io.files import atomic_write_bytes, write_json
from .records import INSTANCE_TASKS, UNCLASSIFIED, UNTYPED, AnnotationRecords, known_heads, own_class

CSV_COLUMNS = ("task", "class", "tissue_class", "count", "area_um2", "mean_area_um2")


def _rows(names: Sequence[str], count: np.ndarray, area: np.ndarray, untyped: bool = False
          ) -> dict[str, dict[str, float]]:
    """One row per class (class 0 only when counted), then ``unclassified`` (slot ``len(names)``) when counted;
    ``untyped``: the ``unclassified`` row alone."""
    n = len(names)
    keep = ([] if untyped else list(range(0 if count[0] else 1, n))) + ([n] if untyped or count[n] else [])
    return {(UNCLASSIFIED if c == n else names[c]): {"count": int(count[c]), "area_um2": float(area[c]),
                                                     "mean_area_um2": float(area[c] / count[c]) if count[c] else 0.0}
            for c in keep}


def summarize(records: Mapping[str, AnnotationRecords] | Iterable[AnnotationRecords], config, *,
              analysed_area_um2: float, class_map: np.ndarray | None = None, cell: float = 1.0,
              offset: Sequence[float] = (0.0, 0.0), heads: Iterable[str] | None = None) -> dict:
    """The summary (see the module docstring) of ``records`` (task -> records, or record sets streamed from a
    store). ``class_map`` (``uint8`` tissue classes) and ``cell`` (output units per class-map cell, whose cell
    ``(0, 0)`` starts at ``offset``) give each nucleus its tissue class; ``config`` names the classes; ``heads``:
    the model's trusted heads (None: every head of ``config``)."""
    known = set(known_heads(config, heads))
    tasks = {t.name: t for t in config.tasks if f"{t.name}-{'class' if t.name == 'tissue' else 'inst'}" in known}
    # a task without a trusted type head and with several classes: its instances are untyped, its classes unlisted
    untyped = {t for t in tasks if t != "tissue" and f"{t}-type" not in known and own_class(tasks[t]) == UNTYPED}
    tissue_names = list(tasks["tissue"].class_names) if "tissue" in tasks and class_map is not None else None
    cols = tissue_names or [UNCLASSIFIED]
    # one slot per class, and a last one for untyped objects
    counts = {t: np.zeros(len(tasks[t].class_names) + 1, np.int64) for t in (*INSTANCE_TASKS, "tissue") if t in tasks}
    areas = {t: np.zeros(len(c), np.float64) for t, c in counts.items()}
    by_count = np.zeros((len(cols), len(counts["nuclei"]) if "nuclei" in counts else 1), np.int64)
    by_area = np.zeros(by_count.shape, np.float64)
    off = np.asarray(offset, np.float64)
    for rec in records.values() if isinstance(records, Mapping) else records:
        if rec.task not in counts or not len(rec):
            continue
        area = rec.measurements.get("area_um2", np.zeros(len(rec)))
        area = np.where(np.isfinite(area), area, 0.0)
        last = len(counts[rec.task]) - 1
        slot = np.full(len(rec), last) if rec.task in untyped else np.where(rec.class_index >= 0, rec.class_index, last)
        np.add.at(counts[rec.task], slot, 1)
        np.add.at(areas[rec.task], slot, area)
        if rec.task == "nuclei":
            tis = np.zeros(len(rec), np.int64)
            if tissue_names is not None:
                h, w = class_map.shape
                ij = np.floor((rec.centroid - off) / cell).astype(np.int64)
                tis = class_map[np.clip(ij[:, 1], 0, h - 1), np.clip(ij[:, 0], 0, w - 1)].astype(np.int64)
            np.add.at(by_count, (tis, slot), 1)
            np.add.at(by_area, (tis, slot), area)
    out: dict = {"analysed_area_um2": float(analysed_area_um2), "counts": {t: int(c.sum()) for t, c in counts.items()}}
    if "tissue" in counts:
        names = list(tasks["tissue"].class_names)
        rows = _rows(names, counts["tissue"], areas["tissue"])
        classified = float(areas["tissue"][1:].sum()) or 1.0
        for c, name in enumerate(names):
            if name in rows:
                rows[name]["fraction"] = float(areas["tissue"][c]) / classified if c else 0.0
        out["tissue"] = rows
    for task in INSTANCE_TASKS:
        if task in counts:
            out[task] = _rows(list(tasks[task].class_names), counts[task], areas[task], task in untyped)
    if "nuclei" in counts:
        names = list(tasks["nuclei"].class_names)
        keep_zero = bool(by_count[:, 0].any())
        out["nuclei_by_tissue"] = {
            cols[t]: {k: v for k, v in _rows(names, by_count[t], by_area[t], "nuclei" in untyped).items()
                      if keep_zero or k != names[0]}
            for t in range(len(cols)) if by_count[t].any() or t or tissue_names is None}
    return out


def write_summary(json_path: Path | None, csv_path: Path | None, summary: Mapping) -> None:
    """The summary as JSON and as CSV rows ``task,class,tissue_class,count,area_um2,mean_area_um2``: first
    ``analysed,all`` (the area analysed), then one row per tissue class, one per class of each instance task
    (``tissue_class`` ``all``), and one per (nucleus class, tissue class). Each file written atomically; either
    path may be None."""
    if json_path is not None:
        write_json(Path(json_path), summary)
    if csv_path is None:
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def row(task: str, cls: str, tissue: str, r: Mapping) -> None:
        w.writerow([task, cls, tissue, r["count"], f"{r['area_um2']:.3f}", f"{r['mean_area_um2']:.3f}"])

    w.writerow(["analysed", "all", "", "", f"{summary['analysed_area_um2']:.3f}", ""])
    for cls, r in summary.get("tissue", {}).items():
        row("tissue", cls, "", r)
    for task in INSTANCE_TASKS:
        for cls, r in summary.get(task, {}).items():
            row(task, cls, "all", r)
    for tissue, rows in summary.get("nuclei_by_tissue", {}).items():
        for cls, r in rows.items():
            row("nuclei", cls, tissue, r)
    atomic_write_bytes(Path(csv_path), buf.getvalue().encode())


__all__ = ["CSV_COLUMNS", "summarize", "write_summary"]
