"""PanNuke (Gamper et al., 2019/2020): 256 x 256 H&E patches of 19 tissues at 40x, with nucleus instances of
five classes, released as three folds.

Source format, per fold (``Fold 1/images/fold1/images.npy``, ``Fold 1/images/fold1/types.npy``,
``Fold 1/masks/fold1/masks.npy``): every ``images.npy`` under ``src`` is paired with the ``masks.npy`` and
``types.npy`` found in the same ``Fold k`` folder, and ``k`` (from the path) is the fold. ``images.npy``:
N x H x W x 3 float64 in 0..255 (rounded and clipped to uint8); ``masks.npy``: N x H x W x 6 float64, channels
0..4 the instance ids of Neoplastic, Inflammatory, Connective/Soft tissue, Dead and Epithelial nuclei,
channel 5 background (ignored); ``types.npy``: N tissue-type strings, written to ``tissue_types.csv``
(``Filename,Type``; skipped with a warning when the file is missing or would need unpickling). Arrays are
memory-mapped and read one patch at a time.

Classes: PanNuke's classes are not Cerberus's six, so PanNuke's own are kept for the ``nuclei`` task:
0 nolabel, 1 neoplastic, 2 inflammatory, 3 connective, 4 dead, 5 epithelial (class = channel + 1). The
instances of each channel are given new consecutive ids, so ids are unique within an image.

Names ``fold{k}_{i:05d}``; split = fold number (3 splits). Default resolution 0.25 um/px (40x).
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import Annotation, AnnotationSpec, DatasetSpec, atomic_write_bytes
from .common import DatasetWriter
from .conic import find_one, integers, load_npy, to_uint8

DEFAULT_MPP = 0.25
CLASS_NAMES = ("nolabel", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
CLASS_COLORS = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 165, 0))
_FOLD = re.compile(r"fold[\s_-]*(\d+)", re.IGNORECASE)


def import_pannuke(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the PanNuke release (one or more folds) at ``src`` into the common layout at ``dst``."""
    src, dst = Path(src), Path(dst)
    found = sorted(p for p in src.rglob("images.npy") if p.is_file())
    if not found:
        raise CerberusError(f"{src}: no PanNuke images.npy found (expected 'Fold k/images/foldk/images.npy')")
    folds: dict[int, tuple[Path, Path, Path | None]] = {}
    for images_path in found:
        root, k = _fold_root(src, images_path)
        if k < 1:
            raise CerberusError(f"{images_path}: fold number {k} in its path; PanNuke folds are 1, 2, 3")
        if k in folds:
            raise CerberusError(f"two PanNuke folds numbered {k}: {folds[k][0]} and {images_path}; keep one")
        types = sorted(p for p in root.rglob("types.npy") if p.is_file())
        if len(types) > 1:
            raise CerberusError(f"several types.npy under {root}: {types[0]} and {types[1]}; keep one")
        folds[k] = (images_path, find_one(root, "masks.npy", "PanNuke"), types[0] if types else None)
    writer = DatasetWriter(dst, "pannuke", mpp=mpp or DEFAULT_MPP, num_splits=max(3, *folds),
                           annotations=(AnnotationSpec("nuclei", ("inst", "type"), dir="labels/nuclei",
                                                       class_names=CLASS_NAMES, class_colors=CLASS_COLORS),),
                           description="PanNuke: H&E patches of 19 tissues at 40x, nucleus instances of PanNuke's "
                                       "five classes (neoplastic, inflammatory, connective, dead, epithelial)")
    tissue: dict[str, str] = {}
    for k, (images_path, masks_path, types_path) in sorted(folds.items()):
        images, masks = load_npy(images_path), load_npy(masks_path)
        if images.ndim != 4 or images.shape[3] != 3:
            raise CerberusError(f"{images_path}: expected N x H x W x 3 RGB patches, got shape {images.shape}")
        if masks.ndim != 4 or masks.shape[3] != 6:
            raise CerberusError(f"{masks_path}: expected N x H x W x 6 instance channels, got shape {masks.shape}")
        if images.shape[:3] != masks.shape[:3]:
            raise CerberusError(f"{images_path} {images.shape[:3]} and {masks_path} {masks.shape[:3]} differ in "
                                "count or size of patches")
        types = _read_types(types_path, images_path, images.shape[0])
        for i in tqdm(range(images.shape[0]), desc=f"import pannuke fold {k}", unit="patch", disable=None if progress else True):
            name = f"fold{k}_{i:05d}"
            inst, ids, classes = _relabel(np.asarray(masks[i]), masks_path, i)
            writer.add(name, to_uint8(images[i], images_path), {"nuclei": Annotation(inst, ids, classes)}, split=k)
            if types is not None:
                tissue[name] = types[i]
    if tissue:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["Filename", "Type"])
        out.writerows(sorted(tissue.items()))
        atomic_write_bytes(dst / "tissue_types.csv", buf.getvalue().encode())
    else:
        (dst / "tissue_types.csv").unlink(missing_ok=True)  # not one left from an earlier import
    return writer.finish()


def _fold_root(src: Path, images_path: Path) -> tuple[Path, int]:
    """``src`` when it is a ``Fold k`` folder, else the outermost one holding ``images_path``; and ``k``."""
    m = _FOLD.fullmatch(src.resolve().name.strip())
    if m:
        return src, int(m.group(1))
    parts = images_path.parent.relative_to(src).parts
    for j, part in enumerate(parts):
        m = _FOLD.fullmatch(part.strip())
        if m:
            return src.joinpath(*parts[: j + 1]), int(m.group(1))
    raise CerberusError(f"{images_path}: no fold number in its path (expected a 'Fold k' folder above it)")


def _read_types(types_path: Path | None, images_path: Path, n: int) -> list[str] | None:
    if types_path is None:
        warnings.warn(f"no types.npy next to {images_path}; tissue types are not written", stacklevel=3)
        return None
    try:
        types = np.load(types_path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        warnings.warn(f"{types_path}: not loaded without pickle ({type(exc).__name__}); tissue types are not "
                      "written", stacklevel=3)
        return None
    if types.ndim != 1 or types.shape[0] != n:
        raise CerberusError(f"{types_path} holds {types.shape} tissue types but {images_path} has {n} patches")
    return [t.decode() if isinstance(t, bytes) else str(t) for t in types.tolist()]


def _relabel(mask: np.ndarray, path: Path, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patch's instance map with new ids (channel by channel) and each instance's class (channel + 1)."""
    inst = np.zeros(mask.shape[:2], np.int32)
    classes: list[int] = []
    for c in range(5):
        channel = integers(mask[..., c], path, f"patch {i} channel {c}")
        if channel.min() < 0:
            raise CerberusError(f"{path}: patch {i} channel {c} holds negative instance ids")
        values, inverse = np.unique(channel, return_inverse=True)
        new = np.zeros(values.size, np.int32)
        n_new = int((values > 0).sum())
        new[values > 0] = np.arange(len(classes) + 1, len(classes) + 1 + n_new)
        fg = channel > 0
        inst[fg] = new[inverse.reshape(channel.shape)][fg]
        classes += [c + 1] * n_new
    ids = np.arange(1, len(classes) + 1, dtype=np.int32)
    keep = np.isin(ids, inst)  # an instance wholly covered by a later channel's is dropped
    return inst, ids[keep], np.asarray(classes, np.int32)[keep]
