"""CoNIC (the 2022 challenge release of Lizard as 256 x 256 patches at 20x): nucleus instances of six classes.

Source format (found anywhere under ``src``): ``images.npy`` (N x H x W x 3, uint8 RGB), ``labels.npy``
(N x H x W x 2: channel 0 the instance map, channel 1 the class map, 0 background) and, optional,
``patch_info.csv`` (one patch name per image, such as ``consep_1-0000``, under a ``patch_info`` header).
The arrays are memory-mapped and read one patch at a time; nothing is unpickled.

Classes are Lizard's, one to one onto the ``nuclei`` task: 1 neutrophil, 2 epithelial, 3 lymphocyte,
4 plasma, 5 eosinophil, 6 connective; each instance takes the most frequent class of the class map over
its pixels.

Names are the patch names from ``patch_info.csv``, else ``conic_00000``... Splits (3): with
``patch_info.csv`` the patches are grouped by source image (the name before the last ``-``) and the sorted
groups are dealt round-robin, so the patches of one image share a split; without it, round-robin by index.
Default resolution 0.5 um/px (20x).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import Annotation, AnnotationSpec, DatasetSpec
from .common import DatasetWriter, majority_class

DEFAULT_MPP = 0.5
NUM_SPLITS = 3


def import_conic(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the CoNIC release at ``src`` into the common layout at ``dst``."""
    src, dst = Path(src), Path(dst)
    images_path, labels_path = find_one(src, "images.npy", "CoNIC"), find_one(src, "labels.npy", "CoNIC")
    images, labels = load_npy(images_path), load_npy(labels_path)
    if images.ndim != 4 or images.shape[3] != 3:
        raise CerberusError(f"{images_path}: expected N x H x W x 3 RGB patches, got shape {images.shape}")
    if labels.ndim != 4 or labels.shape[3] != 2:
        raise CerberusError(f"{labels_path}: expected N x H x W x 2 (instance, class), got shape {labels.shape}")
    if images.shape[:3] != labels.shape[:3]:
        raise CerberusError(f"{images_path} {images.shape[:3]} and {labels_path} {labels.shape[:3]} differ in "
                            "count or size of patches")
    n = images.shape[0]
    if n == 0:
        raise CerberusError(f"{images_path}: holds no patches")
    info = [p for p in src.rglob("patch_info.csv") if p.is_file()]
    if len(info) > 1:
        raise CerberusError(f"several patch_info.csv under {src}: {info[0]} and {info[1]}; keep one")
    if info:
        names = _read_patch_info(info[0], n)
        groups = sorted({name.rsplit("-", 1)[0] for name in names})
        group_split = {g: i % NUM_SPLITS + 1 for i, g in enumerate(groups)}
        splits = [group_split[name.rsplit("-", 1)[0]] for name in names]
    else:
        names = [f"conic_{i:05d}" for i in range(n)]
        splits = [i % NUM_SPLITS + 1 for i in range(n)]
    writer = DatasetWriter(dst, "conic", mpp=mpp or DEFAULT_MPP, num_splits=NUM_SPLITS,
                           annotations=(AnnotationSpec("nuclei", ("inst", "type"), dir="labels/nuclei"),),
                           description="CoNIC: Lizard patches (colon H&E at 20x), nucleus instances of six classes")
    for i in tqdm(range(n), desc="import conic", unit="patch", disable=None if progress else True):
        label = integers(labels[i], labels_path, f"patch {i}")
        inst, class_map = label[..., 0], label[..., 1]
        if class_map.min() < 0 or class_map.max() > 6 or inst.min() < 0:
            raise CerberusError(f"{labels_path}: patch {i} has negative instance ids or classes outside 0..6")
        ids, classes = majority_class(inst, class_map)
        writer.add(names[i], to_uint8(images[i], images_path), {"nuclei": Annotation(inst, ids, classes)}, split=splits[i])
    return writer.finish()


def _read_patch_info(path: Path, n: int) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(c.strip() for c in row)]
    names = [row[-1].strip() for row in rows]  # the last column (a pandas index may come first)
    if names and (names[0].lower() == "patch_info" or len(names) == n + 1):  # a header
        names = names[1:]
    if len(names) != n:
        raise CerberusError(f"{path}: {len(names)} patch names for {n} patches in images.npy")
    if len(set(names)) != n:
        raise CerberusError(f"{path}: patch names repeat")
    return names


# ---- shared with the PanNuke importer -------------------------------------------------------------------


def find_one(src: Path, filename: str, fmt: str) -> Path:
    """The one file called ``filename`` under ``src`` (recursively)."""
    found = sorted(p for p in Path(src).rglob(filename) if p.is_file())
    if not found:
        raise CerberusError(f"{src}: no {filename} found; is this the {fmt} release?")
    if len(found) > 1:
        raise CerberusError(f"several {filename} under {src}: {found[0]} and {found[1]}; keep one")
    return found[0]


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` file memory-mapped (read lazily), never unpickled."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise CerberusError(f"{path} is not a plain .npy array (it holds Python objects or pickled data, "
                                "which are never unpickled); save it as a numeric array") from None
        raise CerberusError(f"{path} is not a readable .npy file ({exc})") from None
    except OSError as exc:
        raise CerberusError(f"{path} is not a readable .npy file ({type(exc).__name__})") from None


def integers(arr: np.ndarray, path: Path, where: str) -> np.ndarray:
    """``arr`` as int64; float arrays must hold whole numbers."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        out = arr.astype(np.int64)
        if not np.array_equal(out, arr):
            raise CerberusError(f"{path}: {where} holds non-integer label values")
        return out
    if arr.dtype.kind not in "biu":
        raise CerberusError(f"{path}: {where} must hold integer labels, got {arr.dtype}")
    return arr.astype(np.int64)


def to_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    """RGB as uint8: rounded and clipped to 0..255 when stored as another type."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind not in "biuf":
        raise CerberusError(f"{path}: images must be numeric, got {image.dtype}")
    return np.clip(np.rint(image.astype(np.float64)), 0, 255).astype(np.uint8)
