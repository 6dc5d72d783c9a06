"""An annotation store in TIAToolbox's SQLiteStore schema (version 1.0.1), written with the stdlib ``sqlite3``.

Schema (as TIAToolbox's ``SQLiteStore`` creates it, so ``SQLiteStore(path)`` and its viewer open our files)::

    metadata(key TEXT UNIQUE, value TEXT)            -- JSON values: version "1.0.1", compression "zlib",
                                                     -- compression_level 9, plus our keys (mpp, model, ...)
    rtree USING rtree(id, min_x, max_x, min_y, max_y)
    annotations(id INTEGER PRIMARY KEY, key TEXT UNIQUE, objtype TEXT, cx FLOAT NOT NULL, cy FLOAT NOT NULL,
                geometry BLOB, properties TEXT, area FLOAT NOT NULL)

``objtype`` is the shapely geometry type, ``cx, cy`` the geometry's centroid, ``geometry`` zlib-compressed
WKB (NULL for points, which are ``(cx, cy)``), ``properties`` a JSON object with ``"type"`` (the class name,
which TIAToolbox colours by), ``"task"``, ``"id"`` (the instance id in the task's map) and the measurements,
``area`` the geometry's area in coordinate units (pixels²). Each row has an rtree row with the same id.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from ..errors import CerberusError
from .files import atomic_write

if TYPE_CHECKING:
    from .export import AnnotationRecords

VERSION = "1.0.1"
COMPRESSION_LEVEL = 9

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS metadata (key TEXT UNIQUE, value TEXT)",
    "CREATE VIRTUAL TABLE rtree USING rtree(id, min_x, max_x, min_y, max_y)",
    "CREATE TABLE annotations(id INTEGER PRIMARY KEY, key TEXT UNIQUE, objtype TEXT, cx FLOAT NOT NULL, "
    "cy FLOAT NOT NULL, geometry BLOB, properties TEXT, area FLOAT NOT NULL)",
)
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
                    json.dumps(props, separators=(",", ":")), area[k]))
        x0, y0, x1, y1 = bounds[k]
        tree.append((row_id, x0, x1, y0, y1))
    return ann, tree


class AnnotationStore:
    """A TIAToolbox-compatible SQLite annotation store that results are appended to, chunk after chunk.

    ``AnnotationStore(path)`` creates the file (or opens one written before and appends to it);
    ``append(records)`` adds records in one transaction (all or nothing); ``query(box)`` returns the
    annotations whose bounds intersect ``box``; ``count()``; ``close()``. Use :func:`write_store` to write a
    complete store atomically. Usable as a context manager.
    """

    def __init__(self, path: Path, metadata: Mapping[str, Any] | None = None):
        self.path = Path(path)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        try:
            self._con = sqlite3.connect(str(self.path))
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
        except sqlite3.DatabaseError as exc:
            raise CerberusError(f"cannot open the annotation store {self.path}: {exc}") from None
        if metadata:
            with self._con:
                self._set_metadata(metadata)
        self._next_id = int(self._con.execute("SELECT COALESCE(MAX(id), 0) FROM annotations").fetchone()[0]) + 1

    def _set_metadata(self, items: Mapping[str, Any]) -> None:
        self._con.executemany("REPLACE INTO metadata (key, value) VALUES (?, ?)",
                              [(str(k), json.dumps(v)) for k, v in items.items()])

    @property
    def connection(self) -> sqlite3.Connection:
        """The open ``sqlite3`` connection: for streaming rows out, or for tables of one's own beside the
        schema (written through :meth:`append`'s ``extra`` to stay in step with the rows)."""
        return self._con

    def set_metadata(self, items: Mapping[str, Any]) -> None:
        """Set metadata keys (JSON-encoded values) in one transaction."""
        with self._con:
            self._set_metadata(items)

    @property
    def metadata(self) -> dict[str, Any]:
        """Every metadata key with its JSON-decoded value."""
        return {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM metadata")}

    def append(self, records: Mapping[str, AnnotationRecords] | AnnotationRecords | Iterable,
               extra: Iterable[tuple[str, tuple]] = ()) -> int:
        """Add records (task -> records, one task's records, or a list of them) in one transaction; on any
        error nothing is added. ``extra`` = ``(sql, parameters)`` statements run in the same transaction (a
        progress table committed together with the rows it describes). Returns the number of rows added."""
        ann, tree = [], []
        next_id = self._next_id
        for rec in _as_list(records):
            if len(rec):
                a, t = _rows(rec, next_id)
                ann.extend(a)
                tree.extend(t)
                next_id += len(rec)
        with self._con:  # commits on success, rolls back on error
            self._con.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ann)
            self._con.executemany("INSERT INTO rtree VALUES (?, ?, ?, ?, ?)", tree)
            for sql, params in extra:
                self._con.execute(sql, params)
        self._next_id = next_id
        return len(ann)

    def count(self) -> int:
        return int(self._con.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])

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

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
