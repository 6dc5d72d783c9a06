"""Reading a QuPath GeoJSON export (*File > Export objects as GeoJSON*, or a Cerberus ``{stem}.geojson``) into
:class:`Feature` s; the import rules are in :mod:`.qupath`.

Accepted: a ``FeatureCollection``, a bare list of Features (QuPath's export without "Export as
FeatureCollection") or a single Feature. Per Feature:

* ``properties.objectType`` (``annotation``, ``detection``, ``cell``, ``tile``, ...), lower-cased; QuPath 0.2
  wrote the type as the Feature's ``id`` (``PathAnnotationObject``, ``PathDetectionObject``, ``PathCellObject``,
  ...), which is read when ``objectType`` is absent; neither: an annotation (as QuPath imports it).
* ``properties.classification``: ``{"name": ...}``, ``{"names": [...]}`` (QuPath 0.4+'s derived classes, joined
  with ``": "`` as QuPath shows them, e.g. ``Tumor: Positive``), a plain string, or absent (unclassified).
* the geometry: a cell's ``nucleusGeometry`` when it has one (the nucleus is what the nuclei task labels), else
  ``geometry``. Polygon and MultiPolygon (with holes) are kept; a GeometryCollection keeps its polygons; an
  invalid polygon (a self-intersecting outline, a bow-tie) is repaired with ``shapely.make_valid`` and keeps its
  polygonal parts (``repaired``); Points (centroid-only detections) and lines are returned with ``kind`` "point"
  or "other", since they cannot be rasterised.

:class:`ClassMap` turns a class name and objectType into a task and class (the rules in :mod:`.qupath`).

Errors (one line, naming the file and ``features[i]``, 0-based): not JSON, no Features, a Feature without a
geometry object, coordinates that are not finite numbers, a classification of another shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from ...config import ModelConfig
from ...errors import CerberusError
from ...io.files import read_yaml_mapping

#: QuPath 0.2's Feature ``id`` -> objectType
LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
                "PathTileObject": "tile", "TMACoreObject": "tma_core", "PathRootObject": "root"}
KINDS = {"nuclei": ("inst", "type"), "gland": ("inst", "type"), "lumen": ("inst",), "tissue": ("class_map",)}
EXPORT_HINT = "export it again from QuPath (File > Export objects as GeoJSON)"


@dataclass(frozen=True)
class Feature:
    """One object of a GeoJSON file: ``index`` in its list, ``object_type``, ``name`` (the class; None when
    unclassified), ``kind`` ("polygon", "point" or "other") and, for polygons, ``geometry`` (a valid Polygon or
    MultiPolygon in the file's coordinates) and whether it was ``repaired``."""

    index: int
    object_type: str
    name: str | None
    kind: str
    geometry: Polygon | MultiPolygon | None = None
    repaired: bool = False


def read_features(path: Path) -> list[Feature]:
    """The Features of a QuPath GeoJSON file, in file order (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CerberusError(f"{path} is not valid JSON ({reason}); {EXPORT_HINT}") from None
    if isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    if not isinstance(data, list):
        raise CerberusError(f"{path} holds no GeoJSON features (expected a FeatureCollection or a list of "
                            f"Features); {EXPORT_HINT}")
    return [_feature(path, i, f) for i, f in enumerate(data)]


def _feature(path: Path, i: int, f) -> Feature:
    where = f"{path} features[{i}]"
    if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
        raise CerberusError(f"{where}: not a GeoJSON Feature with a geometry object; {EXPORT_HINT}")
    props = f.get("properties") or {}
    if not isinstance(props, dict):
        raise CerberusError(f"{where}: properties must be an object, got {type(props).__name__}")
    object_type = props.get("objectType") or LEGACY_TYPES.get(str(f.get("id")), "annotation")
    object_type = str(object_type).strip().lower().replace(" ", "_")
    name = _class_name(props.get("classification"), where)
    geometry = f["geometry"]
    if object_type == "cell" and isinstance(f.get("nucleusGeometry"), dict):
        geometry = f["nucleusGeometry"]
    try:
        geom = shape(geometry)
        coords = shapely.get_coordinates(geom)
    except Exception as exc:  # noqa: BLE001 - shapely raises many kinds for malformed coordinates
        raise CerberusError(f"{where}: unreadable {geometry.get('type')!r} geometry "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not np.isfinite(coords).all():
        raise CerberusError(f"{where}: a coordinate is not a finite number")
    if geom.geom_type in ("Point", "MultiPoint"):
        return Feature(i, object_type, name, "point")
    polygons = _polygonal(geom)
    repaired = False
    if polygons is not None and not polygons.is_valid:
        polygons, repaired = _polygonal(shapely.make_valid(polygons)), True
    if polygons is None or polygons.is_empty:
        return Feature(i, object_type, name, "other")
    return Feature(i, object_type, name, "polygon", polygons, repaired)


def _class_name(c, where: str) -> str | None:
    if c is None:
        return None
    if isinstance(c, str):
        return c.strip() or None
    if isinstance(c, dict):
        if isinstance(c.get("name"), str):
            return c["name"].strip() or None
        names = c.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return ": ".join(n.strip() for n in names) or None
        if not c:
            return None
    raise CerberusError(f"{where}: properties.classification must be {{\"name\": ...}} or a string, got {c!r:.60}")


def _polygonal(geom) -> Polygon | MultiPolygon | None:
    """The polygons of ``geom`` (a Polygon or MultiPolygon), or None when it has none."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [p for g in shapely.get_parts(geom) for p in
             (g.geoms if isinstance(g, MultiPolygon) else [g]) if isinstance(p, Polygon) and not p.is_empty]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def polygons(geom) -> list[Polygon]:
    """The non-empty Polygons of any geometry (collections flattened)."""
    parts = shapely.get_parts(shapely.get_parts(geom))
    return [p for p in parts if isinstance(p, Polygon) and not p.is_empty]


