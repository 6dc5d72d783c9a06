"""Kather NCT-CRC-HE-100K (and CRC-VAL-HE-7K): colorectal tissue patches by class.

Source format: class folders ``ADI``, ``BACK``, ``DEB``, ``LYM``, ``MUC``, ``MUS``, ``NORM``, ``STR`` and ``TUM``
directly under the source folder or one level deeper (``src/NCT-CRC-HE-100K/ADI``), each holding ``*.tif``
224 x 224 RGB patches (``.png`` and ``.jpg`` are accepted too). Other folders are ignored.

Classes (task ``tissue``, one class per patch, written to ``classes.csv``): ADI -> adipose, BACK -> background,
DEB -> debris, LYM -> inflammatory, MUC -> mucous, MUS -> muscle, NORM -> normal_epi, STR -> stroma,
TUM -> abnormal_epi. Samples are named ``<FOLDER>_<stem>``. Splits: within each class, round-robin over the
sorted sample names into 3 splits. Default mpp 0.5.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import AnnotationSpec, DatasetSpec, read_rgb
from .common import DatasetWriter, find_files

DEFAULT_MPP = 0.5
NUM_SPLITS = 3
CLASSES = {"ADI": "adipose", "BACK": "background", "DEB": "debris", "LYM": "inflammatory", "MUC": "mucous",
           "MUS": "muscle", "NORM": "normal_epi", "STR": "stroma", "TUM": "abnormal_epi"}
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def import_kather(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the Kather class folders under ``src`` into the common layout at ``dst``."""
    src = Path(src)
    jobs = []
    for folder in _class_folders(src):
        cls = CLASSES[folder.name.upper()]
        files = [(f"{folder.name}_{p.stem}", p) for p in find_files(folder, IMAGE_EXTS)]
        jobs += [(name, path, cls) for name, path in files]
    if not jobs:
        raise CerberusError(f"{src}: the Kather class folders hold no images (*.tif)")
    jobs.sort()
    count: dict[str, int] = {}
    writer = DatasetWriter(dst, "kather", mpp=mpp if mpp is not None else DEFAULT_MPP,
                           annotations=(AnnotationSpec("tissue", ("class",), csv="classes.csv"),),
                           num_splits=NUM_SPLITS, description="Kather NCT-CRC-HE tissue patches; round-robin splits")
    for name, path, cls in tqdm(jobs, desc="import kather", unit="patch", disable=None if progress else True):
        k = count[cls] = count.get(cls, -1) + 1
        writer.add(name, read_rgb(path), split=k % NUM_SPLITS + 1, image_class=cls)
    return writer.finish()


def _class_folders(src: Path) -> list[Path]:
    """The class folders directly under ``src`` or, when there are none, one level deeper."""
    for parents in ([src], sorted(d for d in src.iterdir() if d.is_dir())):
        found = [d for p in parents for d in sorted(p.iterdir()) if d.is_dir() and d.name.upper() in CLASSES]
        if found:
            return found
    raise CerberusError(f"{src}: no Kather class folders found ({', '.join(CLASSES)})")
