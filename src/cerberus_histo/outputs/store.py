"""An annotation store in TIAToolbox's SQLiteStore schema (version 1.0.1), written with the stdlib ``sqlite3``.

Schema (as TIAToolbox's ``SQLiteStore`` creates it, so ``SQLiteStore(path)`` and its viewer open our files)::

    metadata(key TEXT UNIQUE, value TEXT)            -- JSON values: version "1.0.1", compression "zlib",
                                                     -- compression_level 9, plus our keys (mpp, model, ...)
    rtree USING rtree(id, min_x, max_x, min_y, max_y)
    annotations(id INTEGER PRIMARY KEY, key TEXT UNIQUE, objtype TEXT, cx FLOAT NOT NULL, cy FLOAT NOT NULL,
                geometry BLOB, properties TEXT, area FLOAT NOT NULL)

``objtype`` is the shapely geometry type, ``cx, cy`` the geometry's centroid, ``geometry`` zlib-compressed
WKB (NULL for points, which are ``(cx, cy)``), ``properties`` a JSON object with ``"type"`` (the class name,
which TIAToolbox colours by; null for an untyped instance), ``"task"``, ``"id"`` (the instance id in the task's
map) and the measurements, ``area`` the geometry's area in coordinate units (pixels²). Each row has an rtree row
with the same id.

Beside the schema a whole-slide run keeps its *chunk ledger*, ``cerberus_chunks`` (one row per committed chunk:
objects, dropped objects, windows run and its tissue-class cells), committed in the same transaction as the chunk's
rows, so a killed run resumes from the last chunk whose rows are in. TIAToolbox ignores the extra table.

This module owns the SQL: every other module appends, reads and counts through :class:`AnnotationStore`.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from ..errors import CerberusError
from ..io.files import atomic_write, json_text, no_space_error
from .records import UNTYPED, AnnotationRecords

VERSION = "1.0.1"
COMPRESSION_LEVEL = 9
BATCH = 20000  # rows read back at a time: bounded memory for any slide

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS metadata (key TEXT UNIQUE, value TEXT)",
    "CREATE VIRTUAL TABLE rtree USING rtree(id, min_x, max_x, min_y, max_y)",
    "CREATE TABLE annotations(id INTEGER PRIMARY KEY, key TEXT UNIQUE, objtype TEXT, cx FLOAT NOT NULL, "
    "cy FLOAT NOT NULL, geometry BLOB, properties TEXT, area FLOAT NOT NULL)",
)
_LEDGER = ("CREATE TABLE IF NOT EXISTS cerberus_chunks (idx INTEGER PRIMARY KEY, objects INTEGER, dropped INTEGER, "
           "windows INTEGER, cell_y INTEGER, cell_x INTEGER, cell_h INTEGER, cell_w INTEGER, cells BLOB)")
_STATE = "cerberus_state"
#: shapely geometry type id -> name (``geom_type``), as TIAToolbox stores it in ``objtype``
_GEOM_TYPES = ("Point", "LineString", "LinearRing", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon",
               "GeometryCollection")


@dataclass(frozen=True)
class StoredAnnotation:
    """One row of the store: its row id, unique key, shapely geometry and properties."""

    id: int
    key: str
    geometry: Any
    properties: dict


@dataclass(frozen=True)
class ChunkEntry:
    """A whole-slide chunk's row in the ledger: its index, objects written, objects dropped at its border, windows
    run, and its tissue-class cells (``uint8``, or None without a tissue head) with the cell ``origin`` (row, col)
    of the first one in the slide's class map."""

    index: int
    objects: int
    dropped: int
    windows: int
    cells: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)


def _as_list(records) -> list[AnnotationRecords]:
    if isinstance(records, Mapping):
        return list(records.values())
    if hasattr(records, "geometry"):  # a single task's records
        return [records]
    return list(records)


