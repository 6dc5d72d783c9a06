"""Evaluation metrics (pure NumPy + SciPy; importing this package does not import torch).

* :mod:`.instance`: nuclei instance segmentation (HoVer-Net definitions): :func:`dice`, :func:`dice2`,
  :func:`aji`, :func:`aji_plus`, :func:`pq`, per-image :func:`multiclass_pq` and the CoNIC :class:`MPQPlus`.
* :mod:`.detection`: centroid pairing and HoVer-Net's detection / per-class F1.
* :mod:`.glas`: the GlaS challenge's object F1, object Dice and object Hausdorff for glands.
* :mod:`.classification`: accuracy, balanced accuracy, macro F1 and confusion matrix.

Label maps are integer arrays with 0 = background; results do not depend on how instances are numbered.
"""

from __future__ import annotations

from .classification import ClassificationResult, classification_metrics
from .detection import DetectionAccumulator, DetectionResult, detection_f1, pair_centroids
from .glas import GlaSAccumulator, GlaSStats, glas_metrics, object_dice, object_f1, object_hausdorff
from .instance import (
    MPQPlus,
    MultiClassPQ,
    PQResult,
    aji,
    aji_plus,
    dice,
    dice2,
    instance_types,
    multiclass_pq,
    pq,
)

__all__ = [
    "ClassificationResult",
    "DetectionAccumulator",
    "DetectionResult",
    "GlaSAccumulator",
    "GlaSStats",
    "MPQPlus",
    "MultiClassPQ",
    "PQResult",
    "aji",
    "aji_plus",
    "classification_metrics",
    "detection_f1",
    "dice",
    "dice2",
    "glas_metrics",
    "instance_types",
    "multiclass_pq",
    "object_dice",
    "object_f1",
    "object_hausdorff",
    "pair_centroids",
    "pq",
]
