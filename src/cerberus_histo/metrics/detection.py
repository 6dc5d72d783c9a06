"""Nucleus detection and classification from centroids: pairing, detection F1 and per-class F1.

The definitions follow HoVer-Net's published evaluation code (vqdang/hover_net, ``pair_coordinates`` in
``metrics/stats_utils.py`` and ``run_nuclei_type_stat`` in ``compute_stats.py``); the code here is written
from them, not copied.

Pairing: a Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on the full matrix of Euclidean
distances between true and predicted centroids minimises the summed distance; assigned pairs farther apart
than the radius are then dropped (so the assignment is not restricted to the radius beforehand).

Statistics are pooled over images as in HoVer-Net: pair within each image, then count over the whole set.
:func:`detection_f1` does this for one image, :class:`DetectionAccumulator` for many.

Radius: HoVer-Net hard-codes 12 pixels at the resolution of its data (CoNSeP, 40x, about 0.25 µm/px, so
about 3 µm). Here the radius is given in µm with the resolution ``mpp`` (µm per pixel); the default 3 µm is
HoVer-Net's physical radius (6 px at the 0.5 µm/px Cerberus works at). ``radius_px`` overrides both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

__all__ = ["DetectionResult", "DetectionAccumulator", "pair_centroids", "detection_f1"]

# HoVer-Net compute_stats.py weights for the per-class F1: (FP_c, FN_c) among paired, (FP_d, FN_d) unpaired
_W = (2, 2, 1, 1)


def _as_points(xy, name: str) -> np.ndarray:
    a = np.asarray(xy, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2), np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be an (N, D) array of coordinates, got shape {a.shape}")
    return a


def pair_centroids(true_xy, pred_xy, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique pairing of true and predicted points (HoVer-Net ``pair_coordinates``).

    Hungarian assignment on the full Euclidean distance matrix (rows = true points), then assigned pairs with
    distance > ``radius`` are dropped (distance == radius is kept, as HoVer-Net's ``<= radius``).

    Returns ``(pairs, unpaired_true, unpaired_pred)``: ``pairs`` an (K, 2) int array of (true index, pred
    index), the other two int arrays of indices. Empty inputs give empty outputs (HoVer-Net instead inserts a
    dummy point at the origin for an empty image; that hack is not reproduced).
    """
    a = _as_points(true_xy, "true_xy")
    b = _as_points(pred_xy, "pred_xy")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64), np.arange(len(a), dtype=np.int64), np.arange(len(b), dtype=np.int64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"true_xy and pred_xy have different dimensions: {a.shape[1]} and {b.shape[1]}")
    dist = cdist(a, b)
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    un_t = np.setdiff1d(np.arange(len(a)), pairs[:, 0]).astype(np.int64)
    un_p = np.setdiff1d(np.arange(len(b)), pairs[:, 1]).astype(np.int64)
    return pairs, un_t, un_p


@dataclass(frozen=True)
class DetectionResult:
    """Detection and classification scores (HoVer-Net ``run_nuclei_type_stat``).

    ``f1`` = 2 TP / (2 TP + FP + FN) over the pairing (``precision``, ``recall`` likewise); ``type_accuracy``
    the fraction of paired nuclei whose predicted class equals the true class; ``f1_per_class[c]`` the
    weighted per-class F1 (see :func:`detection_f1`). NaN marks an undefined value (0/0).
    """

    tp: int
    fp: int
    fn: int
    f1: float
    precision: float
    recall: float
    type_accuracy: float
    f1_per_class: dict[int, float]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def _class_f1(pt: np.ndarray, pp: np.ndarray, ut: np.ndarray, up: np.ndarray, c: int) -> float:
    """HoVer-Net's ``_f1_type``: restrict the paired nuclei to those with true or predicted class c, then

        F1_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d + FN_d)

    with TP_c, FP_c, FN_c, TN_c counted over that subset (so TN_c is always 0, exactly as in HoVer-Net),
    FP_d the unpaired predictions of class c and FN_d the unpaired true nuclei of class c.
    """
    s = (pt == c) | (pp == c)
    t, p = pt[s], pp[s]
    tp = int(((t == c) & (p == c)).sum())
    tn = int(((t != c) & (p != c)).sum())
    fp = int(((t != c) & (p == c)).sum())
    fn = int(((t == c) & (p != c)).sum())
    fp_d = int((up == c).sum())
    fn_d = int((ut == c).sum())
    num = 2 * (tp + tn)
    return _ratio(num, num + _W[0] * fp + _W[1] * fn + _W[2] * fp_d + _W[3] * fn_d)


def _radius_px(radius_um: float, mpp: float, radius_px: float | None) -> float:
    if radius_px is not None:
        return float(radius_px)
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    return float(radius_um) / float(mpp)