def _rows(rec: AnnotationRecords, first_id: int):
    """``(annotation rows, rtree rows)`` of one task's records, ids from ``first_id``."""
    n = len(rec)
    geoms = rec.geometry
    kinds = shapely.get_type_id(geoms)
    is_point = kinds == shapely.GeometryType.POINT
    wkb = shapely.to_wkb(geoms)
    cxy = shapely.get_coordinates(shapely.centroid(geoms)).reshape(n, 2).tolist()
    bounds = shapely.bounds(geoms).tolist()
    area = shapely.area(geoms).tolist()
    types = [_GEOM_TYPES[int(t)] for t in kinds]
    meas = rec.measurement_rows()
    ids = rec.ids.tolist()
    ann, tree = [], []
    for k in range(n):
        row_id = first_id + k
        props = {"type": rec.class_name(k), "task": rec.task, "id": ids[k],
                 **{m: (v if np.isfinite(v) else None) for m, v in meas[k].items()}}
        blob = None if is_point[k] else zlib.compress(wkb[k], COMPRESSION_LEVEL)
        ann.append((row_id, f"{rec.task}-{row_id}", types[k], cxy[k][0], cxy[k][1], blob,
                    json_text(props, separators=(",", ":")), area[k]))
        x0, y0, x1, y1 = bounds[k]
        tree.append((row_id, x0, x1, y0, y1))
    return ann, tree