@dataclass(frozen=True)
class Target:
    task: str  # a task of KINDS, or "skip"
    index: int = 0


SKIP = Target("skip")


class ClassMap:
    """QuPath class name (and objectType) -> :class:`Target`, from a model config and ``--map`` items."""

    def __init__(self, config: ModelConfig, maps: tuple[str, ...] = ()):
        self.classes = {t.name: t.class_names for t in config.tasks if t.name in KINDS}
        self.colors = {t.name: t.class_colors for t in config.tasks if t.name in KINDS}
        if not self.classes:
            raise CerberusError(f"the model has none of the tasks {', '.join(KINDS)}: nothing to import for it")
        self.known: dict[str, list[Target]] = {}
        for task, names in self.classes.items():
            for i, name in enumerate(names):
                if i or task == "tissue":
                    self.known.setdefault(name, []).append(Target(task, i))
        self.user: dict[str, Target] = {}
        for item in maps:
            if "=" in item:
                name, _, value = item.rpartition("=")
                self.user[name.strip()] = self.parse(value, f"--map {item!r}")
                continue
            path = Path(item)
            if not path.is_file():
                raise CerberusError(f"--map {item!r}: expected NAME=TASK:CLASS or a YAML file of them; file not found")
            for name, value in read_yaml_mapping(path).items():
                self.user["" if name is None else str(name).strip()] = self.parse(str(value), f"{path} {name!r}")

    def parse(self, text: str, where: str) -> Target:
        text = text.strip()
        if text.lower() == "skip":
            return SKIP
        task, _, cls = (s.strip() for s in text.partition(":"))
        if task not in self.classes:
            raise CerberusError(f"{where}: {task!r} is not a task of the model; use one of "
                                f"{', '.join(self.classes)} (TASK:CLASS), or skip")
        names = self.classes[task]
        if not cls:
            if task == "tissue":
                raise CerberusError(f"{where}: a tissue annotation needs its class: tissue:CLASS ({', '.join(names)})")
            return Target(task, 1 if task == "lumen" else 0)
        if cls not in names:
            raise CerberusError(f"{where}: {cls!r} is not a class of task {task} ({', '.join(names)})")
        return Target(task, names.index(cls))

    def target(self, name: str | None, object_type: str, where: str) -> Target:
        if (name or "") in self.user:
            return self.user[name or ""]
        detection = object_type in ("detection", "cell")
        if name is None:
            if detection and "nuclei" in self.classes:
                return Target("nuclei", 0)
            raise CerberusError(f"{where}: an unclassified {object_type}; classify it in QuPath, or read unclassified "
                                f"objects as one task with --map '=TASK' (e.g. --map '=gland': untyped glands)")
        found = self.known.get(name, [])
        if len(found) > 1:
            found = [t for t in found if (t.task == "nuclei") == detection] or found
        if len(found) == 1:
            return found[0]
        if found:
            raise CerberusError(f"{where}: class {name!r} is a class of {' and '.join(t.task for t in found)}; say "
                                f"which with --map '{name}=TASK:{name}'")
        known = "; ".join(f"{t}: {', '.join(n[0 if t == 'tissue' else 1:])}" for t, n in self.classes.items())
        raise CerberusError(f"{where}: unknown class {name!r} (names are never guessed); map it with --map "
                            f"'{name}=TASK:CLASS' or --map '{name}=skip'; known classes: {known}")

    def label(self, t: Target) -> str:
        return "untyped" if t.index == 0 and t.task != "tissue" else self.classes[t.task][t.index]