@dataclass
class DetectionAccumulator:
    """Pools detection/classification statistics over images, as HoVer-Net's ``run_nuclei_type_stat``.

    Each :meth:`update` pairs the centroids of one image within ``radius`` = ``radius_px`` if given, else
    ``radius_um / mpp`` pixels; :meth:`result` computes the scores from all paired and unpaired nuclei
    together. Types are optional (pass None for both to score detection only).
    """

    radius_um: float = 3.0
    mpp: float = 0.5
    radius_px: float | None = None
    radius: float = field(init=False)  # the pairing radius in pixels
    _pt: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _pp: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _ut: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _up: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _typed: bool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.radius = _radius_px(self.radius_um, self.mpp, self.radius_px)

    def update(self, true_xy, true_types, pred_xy, pred_types) -> None:
        """Pair one image's centroids and keep the classes of the paired and unpaired nuclei."""
        if (true_types is None) != (pred_types is None):
            raise ValueError("give classes for both truth and prediction, or for neither")
        typed = true_types is not None
        if self._typed is not None and typed != self._typed:
            raise ValueError("some images were added with classes and some without")
        self._typed = typed
        a = _as_points(true_xy, "true_xy")
        b = _as_points(pred_xy, "pred_xy")
        tt = _types(true_types, len(a), "true_types")
        ptypes = _types(pred_types, len(b), "pred_types")
        pairs, un_t, un_p = pair_centroids(a, b, self.radius)
        self._pt.append(tt[pairs[:, 0]])
        self._pp.append(ptypes[pairs[:, 1]])
        self._ut.append(tt[un_t])
        self._up.append(ptypes[un_p])

    def result(self, classes=None) -> DetectionResult:
        """Scores over everything added. ``classes`` defaults to the classes present in the truth (as HoVer-Net).

        Detection-only use (types None) gives NaN ``type_accuracy`` and an empty ``f1_per_class``.
        """
        pt, pp, ut, up = (_cat(x) for x in (self._pt, self._pp, self._ut, self._up))
        tp, fp, fn = len(pt), len(up), len(ut)
        typed = bool(self._typed)
        if classes is None:
            classes = np.unique(np.concatenate([pt, ut])).tolist() if typed else []
        per_class = {int(c): _class_f1(pt, pp, ut, up, int(c)) for c in classes}
        return DetectionResult(
            tp=tp, fp=fp, fn=fn,
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            precision=_ratio(tp, tp + fp),
            recall=_ratio(tp, tp + fn),
            type_accuracy=_ratio(int((pt == pp).sum()), tp) if typed else float("nan"),
            f1_per_class=per_class,
        )


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _types(types, n: int, name: str) -> np.ndarray:
    if types is None:
        return np.full(n, -1, np.int64)
    a = np.asarray(types).reshape(-1)
    if a.size != n:
        raise ValueError(f"{name} has {a.size} entries for {n} points")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer classes, got dtype {a.dtype}")
    return a.astype(np.int64)


def detection_f1(true_xy, true_types, pred_xy, pred_types, *, radius_um: float = 3.0, mpp: float = 0.5,
                 radius_px: float | None = None, classes=None) -> DetectionResult:
    """Detection F1 and HoVer-Net's per-class F1 for one image.

    ``true_xy``/``pred_xy`` are (N, 2) centroids in pixels, ``true_types``/``pred_types`` their integer classes
    (or None for detection only). Points are paired with :func:`pair_centroids` within ``radius_um / mpp``
    pixels (``radius_px`` overrides). Then, with TP = pairs, FP = unpaired predictions, FN = unpaired truth:

    * ``f1`` = 2 TP / (2 TP + FP + FN) (symmetric in truth and prediction);
    * ``type_accuracy`` = paired nuclei with equal classes / TP;
    * ``f1_per_class[c]`` = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d + FN_d) exactly as in
      HoVer-Net's ``compute_stats.py`` (weights w = [2, 2, 1, 1]): TP_c, TN_c, FP_c, FN_c are counted over the
      paired nuclei whose true or predicted class is c (in that subset TN_c is always 0, as in HoVer-Net),
      FP_d / FN_d are the unpaired predicted / true nuclei of class c. ``classes`` defaults to the classes
      present in the truth (HoVer-Net's default).

    Edge cases: no points at all gives NaN for f1, precision, recall and type accuracy (HoVer-Net would pair
    its two dummy origin points and count one TP); points on one side only give f1 = 0; a requested class
    with no nucleus on either side gives NaN.
    """
    acc = DetectionAccumulator(radius_um=radius_um, mpp=mpp, radius_px=radius_px)
    acc.update(true_xy, true_types, pred_xy, pred_types)
    return acc.result(classes)
