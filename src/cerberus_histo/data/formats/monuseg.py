"""MoNuSeg (multi-organ nucleus segmentation challenge, MICCAI 2018).

Source format: ``Tissue Images/*.tif`` (1000 x 1000 RGB at 40x; ``.png`` is accepted too) with
``Annotations/*.xml`` of the same stem, or images and XML files side by side in one folder (each image's XML
is looked up by stem anywhere under the source folder). The XML holds one ``Region`` per nucleus::

    <Annotations><Annotation><Regions><Region Id="1"><Vertices><Vertex X="12.5" Y="30.1"/>...

Each region's polygon (coordinates rounded to pixels) is filled into an instance map; later regions overwrite
earlier ones, regions with fewer than 3 vertices are dropped, ids are 1..N in order of appearance and only the
ids still present after overwriting are kept.

Classes: task ``nuclei`` with instances only (MoNuSeg has no nucleus types). Splits: round-robin over the
sorted image names into 3 splits. Default mpp 0.25 (40x).
"""

from __future__ import annotations

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
        inst = rasterise_regions(xmls[path.stem], image.shape[:2])
        ids = np.unique(inst)
        writer.add(path.stem, image, {"nuclei": Annotation(inst, ids[ids > 0])}, split=i % NUM_SPLITS + 1)
    return writer.finish()


def rasterise_regions(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The int32 instance map of a MoNuSeg XML file's regions (see the module docstring)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise CerberusError(f"{path} is not a readable XML file ({exc})") from None
    inst = np.zeros(shape, np.int32)
    n = 0
    for region in root.iter("Region"):
        try:
            points = np.array([(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")], float)
        except (TypeError, ValueError):
            raise CerberusError(f"{path}: region {region.get('Id')} has a vertex without numeric X and Y") from None
        if len(points) < 3:
            continue
        if not np.isfinite(points).all():
            raise CerberusError(f"{path}: region {region.get('Id')} has a vertex that is not a finite number")
        n += 1
        cv2.fillPoly(inst, [np.round(points).astype(np.int32)], n)
    return inst
