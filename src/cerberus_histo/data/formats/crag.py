"""CRAG (colorectal adenocarcinoma gland dataset, Graham et al. 2019).

Source format: ``train/Images/*.png`` with ``train/Annotation/*.png`` and ``valid/Images/*.png`` with
``valid/Annotation/*.png`` (same file names; the ``train`` and ``valid`` folders may sit deeper under the source
folder). Annotations are instance-label PNGs (8- or 16-bit greyscale, 0 = background, one value per gland; the
values are kept as the instance ids).

Classes: task ``gland`` (inst, type); every gland is class 1 ``gland``. Splits: ``train`` -> 1, ``valid`` -> 2;
samples are named ``train_<stem>`` and ``valid_<stem>``. Default mpp 0.55 (20x).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import Annotation, AnnotationSpec, DatasetSpec, read_rgb
from .common import DatasetWriter, find_files
from .glas import read_instance_map

DEFAULT_MPP = 0.55
SPLITS = {"train": 1, "valid": 2}


def import_crag(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the CRAG folder ``src`` into the common layout at ``dst``."""
    src = Path(src)
    image_dirs = sorted(d for d in [src, *src.rglob("*")] if d.is_dir() and d.name.lower() == "images"
                        and d.parent.name.lower() in SPLITS)
    jobs = []
    for image_dir in image_dirs:
        part = image_dir.parent.name.lower()
        anno_dirs = [d for d in image_dir.parent.iterdir() if d.is_dir() and d.name.lower() in ("annotation",
                                                                                                "annotations")]
        for path in find_files(image_dir, (".png",)):
            anno = anno_dirs[0] / path.name if anno_dirs else image_dir.parent / "Annotation" / path.name
            if not anno.is_file():
                raise CerberusError(f"{path}: its annotation {anno} was not found")
            jobs.append((f"{part}_{path.stem}", path, anno, SPLITS[part]))
    if not jobs:
        raise CerberusError(f"{src}: no CRAG images found (train/Images/*.png, valid/Images/*.png)")

    writer = DatasetWriter(dst, "crag", mpp=mpp if mpp is not None else DEFAULT_MPP,
                           annotations=(AnnotationSpec("gland", ("inst", "type"), dir="labels/gland"),),
                           num_splits=2, description="CRAG gland segmentation; splits: 1 train, 2 valid")
    for name, path, anno, split in tqdm(jobs, desc="import crag", unit="image", disable=None if progress else True):
        image = read_rgb(path)
        inst = read_instance_map(anno, image.shape[:2])
        ids = np.unique(inst)
        ids = ids[ids > 0]
        writer.add(name, image, {"gland": Annotation(inst, ids, np.ones_like(ids))}, split=split)
    return writer.finish()
