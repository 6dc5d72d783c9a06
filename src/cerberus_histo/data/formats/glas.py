"""GlaS (Warwick-QU gland segmentation challenge, MICCAI 2015).

Source format: a folder (searched recursively) of ``*.bmp`` images named ``train_N.bmp``, ``testA_N.bmp`` and
``testB_N.bmp`` (24-bit RGB), each with its instance map ``<stem>_anno.bmp``, and an optional ``Grade.csv``.
The released ``_anno.bmp`` files are 8-bit palettised BMPs with an identity grey palette (entry i = (i, i, i)),
so the pixel value is the gland's instance id (0 = background, 1..N); the values need not be contiguous and
are kept as the ids. A palettised map is read by its palette indices; an 8/16-bit greyscale map by its values.
``Grade.csv`` (columns ``name``, ``patient ID``, `` grade (GlaS)`` (benign / malignant),
`` grade (Sirinukunwattana et al. 2015)``) has old-Mac CR-only line endings and a leading space in its column
names and values (`` benign``); the CSV reader splits on CR, LF or CRLF, and names and values are stripped.

Classes: task ``gland`` (inst, type); every gland is class 1 ``gland`` (GlaS has no surface-epithelium label).
Splits: ``train`` -> 1, ``testA`` -> 2, ``testB`` -> 3 (by the name's prefix). Default mpp 0.62005, the
challenge's stated resolution of the released images (20x; the 0.465 um/px Zeiss MIRAX MIDI scans rescaled).
When ``Grade.csv`` exists, each imported image's GlaS grade (``benign`` / ``malignant``, stripped) is written
to ``grades.csv`` (Filename,Grade).
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import Annotation, AnnotationSpec, DatasetSpec, atomic_write_bytes, read_rgb
from .common import DatasetWriter, find_files

DEFAULT_MPP = 0.62005  # the GlaS challenge's figure for the released 20x images
SPLITS = {"train": 1, "testa": 2, "testb": 3}


def import_glas(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the GlaS folder ``src`` into the common layout at ``dst``."""
    src = Path(src)
    bmps = find_files(src, (".bmp",))
    annos = {p.stem[: -len("_anno")]: p for p in bmps if p.stem.endswith("_anno")}
    images = [p for p in bmps if not p.stem.endswith("_anno")]
    if not images:
        raise CerberusError(f"{src}: no GlaS images found (train_N.bmp, testA_N.bmp, testB_N.bmp with _anno.bmp maps)")
    jobs = []
    for path in images:
        split = SPLITS.get(path.stem.split("_")[0].lower())
        if split is None:
            raise CerberusError(f"{path}: not a GlaS image name (train_N, testA_N or testB_N); cannot tell its split")
        if path.stem not in annos:
            raise CerberusError(f"{path}: its instance map {path.stem}_anno.bmp was not found")
        jobs.append((path, annos[path.stem], split))
    grades = _read_grades(src)

    writer = DatasetWriter(dst, "glas", mpp=mpp if mpp is not None else DEFAULT_MPP,
                           annotations=(AnnotationSpec("gland", ("inst", "type"), dir="labels/gland"),),
                           num_splits=3, description="GlaS gland segmentation; splits: 1 train, 2 testA, 3 testB")
    for path, anno, split in tqdm(jobs, desc="import glas", unit="image", disable=None if progress else True):
        image = read_rgb(path)
        inst = read_instance_map(anno, image.shape[:2])
        ids = np.unique(inst)
        ids = ids[ids > 0]
        writer.add(path.stem, image, {"gland": Annotation(inst, ids, np.ones_like(ids))}, split=split)
    if grades:
        rows = ["Filename,Grade"] + [f"{n},{grades[n]}" for n in sorted(writer.splits) if n in grades]
        atomic_write_bytes(Path(dst) / "grades.csv", ("\n".join(rows) + "\n").encode())
    return writer.finish()


def _read_grades(src: Path) -> dict[str, str]:
    """``{name: grade}`` from ``Grade.csv`` (anywhere under ``src``), or ``{}`` when there is none."""
    found = [p for p in find_files(src, (".csv",)) if p.name.lower() == "grade.csv"]
    if not found:
        return {}
    path = found[0]
    try:
        # newline="": the csv module then splits rows on CR (the release's old-Mac endings), LF or CRLF
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError) as exc:
        raise CerberusError(f"{path} is not a readable CSV file ({type(exc).__name__})") from None
    header = [c.lower() for c in rows[0]] if rows else []
    if "name" not in header or "grade (glas)" not in header:
        raise CerberusError(f"{path}: expected columns 'name' and 'grade (GlaS)', got {rows[0] if rows else []}")
    i, j = header.index("name"), header.index("grade (glas)")
    return {row[i]: row[j] for row in rows[1:] if len(row) > max(i, j)}


def read_instance_map(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """An instance-label image (8- or 16-bit greyscale; values are the ids) as int32, checked against the
    image's shape. A palettised image gives its palette indices (GlaS's identity grey palette: index = value =
    id). A colour image with equal channels is read as greyscale; otherwise each distinct colour becomes one
    instance (black = background)."""
    label = _palette_indices(path)
    if label is None:
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None or label.size == 0:
        raise CerberusError(f"{path} is not a readable image (corrupt or not an image)")
    if label.dtype.kind not in "ui":
        raise CerberusError(f"{path}: unsupported pixel type {label.dtype} for an instance map; use 8 or 16 bits")
    if label.ndim == 3:
        label = label[..., :3]
        if (label == label[..., :1]).all():
            label = label[..., 0]
        else:
            colors, inverse = np.unique(label.reshape(-1, 3), axis=0, return_inverse=True)
            ids = np.arange(len(colors)) + (1 if colors[0].any() else 0)
            label = ids[inverse.ravel()].reshape(label.shape[:2])
    if label.shape != tuple(shape):
        raise CerberusError(f"{path}: annotation shape {label.shape} differs from its image {tuple(shape)}")
    return label.astype(np.int32)


def _palette_indices(path: Path) -> np.ndarray | None:
    """The palette indices of a palettised image (Pillow mode ``P``), else ``None`` (left to OpenCV). Pillow
    opens a palettised BMP whose palette is the identity grey ramp (GlaS) as greyscale ``L``: ``None`` too, and
    OpenCV's decoded greys are then the indices."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with scikit-image
        return None
    try:
        with Image.open(path) as im:
            return np.asarray(im) if im.mode == "P" else None
    except Exception:  # noqa: BLE001 - unreadable here: OpenCV's reading names the problem
        return None