class AnnotationStore:
    """A TIAToolbox-compatible SQLite annotation store that results are appended to, chunk after chunk.

    ``AnnotationStore(path)`` creates the file (or opens one written before and appends to it; ``readonly`` opens
    an existing one without writing); :meth:`append` adds records in one transaction (all or nothing), optionally
    with a chunk's ledger row and metadata; :meth:`records` reads them back in batches; :meth:`query` returns the
    annotations whose bounds intersect a box; :meth:`count`; :meth:`class_counts`, :meth:`centroids` and
    :meth:`shapes` read what a viewer draws without building records. Use :func:`write_store` to write a complete
    store atomically. Usable as a context manager.
    """

    def __init__(self, path: Path, metadata: Mapping[str, Any] | None = None, readonly: bool = False):
        self.path = Path(path)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if readonly and not exists:
            raise CerberusError(f"annotation store {self.path} not found; pass the .db file a run wrote")
        try:
            self._con = (sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) if readonly
                         else sqlite3.connect(str(self.path)))
            if exists:
                tables = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if not {"metadata", "annotations", "rtree"} <= tables:
                    self._con.close()
                    raise CerberusError(f"{self.path} is not an annotation store; choose another file name")
            else:
                with self._con:
                    for sql in _SCHEMA:
                        self._con.execute(sql)
                    self._set_metadata({"version": VERSION, "compression": "zlib",
                                        "compression_level": COMPRESSION_LEVEL})
            if metadata:
                with self._con:
                    self._set_metadata(metadata)
            self._next_id = int(self._con.execute("SELECT COALESCE(MAX(id), 0) FROM annotations").fetchone()[0]) + 1
        except sqlite3.DatabaseError as exc:
            raise no_space_error(exc, self.path) or CerberusError(
                f"cannot open the annotation store {self.path}: {exc}") from None

    def _set_metadata(self, items: Mapping[str, Any]) -> None:
        self._con.executemany("REPLACE INTO metadata (key, value) VALUES (?, ?)",
                              [(str(k), json_text(v)) for k, v in items.items()])

    # ---- metadata ------------------------------------------------------------------------------------------
    def set_metadata(self, items: Mapping[str, Any]) -> None:
        """Set metadata keys (JSON-encoded values) in one transaction."""
        with self._writing():
            self._set_metadata(items)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction (committed on success, rolled back on error); a disk or file-size limit that is full
        is a one-line :class:`~cerberus_histo.io.files.NoSpaceError` naming the store (what was committed before
        stays, for the re-run to resume)."""
        try:
            with self._con:
                yield
        except sqlite3.Error as exc:
            if (err := no_space_error(exc, self.path)) is not None:
                raise err from None
            raise

    @property
    def metadata(self) -> dict[str, Any]:
        """Every metadata key with its JSON-decoded value."""
        return {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM metadata")}

    @property
    def complete(self) -> bool:
        """Whether a run marked the store complete (:meth:`append` with ``complete=True``)."""
        row = self._con.execute("SELECT value FROM metadata WHERE key = ?", (_STATE,)).fetchone()
        return row is not None and json.loads(row[0]) == "complete"

    # ---- writing -------------------------------------------------------------------------------------------
    def append(self, records: Mapping[str, AnnotationRecords] | AnnotationRecords | Iterable,
               chunk: ChunkEntry | None = None, complete: bool = False) -> int:
        """Add records (task -> records, one task's records, or a list of them) in one transaction; on any
        error nothing is added. ``chunk``: its ledger row, committed with its rows (a killed run resumes after
        the last chunk committed). ``complete``: mark the store complete in the same transaction. Returns the
        number of rows added."""
        ann, tree = [], []
        next_id = self._next_id
        for rec in _as_list(records):
            if len(rec):
                a, t = _rows(rec, next_id)
                ann.extend(a)
                tree.extend(t)
                next_id += len(rec)
        with self._writing():  # commits on success, rolls back on error
            self._con.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ann)
            self._con.executemany("INSERT INTO rtree VALUES (?, ?, ?, ?, ?)", tree)
            if chunk is not None:
                cells = chunk.cells
                blob = None if cells is None else zlib.compress(np.ascontiguousarray(cells, np.uint8).tobytes(), 6)
                h, w = (0, 0) if cells is None else cells.shape
                self._con.execute(_LEDGER)
                self._con.execute("INSERT INTO cerberus_chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  (int(chunk.index), int(chunk.objects), int(chunk.dropped), int(chunk.windows),
                                   int(chunk.origin[0]), int(chunk.origin[1]), h, w, blob))
            if complete:
                self._set_metadata({_STATE: "complete"})
        self._next_id = next_id
        return len(ann)

    # ---- the chunk ledger ----------------------------------------------------------------------------------
    def _has_ledger(self) -> bool:
        return self._con.execute("SELECT 1 FROM sqlite_master WHERE name = 'cerberus_chunks'").fetchone() is not None

    def chunks_done(self) -> set[int]:
        """Indices of the chunks whose rows are committed."""
        if not self._has_ledger():
            return set()
        return {int(r[0]) for r in self._con.execute("SELECT idx FROM cerberus_chunks")}

    def chunk_totals(self) -> dict[str, int]:
        """``dropped`` (objects cut at chunk borders) and ``windows`` (network windows run) over every chunk."""
        if not self._has_ledger():
            return {"dropped": 0, "windows": 0}
        d, w = self._con.execute("SELECT COALESCE(SUM(dropped), 0), COALESCE(SUM(windows), 0) FROM cerberus_chunks"
                                 ).fetchone()
        return {"dropped": int(d), "windows": int(w)}

    def tissue_cells(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The tissue-class cells of every committed chunk pasted into one ``uint8`` map of ``shape`` (class 0
        where no chunk ran), or None when no chunk has cells (no tissue head)."""
        if not self._has_ledger():
            return None
        out = np.zeros(shape, np.uint8)
        any_cells = False
        for y, x, h, w, blob in self._con.execute("SELECT cell_y, cell_x, cell_h, cell_w, cells FROM cerberus_chunks"):
            if blob is not None:
                out[y:y + h, x:x + w] = np.frombuffer(zlib.decompress(blob), np.uint8).reshape(h, w)
                any_cells = True
        return out if any_cells else None

    # ---- reading -------------------------------------------------------------------------------------------
    def count(self, task: str | None = None) -> int:
        """Rows in the store, or of one task."""
        if task is None:
            return int(self._con.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])
        return int(self._con.execute("SELECT COUNT(*) FROM annotations WHERE json_extract(properties, '$.task') = ?",
                                     (task,)).fetchone()[0])

    def records(self, config, task: str | None = None, box: tuple[float, float, float, float] | None = None,
                batch: int = BATCH) -> Iterator[AnnotationRecords]:
        """The rows as :class:`~.records.AnnotationRecords`, in id order, at most ``batch`` rows at a time (one
        record set per run of consecutive rows of one task): every row, one ``task``'s, or those whose bounds
        intersect ``box = (min_x, min_y, max_x, max_y)``. ``config`` (the model's config) names and colours the
        classes. Centroids are the rows' ``cx, cy``; contours the geometries' exteriors."""
        sql, params = "SELECT a.id, a.cx, a.cy, a.geometry, a.properties FROM annotations a", []
        where = []
        if box is not None:
            sql += " JOIN rtree r ON a.id = r.id"
            where.append("r.max_x >= ? AND r.min_x <= ? AND r.max_y >= ? AND r.min_y <= ?")
            x0, y0, x1, y1 = (float(v) for v in box)
            params += [x0, x1, y0, y1]
        if task is not None:
            where.append("json_extract(a.properties, '$.task') = ?")
            params.append(task)
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.id"
        cur = self._con.execute(sql, params)
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            yield from _records_of_rows(rows, config)

    def query(self, box: tuple[float, float, float, float]) -> list[StoredAnnotation]:
        """Annotations whose rtree bounds intersect ``box = (min_x, min_y, max_x, max_y)`` (edges touching
        count), in id order. The rtree stores bounds as 32-bit floats rounded outwards, as TIAToolbox's."""
        x0, y0, x1, y1 = (float(v) for v in box)
        rows = self._con.execute(
            "SELECT a.id, a.key, a.cx, a.cy, a.geometry, a.properties FROM annotations a JOIN rtree r "
            "ON a.id = r.id WHERE r.max_x >= ? AND r.min_x <= ? AND r.max_y >= ? AND r.min_y <= ? ORDER BY a.id",
            (x0, x1, y0, y1))
        return [StoredAnnotation(i, key, decode_geometry(blob, cx, cy), json.loads(props))
                for i, key, cx, cy, blob, props in rows]

    # ---- fast reads for viewers ----------------------------------------------------------------------------
    def class_counts(self) -> dict[str, dict[str | None, int]]:
        """Rows per task and class name (``properties.type``; None for untyped instances), in one pass."""
        out: dict[str, dict[str | None, int]] = {}
        for task, cls, n in self._con.execute(
                "SELECT json_extract(properties, '$.task'), json_extract(properties, '$.type'), COUNT(*) "
                "FROM annotations GROUP BY 1, 2"):
            out.setdefault(str(task), {})[cls] = int(n)
        return out

    def _task_rows(self, columns: str, task: str, box, class_names: Sequence[str]):
        """A cursor over ``class index, columns`` of ``task``'s rows (bounds intersecting ``box`` when given): the
        index of ``properties.type`` in ``class_names``, -1 for untyped rows and names not among them."""
        names = list(class_names)
        case = ("CASE json_extract(a.properties, '$.type') " + " ".join(f"WHEN ? THEN {k}" for k in range(len(names)))
                + " ELSE -1 END") if names else "-1"
        sql, params = f"SELECT {case}, {columns} FROM annotations a", list(names)
        if box is not None:
            sql += " JOIN rtree r ON a.id = r.id WHERE r.max_x >= ? AND r.min_x <= ? AND r.max_y >= ? AND r.min_y <= ? AND"
            x0, y0, x1, y1 = (float(v) for v in box)
            params += [x0, x1, y0, y1]
        else:
            sql += " WHERE"
        return self._con.execute(sql + " json_extract(a.properties, '$.task') = ? ORDER BY a.id", params + [task])

    def centroids(self, task: str, box: tuple[float, float, float, float] | None = None,
                  class_names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``x, y`` (float64 centroids, the rows' ``cx, cy``) and the class index (int64: position of the row's
        class name in ``class_names``, -1 for an untyped row or a name not among them) of every row of ``task``, or
        of those whose bounds intersect ``box = (min_x, min_y, max_x, max_y)``, in id order. No geometry is decoded
        (a viewer draws millions of nuclei as dots from these)."""
        rows = self._task_rows("a.cx, a.cy", task, box, class_names).fetchall()
        arr = np.array(rows, np.float64).reshape(len(rows), 3)
        return arr[:, 1].copy(), arr[:, 2].copy(), arr[:, 0].astype(np.int64)

    def shapes(self, task: str, box: tuple[float, float, float, float] | None = None,
               class_names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """``(class index, geometry)`` of ``task``'s rows (or those whose bounds intersect ``box``), in id order:
        class indices as :meth:`centroids` gives them and a shapely geometry array (Points where the store holds
        none), without building records (no contours, measurements or properties): a viewer's drawing path."""
        rows = self._task_rows("a.cx, a.cy, a.geometry", task, box, class_names).fetchall()
        cls = np.array([r[0] for r in rows], np.int64)
        geoms = np.empty(len(rows), object)
        poly = [k for k, r in enumerate(rows) if r[3] is not None]
        if poly:
            geoms[poly] = shapely.from_wkb([zlib.decompress(rows[k][3]) for k in poly])
        pts = [k for k, r in enumerate(rows) if r[3] is None]
        if pts:
            geoms[pts] = shapely.points([(rows[k][1], rows[k][2]) for k in pts])
        return cls, geoms

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _records_of_rows(rows: list[tuple], config) -> Iterator[AnnotationRecords]:
    """Rows ``(id, cx, cy, blob, properties)`` as record sets, one per run of consecutive rows of one task."""
    props = [json.loads(r[4]) for r in rows]
    tasks = [p.get("task", "") for p in props]
    start = 0
    for end in range(1, len(rows) + 1):
        if end < len(rows) and tasks[end] == tasks[start]:
            continue
        spec = config.task(tasks[start])
        part, pp = rows[start:end], props[start:end]
        names = list(spec.class_names)
        cls = np.array([UNTYPED if p.get("type") is None else names.index(p["type"]) if p["type"] in names else 0
                        for p in pp], np.int64)
        keys = [k for k in pp[0] if k not in ("type", "task", "id")]
        meas = {k: np.array([np.nan if p.get(k) is None else p[k] for p in pp], np.float64) for k in keys}
        geoms = np.empty(len(part), object)
        poly = [k for k, r in enumerate(part) if r[3] is not None]
        if poly:
            geoms[poly] = shapely.from_wkb([zlib.decompress(part[k][3]) for k in poly])
        xy = np.array([(r[1], r[2]) for r in part], np.float64)
        pts = [k for k, r in enumerate(part) if r[3] is None]
        if pts:
            geoms[pts] = shapely.points(xy[pts])
        yield AnnotationRecords.from_geometries(spec, np.array([p.get("id", 0) for p in pp], np.int64), cls, geoms,
                                                meas, centroid=xy)
        start = end


def open_run_store(final: Path, partial: Path, metadata: Mapping[str, Any], key: str,
                   echo: Callable[[str], None]) -> AnnotationStore:
    """The store a run continues: a finished ``final`` store of the same run (``metadata[key]`` equal) whose other
    outputs are missing or were written with other settings that do not change the store (a kill after its
    rename; ``--centroids-only``), else the ``partial`` store of the same run, else a new partial store (one of
    other settings is deleted, with a message). A ``final`` store of other settings stays until the run's own
    replaces it."""
    if final.is_file() and not partial.exists():
        try:
            store = AnnotationStore(final)
            if store.metadata.get(key) == metadata[key]:
                return store
            store.close()
        except CerberusError:
            pass
    if partial.exists():
        try:
            store = AnnotationStore(partial)
        except CerberusError:
            store = None
        if store is not None and store.metadata.get(key) == metadata[key]:
            return store
        if store is not None:
            store.close()
        echo(f"{partial.name}: partial results of other settings (model, chunking, mask); starting this slide again")
        partial.unlink()
    return AnnotationStore(partial, metadata)


def decode_geometry(blob: bytes | None, cx: float, cy: float):
    """The shapely geometry of a row: zlib-compressed WKB, or the point ``(cx, cy)`` when NULL."""
    return shapely.Point(cx, cy) if blob is None else shapely.from_wkb(zlib.decompress(blob))


def write_store(path: Path, records: Mapping[str, AnnotationRecords] | Iterable,
                metadata: Mapping[str, Any] | None = None) -> None:
    """A complete store of ``records`` at ``path``, built beside it and renamed into place."""

    def write(tmp: Path) -> None:
        with AnnotationStore(tmp, metadata) as store:
            store.append(records)

    atomic_write(Path(path), write)
