"""Bringing images and their labels to another resolution (microns per pixel) before they meet a model.

Images are resampled with :func:`cerberus_histo.io.readers.resize` (area averaging when they shrink, bilinear
when they grow); instance and class maps by nearest neighbour, so ids and classes are kept as they are. Instances that vanish at the new
resolution are dropped from the ids and classes of the annotation (no orphans). Pure NumPy and OpenCV.
"""

from __future__ import annotations

import math

import numpy as np

from .dataset import Annotation

#: datasets further than this factor from the model's resolution get a warning (details are lost or invented)
FAR_FACTOR = 2.0


def same_mpp(a: float, b: float) -> bool:
    """Two resolutions equal within 1e-3 relative (0.5 and 0.5004 are one resolution)."""
    return math.isclose(float(a), float(b), rel_tol=1e-3)


def scaled_shape(shape: tuple[int, int], mpp: float, to_mpp: float) -> tuple[int, int]:
    """``(H, W)`` of an image of ``shape`` at ``mpp`` once brought to ``to_mpp`` (at least 1 px)."""
    if same_mpp(mpp, to_mpp):
        return int(shape[0]), int(shape[1])
    f = float(mpp) / float(to_mpp)
    return max(1, round(shape[0] * f)), max(1, round(shape[1] * f))


def resample_map(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label map (any integer or boolean dtype) at ``shape`` by nearest neighbour (pixel centres)."""
    h, w = label.shape[:2]
    if (h, w) == tuple(shape):
        return label
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def resample_annotation(ann: Annotation, shape: tuple[int, int]) -> Annotation:
    """An annotation's maps at ``shape``; instances that no longer cover a pixel leave ``ids`` and ``classes``."""
    inst, ids, classes, class_map = ann.inst_map, ann.ids, ann.classes, ann.class_map
    if inst is not None:
        inst = resample_map(inst, shape)
        if ids is not None:
            keep = np.isin(ids, np.unique(inst))
            ids = np.asarray(ids)[keep]
            classes = None if classes is None else np.asarray(classes)[keep]
    if class_map is not None:
        class_map = resample_map(class_map, shape)
    return Annotation(inst_map=inst, ids=ids, classes=classes, class_map=class_map, label=ann.label)


def far_message(what: str, mpp: float, to_mpp: float) -> str | None:
    """A warning when ``mpp`` is more than :data:`FAR_FACTOR` times away from ``to_mpp``, else ``None``."""
    ratio = max(mpp, to_mpp) / min(mpp, to_mpp)
    if ratio <= FAR_FACTOR:
        return None
    return (f"{what} is at {mpp:g} um/px, {ratio:.2f}x from the model's {to_mpp:g} um/px: "
            f"{'detail is lost' if mpp < to_mpp else 'pixels are invented'} in resampling; "
            "is the resolution right, or should the model work at another mpp (params model.mpp)?")
