"""Your own annotations from QuPath: the round trip predict -> correct in QuPath -> train again.

``cerberus import-dataset qupath SRC DST`` reads a folder (searched recursively) of images and their QuPath GeoJSON
exports and writes the common dataset layout at a resolution of ``--mpp`` (default 0.5, the original model's).

Sources. Tiles (``.png``, ``.jpg``, ``.bmp``, plain ``.tif``) are kept as they are, at the resolution in their
metadata or else ``--mpp`` (recorded per image in ``mpps.csv``; extract-patches resamples). Whole slides (``.svs``,
``.ndpi``, ``.mrxs``, pyramidal ``.tif``, ...) are read through :func:`~cerberus_histo.io.slides.open_slide` (their
mpp from the metadata; without one only an explicit ``--mpp`` is taken) and cut into tiles. Each image's GeoJSON lies
in the same folder, named ``{stem}.geojson``, ``{name}.geojson`` (``slide1.svs.geojson``) or ``.json``
(``.geojson`` first). An image without GeoJSON is reported and skipped; a ``.geojson`` without image is an error
(a ``.json`` without image is not read: result folders hold other JSON files).

GeoJSON (see :mod:`.qupath_geojson`): coordinates are the image's or slide's level-0 pixels, x then y, vertices on
pixel centres as Cerberus exports them. Each polygon is filled with OpenCV (its outline pixels included, holes
cleared, the holes' outlines kept), so a Cerberus export comes back pixel for pixel; outlines traced along pixel
edges come out up to one pixel wider. Points (centroid-only detections), lines, ``tile`` and TMA objects are
skipped and counted. More than 5% of a feature's bounding box outside the image (another coordinate frame) is an
error naming the extent.

Regions. Only pixels inside annotations whose class matches ``--roi-class`` (a glob; default ``Region*``, which
matches QuPath's built-in class of that name) are labelled: each tile's mask is ``regions/{name}.png`` (255
inside) and ``dataset.yaml`` gets ``region_dir: regions``. Annotations of class ``Ignore*`` are cut out of the
region. Inside it everything is taken to be annotated: no object there means no object (so every task found in any
file is written for every tile, empty where it has nothing). A file without region annotation is an error unless
``--whole-image``: then a tile is labelled whole, and a slide is labelled over the bounding box of all its objects.
Slide tiles: each region's (each polygon of the union of the ROIs) bounding box plus 16 px, or that one box, split
evenly into tiles of at most ``--tile-size`` px (default 2048) at ``--mpp``, named ``{stem}_x{X}_y{Y}`` (level-0
corner). Splits: round-robin over regions in file order (a tile image is one region), ``num_splits`` 3; a region's
tiles stay in one split.

Classes (never guessed). The default names are the model's (``--model DIR``'s ``model.yaml``, else the ``original``
preset): every class of the nuclei, gland and lumen tasks (not ``nolabel``) and of tissue maps to itself in its
task. ``--map NAME=TASK:CLASS`` (repeatable, or a YAML file ``{NAME: "TASK:CLASS"}``) adds or overrides names;
``NAME=TASK`` gives untyped instances (class 0, ``nolabel``, which the type loss ignores), ``NAME=skip`` drops the
objects, and the empty name (``--map =gland``) stands for unclassified objects. An unclassified detection or cell
is an untyped nucleus; an unclassified annotation is an error. A name of two tasks goes to nuclei for a detection
and to the other task for an annotation, else it is an error. A cell's ``nucleusGeometry`` is its nucleus.

Labels. Nuclei, glands and lumina: one instance per polygon (a MultiPolygon is one instance), ids 1..N per tile in
file order, later ones drawn over earlier ones (counted as overlaps); ids drawn over entirely are dropped.
Nuclei and glands carry their class as ``type``; lumina are instances only. Tissue annotations fill the ``tissue``
class map (``background``, class 0, where no tissue annotation lies).

The report (printed by the CLI, saved as ``qupath_import.json``) counts images and slides read, tiles and regions
written, features per task and class, repaired (self-intersecting) polygons, holes, overlaps, skipped points,
other geometries and object types, objects outside every region, and lists the images without GeoJSON.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely.geometry import box
from tqdm import tqdm

from ...config import ModelConfig
from ...errors import CerberusError
from ...io.files import read_yaml_mapping, write_json
from ...io.readers import IMAGE_SUFFIXES, ArrayReader, check_mpp
from ...io.slides import MppError, open_slide
from ..dataset import Annotation, AnnotationSpec, DatasetSpec
from .common import DatasetWriter
from .qupath_geojson import KINDS, SKIP, ClassMap, polygons, read_features

DEFAULT_MPP = 0.5
DEFAULT_ROI = "Region*"
IGNORE_CLASS = "Ignore*"
DEFAULT_TILE_SIZE = 2048
PAD = 16  # target px around a region's bounding box
OUTSIDE = 0.05  # share of a feature's bounding box allowed outside the image
NUM_SPLITS = 3
REPORT_FILE = "qupath_import.json"
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
SHIFT = 4  # fixed-point bits of the vertices given to OpenCV


@dataclass
class QuPathReport:
    """What an import read and wrote (see the module docstring); ``spec`` is the written dataset."""

    images: int = 0
    slides: int = 0
    tiles: int = 0
    regions: int = 0
    mpp: float = DEFAULT_MPP
    features: dict = field(default_factory=dict)  # task -> class -> count
    rois: int = 0
    ignored_areas: int = 0
    repaired: int = 0
    holes: int = 0
    overlaps: int = 0
    points: int = 0
    other_geometries: int = 0
    skipped_objects: dict = field(default_factory=dict)  # objectType -> count
    skipped_by_map: int = 0
    outside_regions: int = 0
    unlabelled: list = field(default_factory=list)
    spec: DatasetSpec | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "spec"}

    def lines(self) -> list[str]:
        feats = "; ".join(f"{t} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})"
                          for t, c in sorted(self.features.items(), key=lambda tc: list(KINDS).index(tc[0])))
        feats = feats or "none"
        skipped = [f"{n} {t} objects" for t, n in sorted(self.skipped_objects.items())]
        return [
            f"read {self.images} images and {self.slides} slides; wrote {self.tiles} tiles from {self.regions} "
            f"regions at {self.mpp:g} um/px",
            f"features: {feats}",
            f"regions: {self.rois} region annotations, {self.ignored_areas} Ignore* areas cut out; "
            f"{self.outside_regions} objects outside every region (not used)",
            f"geometry: {self.repaired} self-intersecting polygons repaired, {self.holes} holes, {self.overlaps} "
            "overlapping instances (later drawn over earlier)",
            f"skipped: {self.points} points (centroid-only objects cannot be rasterised), {self.other_geometries} "
            f"other geometries, {self.skipped_by_map} mapped to skip" + "".join(f", {s}" for s in skipped),
            "unlabelled images (no GeoJSON beside them, skipped): " + (", ".join(self.unlabelled) or "none"),
        ]

    def text(self) -> str:
        return "\n".join(self.lines())


def read_report(dst: str | Path) -> QuPathReport:
    """The report an import saved in its dataset folder."""
    import json

    data = json.loads((Path(dst) / REPORT_FILE).read_text())
    return QuPathReport(**{k: v for k, v in data.items() if k in QuPathReport.__dataclass_fields__})


def import_qupath(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True, **options) -> DatasetSpec:
    """The importer of :data:`~cerberus_histo.data.formats.FORMATS` (options as :func:`qupath_import`)."""
    return qupath_import(src, dst, mpp=mpp, progress=progress, **options).spec


def qupath_import(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True, maps: tuple[str, ...] = (),
                  roi_class: str | None = None, whole_image: bool = False, tile_size: int | None = None,
                  model: Path | None = None) -> QuPathReport:
    """Convert the QuPath folder ``src`` into the common layout at ``dst``; returns the report (see the module
    docstring). Every GeoJSON is read and checked before anything is written."""
    src, roi_class = Path(src), roi_class or DEFAULT_ROI
    tile_size = DEFAULT_TILE_SIZE if tile_size is None else int(tile_size)
    if tile_size < 64:
        raise CerberusError(f"--tile-size must be at least 64 px, got {tile_size}")
    classmap = ClassMap(_model_config(model), tuple(maps))
    report = QuPathReport(mpp=DEFAULT_MPP if mpp is None else check_mpp(mpp, "--mpp"))
    pairs, report.unlabelled = find_pairs(src, exclude=Path(dst))
    if not pairs:
        raise CerberusError(f"{src}: no image with its QuPath GeoJSON ({{stem}}.geojson beside it) found")
    sources = [_prepare(image, geojson, mpp, roi_class, whole_image, classmap, report)
               for image, geojson in tqdm(pairs, desc="read geojson", unit="file", disable=None if progress else True)]
    tasks = [t for t in KINDS if t in report.features]
    if not tasks:
        raise CerberusError(f"{src}: no polygon objects of any task to train on ({report.points} points skipped: "
                            "export polygons, not centroids only)")
    writer = DatasetWriter(dst, "qupath", mpp=report.mpp, num_splits=NUM_SPLITS,
                           description=f"QuPath GeoJSON annotations from {src} (regions: {roi_class!r})",
                           annotations=tuple(AnnotationSpec(t, KINDS[t], dir=f"labels/{t}",
                                                            class_names=classmap.classes[t],
                                                            class_colors=classmap.colors[t]) for t in tasks))
    for source in tqdm(sources, desc="import qupath", unit="image", disable=None if progress else True):
        _write(source, tasks, writer, report, tile_size)
    write_json(Path(dst) / REPORT_FILE, report.to_dict())
    report.spec = writer.finish()
    return report


def _model_config(model: Path | None) -> ModelConfig:
    if model is None:
        return ModelConfig.preset("original")
    path = Path(model) / "model.yaml"
    if not path.is_file():
        raise CerberusError(f"{model}: no model.yaml (a Cerberus model folder); for an original release run "
                            "cerberus import-original first")
    meta = read_yaml_mapping(path)
    if not isinstance(meta.get("model"), dict):
        raise CerberusError(f"{path} is not a Cerberus model description (no 'model' section)")
    return ModelConfig.from_dict(meta["model"])


def find_pairs(src: Path, exclude: Path | None = None) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``([(image, geojson)], [images without GeoJSON])`` in ``src`` (see the module docstring), leaving out the
    folder ``exclude`` (the output, when it lies inside ``src``)."""
    skip = None if exclude is None else exclude.resolve()
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (skip is None or not p.resolve().is_relative_to(skip)))
    images: dict[Path, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES:
            images.setdefault(p.parent, []).append(p)
    found: dict[Path, Path] = {}
    jsons = [p for p in files if p.suffix.lower() == ".geojson"] + [p for p in files if p.suffix.lower() == ".json"]
    for j in jsons:
        base = j.name[: -len(j.suffix)]
        near = images.get(j.parent, [])
        match = [p for p in near if p.name == base] or [p for p in near if p.stem == base]
        if len(match) > 1:
            raise CerberusError(f"{j} fits several images ({', '.join(p.name for p in match)}); name it after one "
                                f"of them, e.g. {match[0].name}.geojson")
        if not match:
            if j.suffix.lower() == ".geojson":
                raise CerberusError(f"{j}: no image named {base} or {base}.* beside it; put each GeoJSON in the "
                                    "folder of its image (tile or slide)")
            continue
        if match[0] in found:
            if found[match[0]].suffix.lower() == j.suffix.lower():
                raise CerberusError(f"{match[0]} has two GeoJSON files ({found[match[0]].name}, {j.name}); keep one")
            continue  # a .json beside the image's .geojson is not read
        found[match[0]] = j
    unlabelled = [str(p.relative_to(src)) for ps in images.values() for p in ps if p not in found]
    return sorted(found.items()), sorted(unlabelled)


@dataclass
class _Source:
    image: Path
    mpp: float  # the image's level-0 mpp
    slide: bool
    items: list  # [(geometry, Target)] in file order, inside the region
    region: object  # labelled area (level-0 geometry), None: the whole image
    boxes: list  # level-0 (x0, y0, x1, y1) boxes to cut into tiles (slides)


def _open(image: Path, mpp: float | None):
    """The reader of ``image`` and whether it is a slide: a tile without mpp metadata is at ``mpp`` (0.5)."""
    try:
        reader = open_slide(image)
    except MppError:
        reader = open_slide(image, mpp=DEFAULT_MPP if mpp is None else mpp)
        if not isinstance(reader, ArrayReader) and mpp is None:
            reader.close()
            raise
    return reader, not isinstance(reader, ArrayReader)


def _prepare(image: Path, geojson: Path, mpp: float | None, roi_class: str, whole_image: bool, classmap: ClassMap,
             report: QuPathReport) -> _Source:
    """Read, map and check one GeoJSON against its image (nothing is written)."""
    reader, slide = _open(image, mpp)
    with reader:
        width, height = reader.dimensions
        source_mpp = reader.mpp
    extent = box(-0.5, -0.5, width - 0.5, height - 0.5)
    rois, ignores, items = [], [], []
    skipped = Counter()
    for f in read_features(geojson):
        where = f"{geojson} features[{f.index}]"
        if f.object_type not in ("annotation", "detection", "cell"):
            skipped[f.object_type] += 1
        elif f.kind != "polygon":
            report.points += f.kind == "point"
            report.other_geometries += f.kind != "point"
        else:
            _check_extent(f.geometry, extent, width, height, where)
            report.repaired += f.repaired
            annotation = f.object_type == "annotation" and f.name is not None
            if annotation and fnmatchcase(f.name, roi_class):
                rois.append(f.geometry)
            elif annotation and fnmatchcase(f.name, IGNORE_CLASS):
                ignores.append(f.geometry)
            else:
                target = classmap.target(f.name, f.object_type, f"{where} ({f.object_type})")
                if target == SKIP:
                    report.skipped_by_map += 1
                else:
                    items.append((f.geometry, target))
    for t, n in skipped.items():
        report.skipped_objects[t] = report.skipped_objects.get(t, 0) + n
    report.rois, report.ignored_areas = report.rois + len(rois), report.ignored_areas + len(ignores)
    if not rois and not whole_image:
        raise CerberusError(f"no region annotations of class {roi_class!r} in {geojson}; annotate the regions you "
                            "labelled, or pass --whole-image")
    region = shapely.union_all(rois).intersection(extent) if rois else None
    if ignores:
        region = (extent if region is None else region).difference(shapely.union_all(ignores))
    if region is not None:
        inside = shapely.intersects(region, [g for g, _ in items]) if items else np.zeros(0, bool)
        report.outside_regions += int((~inside).sum())
        items = [it for it, keep in zip(items, inside, strict=True) if keep]
    for geom, target in items:
        counts = report.features.setdefault(target.task, {})
        counts[classmap.label(target)] = counts.get(classmap.label(target), 0) + 1
        report.holes += sum(len(p.interiors) for p in polygons(geom))
    if not slide:
        boxes = [(0, 0, width, height)]
    elif rois:
        boxes = [p.bounds for p in polygons(shapely.union_all(rois).intersection(extent))]
    else:
        boxes = [shapely.union_all([g for g, _ in items]).bounds] if items else []
    if slide and not boxes:
        report.unlabelled.append(f"{image.name} (no objects)")
    report.slides += slide
    report.images += not slide
    return _Source(image, source_mpp, slide, items, region, boxes)


def _check_extent(geom, extent, width: int, height: int, where: str) -> None:
    x0, y0, x1, y1 = geom.bounds
    bounds = box(x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5)
    outside = 1 - bounds.intersection(extent).area / bounds.area
    if outside > OUTSIDE:
        raise CerberusError(f"{where}: {outside:.0%} of its bounds ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lie outside the "
                            f"image's extent 0..{width} x 0..{height} (level-0 px); is this GeoJSON in another "
                            "coordinate frame (a crop, another image)?")


def _tiles(bounds, size: tuple[int, int], f: float, tile_size: int):
    """Level-0 corners and target sizes ``(x, y, w, h)`` of the tiles covering ``bounds`` plus PAD target px."""
    width, height = size
    x0, y0 = max(0, math.floor(bounds[0] - PAD / f)), max(0, math.floor(bounds[1] - PAD / f))
    x1, y1 = min(width, math.ceil(bounds[2] + 1 + PAD / f)), min(height, math.ceil(bounds[3] + 1 + PAD / f))
    tw, th = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
    nx, ny = math.ceil(tw / tile_size), math.ceil(th / tile_size)
    sx, sy = math.ceil(tw / nx), math.ceil(th / ny)
    for j in range(ny):
        for i in range(nx):
            yield (x0 + math.floor(i * sx / f), y0 + math.floor(j * sy / f),
                   min(sx, tw - i * sx), min(sy, th - j * sy))


def _write(source: _Source, tasks: list[str], writer: DatasetWriter, report: QuPathReport, tile_size: int) -> None:
    reader, _ = _open(source.image, source.mpp)
    with reader:
        f = source.mpp / report.mpp if source.slide else 1.0
        tree = shapely.STRtree([g for g, _ in source.items])
        for b in source.boxes:
            split = report.regions % NUM_SPLITS + 1
            report.regions += 1
            tiles = _tiles(b, reader.dimensions, f, tile_size) if source.slide else [(0, 0, *reader.dimensions)]
            for x, y, w, h in tiles:
                image = reader.read_region((x, y), (w, h), report.mpp) if source.slide else reader.image
                tile_box = box(x - 0.5, y - 0.5, x - 0.5 + w / f, y - 0.5 + h / f)
                items = [source.items[i] for i in sorted(tree.query(tile_box))] if source.items else []
                labels = {t: _labels(t, items, (h, w), x, y, f, report) for t in tasks}
                region = None
                if source.region is not None:
                    region = np.zeros((h, w), bool)
                    _draw(region, source.region.intersection(tile_box), x, y, f, True)
                    region = None if region.all() else region
                name = f"{source.image.stem}_x{x}_y{y}" if source.slide else source.image.stem
                writer.add(name, image, labels, split=split, region=region, mpp=None if source.slide else source.mpp)
                report.tiles += 1


def _labels(task: str, items: list, shape: tuple[int, int], x: int, y: int, f: float,
            report: QuPathReport) -> Annotation:
    """One task's labels of a tile: instances drawn in order (later over earlier), or the tissue class map."""
    label = np.zeros(shape, np.int32)
    classes = [0]
    for geom, target in items:
        if target.task == task:
            value = target.index if task == "tissue" else len(classes)
            drawn, overlap = _draw(label, geom, x, y, f, value)
            report.overlaps += overlap
            classes += [target.index] * drawn
    if task == "tissue":
        return Annotation(class_map=label)
    ids = np.unique(label)
    ids = ids[ids > 0].astype(np.int32)
    return Annotation(label, ids, np.asarray(classes, np.int32)[ids] if "type" in KINDS[task] else None)


def _draw(out: np.ndarray, geom, x: int, y: int, f: float, value) -> tuple[bool, bool]:
    """Set the pixels of ``geom`` (level-0 polygons) to ``value`` in ``out``, a tile whose corner is level-0 (x, y),
    at ``f`` tile px per level-0 px: outlines included, holes cleared but their outlines kept (see the module
    docstring). Returns (whether any pixel was drawn, whether it covered pixels already set)."""
    h, w = out.shape
    rings = [[((np.asarray(r.coords)[:, :2] - (x, y) + 0.5) * f - 0.5) for r in (p.exterior, *p.interiors)]
             for p in polygons(geom)]
    if not rings:
        return False, False
    lo = np.floor(np.min([r[0].min(0) for r in rings], 0)).astype(int)
    hi = np.ceil(np.max([r[0].max(0) for r in rings], 0)).astype(int) + 1
    x0, y0, x1, y1 = max(lo[0], 0), max(lo[1], 0), min(hi[0], w), min(hi[1], h)
    if x1 <= x0 or y1 <= y0:
        return False, False
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for poly in rings:
        fixed = [np.round((r - (x0, y0)) * (1 << SHIFT)).astype(np.int32) for r in poly]
        part = np.zeros_like(mask)
        cv2.fillPoly(part, fixed[:1], 1, shift=SHIFT)
        if len(fixed) > 1:
            cv2.fillPoly(part, fixed[1:], 0, shift=SHIFT)
            cv2.polylines(part, fixed[1:], True, 1, shift=SHIFT)
        mask |= part
    sel = mask.astype(bool)
    if not sel.any():
        return False, False
    view = out[y0:y1, x0:x1]
    overlap = bool(view[sel].any())
    view[sel] = value
    return True, overlap
