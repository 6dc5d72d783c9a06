"""What every importer shares: a writer of the common layout, and label checks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ...errors import CerberusError
from ...io.files import write_png
from ..dataset import (
    Annotation,
    AnnotationSpec,
    DatasetSpec,
    atomic_write_bytes,
    write_label,
    write_rgb,
    write_splits,
)

REGION_DIR = "regions"


class DatasetWriter:
    """Write samples into the common layout; ``finish()`` writes classes.csv, mpps.csv (when some image has
    its own resolution), splits.csv and, last, dataset.yaml, so an interrupted import never leaves a
    complete-looking dataset. Images labelled only in part carry their labelled region (``regions/NAME.png``,
    255 inside; ``finish()`` then sets ``region_dir``).

    Example:
        >>> w = DatasetWriter(dst, "glas", mpp=0.62, annotations=(AnnotationSpec("gland", ("inst", "type"),
        ...                   dir="labels/gland"),))
        >>> w.add("train_1", image, {"gland": Annotation(inst, ids, classes)}, split=1)
        >>> spec = w.finish()
    """

    def __init__(self, dst: Path, name: str, mpp: float, annotations: tuple[AnnotationSpec, ...],
                 num_splits: int = 3, description: str = ""):
        dst = Path(dst)
        if dst.exists() and not dst.is_dir():
            raise CerberusError(f"{dst} exists and is not a folder; choose another output folder")
        (dst / "dataset.yaml").unlink(missing_ok=True)  # the dataset is incomplete until finish()
        self.spec = DatasetSpec(name=name, root=dst, mpp=mpp, annotations=annotations, num_splits=num_splits,
                                description=description)
        self.splits: dict[str, int] = {}
        self.classes: dict[str, str] = {}
        self.mpps: dict[str, float] = {}
        self.regions = 0

    def add(self, name: str, image: np.ndarray, annotations: dict[str, Annotation] | None = None,
            split: int = 1, image_class: str | None = None, mpp: float | None = None,
            region: np.ndarray | None = None) -> None:
        """One image with its labels (validated against the annotation specs) and its split; ``mpp`` when
        this image's resolution differs from the dataset's; ``region`` (bool H x W) when only its pixels are
        labelled (None: the whole image)."""
        if name in self.splits:
            raise CerberusError(f"two source images give the same name {name!r}; rename one of them")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise CerberusError(f"image {name!r}: expected uint8 RGB (H x W x 3), got {image.dtype} {image.shape}")
        for task, ann in (annotations or {}).items():
            spec = self.spec.annotation(task)
            check_annotation(ann, spec, image.shape[:2], f"{name} ({task})")
            write_label(self.spec.label_path(name, task), ann)
        if region is not None:
            region = np.asarray(region)
            if region.shape != image.shape[:2]:
                raise CerberusError(f"image {name!r}: labelled region shape {region.shape} differs from its image "
                                    f"{image.shape[:2]}")
            write_png(self.spec.root / REGION_DIR / f"{name}.png", np.where(region, 255, 0).astype(np.uint8))
            self.regions += 1
        else:  # a region left by an earlier import into this folder would mark the image as partly labelled
            (self.spec.root / REGION_DIR / f"{name}.png").unlink(missing_ok=True)
        if image_class is not None:
            self.classes[name] = image_class
        if mpp is not None and not math.isclose(float(mpp), float(self.spec.mpp), rel_tol=1e-9):
            self.mpps[name] = float(mpp)
        write_rgb(self.spec.image_path(name), image)
        self.splits[name] = int(split)

    def finish(self) -> DatasetSpec:
        if not self.splits:
            raise CerberusError(f"no images were found to import into {self.spec.root}")
        if self.classes:
            rows = ["Filename,Class"] + [f"{n},{c}" for n, c in sorted(self.classes.items())]
            atomic_write_bytes(self.spec.root / "classes.csv", ("\n".join(rows) + "\n").encode())
        if self.mpps:
            rows = ["Filename,Mpp"] + [f"{n},{m:.6g}" for n, m in sorted(self.mpps.items())]
            atomic_write_bytes(self.spec.root / "mpps.csv", ("\n".join(rows) + "\n").encode())
            self.spec = dataclasses.replace(self.spec, mpp_csv="mpps.csv")
        if self.regions:
            self.spec = dataclasses.replace(self.spec, region_dir=REGION_DIR)
        write_splits(self.spec.root / self.spec.split_csv, self.splits)
        self.spec.save()
        return self.spec


def check_annotation(ann: Annotation, spec: AnnotationSpec, shape: tuple[int, int], where: str) -> None:
    """Shape and class checks with an error naming the sample (same rules as reading)."""
    for label, arr in (("inst_map", ann.inst_map), ("class_map", ann.class_map)):
        if arr is not None and np.asarray(arr).shape != tuple(shape):
            raise CerberusError(f"{where}: {label} shape {np.asarray(arr).shape} differs from its image {tuple(shape)}")
    n = spec.num_classes
    for label, arr in (("class", ann.classes), ("class_map", ann.class_map)):
        if arr is not None and np.size(arr) and n is not None and (np.min(arr) < 0 or np.max(arr) >= n):
            raise CerberusError(f"{where}: {label} holds ids outside 0..{n - 1} ({', '.join(spec.class_names)})")
    if ann.ids is not None and ann.classes is not None and np.size(ann.ids) != np.size(ann.classes):
        raise CerberusError(f"{where}: {np.size(ann.ids)} instance ids but {np.size(ann.classes)} classes")


def majority_class(inst: np.ndarray, class_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, classes)``: each instance's most frequent non-zero class in ``class_map`` (0 if none)."""
    inst = np.asarray(inst)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if ids.size == 0:
        return ids.astype(np.int32), ids.astype(np.int32)
    fg = inst > 0
    n_cls = int(class_map.max(initial=0)) + 1
    counts = np.zeros((int(ids.max()) + 1, n_cls), np.int64)
    np.add.at(counts, (inst[fg], class_map[fg].astype(np.int64)), 1)
    counts[:, 0] = 0
    classes = counts[ids].argmax(1)
    classes[counts[ids].max(1) == 0] = 0
    return ids.astype(np.int32), classes.astype(np.int32)


def find_files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` (recursively) with one of ``exts`` (case-insensitive), sorted."""
    exts = tuple(e.lower() for e in exts)
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in exts)


__all__ = ["Annotation", "AnnotationSpec", "DatasetWriter", "check_annotation", "find_files", "majority_class"]
