"""MoNuSeg (multi-organ nucleus segmentation challenge, MICCAI 2018).

Source format: ``Tissue Images/*.tif`` (1000 x 1000 RGB at 40x; ``.png`` is accepted too) with
``Annotations/*.xml`` of the same stem, or images and XML files side by side in one folder (the test set's
layout; each image's XML is looked up by stem anywhere under the source folder). The training set's TIFFs are
LZW-compressed (with horizontal predictor) without resolution tags, the test set's PackBits with a 72-dpi tag;
OpenCV reads both, and no TIFF resolution tag is ever used (72 dpi is not a pixel size). The ImageScope XML
(no ``<?xml?>`` declaration in the release) holds the image's resolution and one ``Region`` per nucleus::

    <Annotations MicronsPerPixel="0.252000"><Annotation><Regions><Region Id="1"><Vertices>
        <Vertex X="12.5" Y="30.1" Z="0"/>...

Resolution: each image's ``MicronsPerPixel`` (0.2456-0.2527 in the training files checked) is recorded as its own mpp
(``mpps.csv``); the dataset's ``mpp`` is 0.25 (40x). A missing, non-numeric or implausible attribute (outside
0.01-100; one file of the training release, TCGA-NH-A8F7-01A-01-TS1, has none) leaves that image at the
dataset's mpp. ``--mpp`` sets the resolution of every image and the XML values are then ignored.

Regions: vertices are floats (X = column, Y = row); some lie just outside the image (-2.9 to 1002.1 on
1000 px images), so X is clipped to [0, W-1] and Y to [0, H-1], then rounded, and each region's polygon is
filled into an instance map. Regions with fewer than 3 vertices are dropped (in the 13 training files checked,
two: one each in TCGA-50-5931-01Z-00-DX1 and TCGA-E2-A1B5-01Z-00-DX1, each two nearly identical points), and
so are regions lying entirely outside the image (none there). Later regions overwrite the pixels of earlier
ones where they overlap; ids are 1..N in order of appearance and only the ids still present after overwriting
are kept. Outlines do overlap in the release (in each of the 13 files checked, 18 to 153 regions lose pixels
to later ones, one of them 99 % of its area), but none is entirely overwritten there: the number of instances
equals the number of regions with at least 3 vertices, and the ids are 1..N.

Classes: task ``nuclei`` with instances only (MoNuSeg has no nucleus types). Splits: round-robin over the
sorted image names into 3 splits.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import Annotation, AnnotationSpec, DatasetSpec, read_rgb
from .common import DatasetWriter, find_files

DEFAULT_MPP = 0.25
NUM_SPLITS = 3
MPP_RANGE = (0.01, 100.0)  # what a dataset's mpps.csv accepts


def import_monuseg(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the MoNuSeg folder ``src`` into the common layout at ``dst``."""
    src = Path(src)
    images = sorted(find_files(src, (".tif", ".tiff", ".png")), key=lambda p: (p.stem, str(p)))
    if not images:
        raise CerberusError(f"{src}: no MoNuSeg images found (*.tif with an .xml annotation of the same name)")
    xmls = {p.stem: p for p in find_files(src, (".xml",))}
    missing = [p for p in images if p.stem not in xmls]
    if missing:
        raise CerberusError(f"{missing[0]}: its annotation {missing[0].stem}.xml was not found under {src}")

    writer = DatasetWriter(dst, "monuseg", mpp=mpp if mpp is not None else DEFAULT_MPP,
                           annotations=(AnnotationSpec("nuclei", ("inst",), dir="labels/nuclei"),),
                           num_splits=NUM_SPLITS, description="MoNuSeg nuclei (instances only); round-robin splits")
    for i, path in enumerate(tqdm(images, desc="import monuseg", unit="image", disable=None if progress else True)):
        image = read_rgb(path)
        polygons, xml_mpp = read_annotation_xml(xmls[path.stem])
        inst = rasterise(polygons, image.shape[:2])
        ids = np.unique(inst)
        writer.add(path.stem, image, {"nuclei": Annotation(inst, ids[ids > 0])}, split=i % NUM_SPLITS + 1,
                   mpp=xml_mpp if mpp is None else None)
    return writer.finish()


def read_annotation_xml(path: Path) -> tuple[list[np.ndarray], float | None]:
    """``(polygons, mpp)`` of a MoNuSeg XML file: each region with at least 3 vertices as a float (N, 2) array
    of (x, y), in file order, and the root's ``MicronsPerPixel`` (``None`` when missing or not a plausible
    number). Parsed incrementally, each region freed once read (about twice as fast as building the tree)."""
    polygons = []
    element = None
    try:
        for _, element in ET.iterparse(path, events=("end",)):
            if element.tag != "Region":
                continue
            rid = element.get("Id")
            try:
                points = np.array([(float(v.get("X")), float(v.get("Y"))) for v in element.iter("Vertex")], float)
            except (TypeError, ValueError):
                raise CerberusError(f"{path}: region {rid} has a vertex without numeric X and Y") from None
            if len(points) >= 3:
                if not np.isfinite(points).all():
                    raise CerberusError(f"{path}: region {rid} has a vertex that is not a finite number")
                polygons.append(points)
            element.clear()
    except (ET.ParseError, OSError) as exc:
        raise CerberusError(f"{path} is not a readable XML file ({exc})") from None
    # the last element closed is the root (<Annotations MicronsPerPixel=...>)
    return polygons, None if element is None else microns_per_pixel(element)


def microns_per_pixel(root: ET.Element) -> float | None:
    """The ``MicronsPerPixel`` attribute of an ImageScope XML root, or ``None`` if absent or implausible."""
    try:
        value = float(str(root.get("MicronsPerPixel", "")).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1] else None


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The int32 instance map of ``polygons`` (x, y vertices), clipped to the image (see the module docstring)."""
    h, w = shape
    inst = np.zeros(shape, np.int32)
    n = 0
    for points in polygons:
        lo, hi = points.min(0), points.max(0)
        if hi[0] < -0.5 or hi[1] < -0.5 or lo[0] > w - 0.5 or lo[1] > h - 0.5:
            continue  # entirely outside: clipping would make it a line along the border
        n += 1
        xy = np.empty_like(points)
        xy[:, 0] = np.clip(points[:, 0], 0, w - 1)
        xy[:, 1] = np.clip(points[:, 1], 0, h - 1)
        cv2.fillPoly(inst, [np.round(xy).astype(np.int32)], n)
    return inst


def rasterise_regions(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The int32 instance map of a MoNuSeg XML file's regions (see the module docstring)."""
    return rasterise(read_annotation_xml(path)[0], shape)
