"""Instance segmentation metrics for nuclei: pixel Dice, DICE2, AJI, AJI+, PQ (DQ, SQ), mPQ and CoNIC mPQ+.

The definitions follow HoVer-Net's published evaluation code (``metrics/stats_utils.py`` of vqdang/hover_net:
``get_dice_1``, ``get_fast_dice_2``, ``get_fast_aji``, ``get_fast_aji_plus``, ``get_fast_pq``), the CoNIC
challenge code (TissueImageAnalytics/CoNIC ``compute_stats.py``, ``metrics/stats_utils.py``) for mPQ+, and
the PanNuke evaluation (TissueImageAnalytics/PanNuke-metrics ``run.py``) for the per-image mPQ. The code
here is written from those definitions, not copied.

Inputs are label maps: integer (or boolean) arrays of equal shape, 0 = background, every other value one
instance. Instance ids need not be contiguous or ordered; results are invariant to renumbering (maps are
relabelled internally; the one exception is which of several equally good Hungarian assignments is taken,
for AJI+ and for PQ below 0.5, where HoVer-Net depends on the numbering too). Overlaps between all true and predicted instances come from one joint histogram
of the paired labels, so the cost is one pass over the pixels plus work per overlapping pair, and thousands
of instances stay fast.

Undefined values (0/0, e.g. both maps empty) are NaN here, so that a per-image average with ``np.nanmean``
skips them; each docstring says which case gives NaN and what the reference code does there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "PQResult",
    "MultiClassPQ",
    "MPQPlus",
    "dice",
    "dice2",
    "aji",
    "aji_plus",
    "pq",
    "multiclass_pq",
    "instance_types",
]

# HoVer-Net's AJI/AJI+ rank candidate pairs by inter / (union + 1e-6); kept so that exact ties resolve as there.
_AJI_EPS = 1.0e-6

TypeSource = np.ndarray | Mapping[int, int]


# ----------------------------------------------------------------------------------------------- helpers
def _as_label_map(label, name: str) -> np.ndarray:
    a = np.asarray(label)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map (0 = background), got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} has negative labels; 0 is background and instances are positive")
    return a


def _compact(label, name: str = "label map") -> tuple[np.ndarray, np.ndarray, int]:
    """Relabel to 0..n with the order of the ids kept.

    Returns ``(compact, ids, n)``: ``compact`` is an int64 map with values 0..n, ``ids[k - 1]`` the original id
    of compact instance k.
    """
    a = _as_label_map(label, name)
    flat = a.ravel()
    if flat.size == 0:
        return np.zeros(a.shape, np.int64), np.zeros(0, np.int64), 0
    top = int(flat.max())
    if top <= 4 * flat.size + 1024:  # O(N) lookup table
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[a], ids.astype(np.int64), int(ids.size)
    uniq, inv = np.unique(flat, return_inverse=True)
    inv = inv.astype(np.int64)
    if uniq[0] == 0:
        ids = uniq[1:]
    else:
        ids = uniq
        inv += 1
    return inv.reshape(a.shape), ids.astype(np.int64), int(ids.size)


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str = "true and pred") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what} must have the same shape, got {a.shape} and {b.shape}")


@dataclass(frozen=True)
class _Overlap:
    """Pairwise overlaps of two compact label maps (sparse: only pairs that share pixels)."""

    n_true: int
    n_pred: int
    area_true: np.ndarray  # (n_true + 1,), index 0 = background
    area_pred: np.ndarray  # (n_pred + 1,)
    ti: np.ndarray  # compact true index of each overlapping pair (1-based)
    pj: np.ndarray  # compact pred index (1-based)
    inter: np.ndarray  # intersection area (> 0)

    @property
    def union(self) -> np.ndarray:
        return self.area_true[self.ti] + self.area_pred[self.pj] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _overlap(true, pred) -> _Overlap:
    t, _, nt = _compact(true, "true")
    p, _, npred = _compact(pred, "pred")
    _check_same_shape(t, p)
    return _overlap_compact(t, nt, p, npred)


def _overlap_compact(t: np.ndarray, nt: int, p: np.ndarray, npred: int) -> _Overlap:
    tf, pf = t.ravel(), p.ravel()
    area_t = np.bincount(tf, minlength=nt + 1).astype(np.int64)
    area_p = np.bincount(pf, minlength=npred + 1).astype(np.int64)
    both = (tf > 0) & (pf > 0)
    key = tf[both] * (npred + 1) + pf[both]
    if key.size == 0:
        e = np.zeros(0, np.int64)
        return _Overlap(nt, npred, area_t, area_p, e, e, e)
    if (nt + 1) * (npred + 1) <= max(1 << 22, 4 * key.size):  # joint histogram
        counts = np.bincount(key, minlength=(nt + 1) * (npred + 1))
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:  # sparse joint histogram
        keys, counts = np.unique(key, return_counts=True)
    return _Overlap(nt, npred, area_t, area_p, keys // (npred + 1), keys % (npred + 1), counts.astype(np.int64))


def _nan_ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den != 0 else float("nan")


def _max_weight_matching(ti: np.ndarray, pj: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Hungarian assignment maximising the summed weight over a sparse list of candidate pairs.

    Returns indices into the pair list of the assigned pairs (pairs absent from the list are never
    assigned). Equivalent to ``linear_sum_assignment(-W)`` on the dense true x pred matrix (HoVer-Net), but
    solved separately on each connected component of the overlap graph, which reaches the same optimum
    without a dense matrix of all instances. Only ties between equally good assignments can resolve
    differently.
    """
    if ti.size == 0:
        return np.zeros(0, np.int64)
    rows, tl = np.unique(ti, return_inverse=True)
    _, pl = np.unique(pj, return_inverse=True)
    nr = rows.size
    nn = nr + int(pl.max()) + 1
    graph = coo_matrix((np.ones(ti.size), (tl, nr + pl)), shape=(nn, nn))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[tl]
    sizes = np.bincount(pair_comp)
    chosen = [np.flatnonzero(sizes[pair_comp] == 1)]  # a lone pair is its own assignment
    multi = np.flatnonzero(sizes[pair_comp] > 1)
    if multi.size:
        multi = multi[np.argsort(pair_comp[multi], kind="stable")]
        cuts = np.flatnonzero(np.diff(pair_comp[multi])) + 1
        for idx in np.split(multi, cuts):
            ru, rl = np.unique(tl[idx], return_inverse=True)
            cu, cl = np.unique(pl[idx], return_inverse=True)
            cost = np.zeros((ru.size, cu.size))
            cost[rl, cl] = -weight[idx]
            lookup = np.full((ru.size, cu.size), -1, np.int64)
            lookup[rl, cl] = idx
            r, c = linear_sum_assignment(cost)
            sel = lookup[r, c]
            chosen.append(sel[sel >= 0])
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------------- Dice
def dice(true, pred) -> float:
    """Pixel Dice of the binarised maps (HoVer-Net ``get_dice_1``): ``2 |T ∩ P| / (|T| + |P|)``.

    ``T = true > 0``, ``P = pred > 0``. Symmetric.

    Edge cases: empty truth or empty prediction (the other not empty) gives 0.0; both empty gives NaN (0/0;
    HoVer-Net's NumPy division gives NaN too).
    """
    t = _as_label_map(true, "true") > 0
    p = _as_label_map(pred, "pred") > 0
    _check_same_shape(t, p)
    return _nan_ratio(2 * np.count_nonzero(t & p), np.count_nonzero(t) + np.count_nonzero(p))


def dice2(true, pred) -> float:
    """Ensemble Dice, DICE2 (HoVer-Net ``get_dice_2`` / ``get_fast_dice_2``).

    For every pair of a true and a predicted instance that overlap, add ``2 |T_i ∩ P_j|`` to a numerator and
    ``|T_i| + |P_j|`` to a denominator; DICE2 is the ratio of the two sums. An instance overlapping several
    others is counted once per pair. Symmetric.

    Edge cases: no overlapping pair while at least one map has instances (including empty truth or empty
    prediction) gives 0.0 (HoVer-Net divides by zero and raises there); both empty gives NaN.
    """
    ov = _overlap(true, pred)
    if ov.ti.size == 0:
        return float("nan") if ov.n_true == 0 and ov.n_pred == 0 else 0.0
    num = 2 * ov.inter.sum()
    den = (ov.area_true[ov.ti] + ov.area_pred[ov.pj]).sum()
    return float(num) / float(den)


# -------------------------------------------------------------------------------------------------- AJI
def _aji_total(ov: _Overlap, pt: np.ndarray, pp: np.ndarray, inter: np.ndarray, union: np.ndarray) -> float:
    """Overall intersection / overall union, adding the areas of the unpaired instances to the union."""
    if ov.n_true == 0 and ov.n_pred == 0:
        return float("nan")
    paired_t = np.zeros(ov.n_true + 1, bool)
    paired_t[pt] = True
    paired_p = np.zeros(ov.n_pred + 1, bool)
    paired_p[pp] = True
    total_union = float(union.sum())
    total_union += float(ov.area_true[1:][~paired_t[1:]].sum()) + float(ov.area_pred[1:][~paired_p[1:]].sum())
    return float(inter.sum()) / total_union


def aji(true, pred) -> float:
    """Aggregated Jaccard Index as in HoVer-Net's ``get_fast_aji`` (the MoNuSeg version).

    Every true instance that overlaps a prediction is paired with the predicted instance of highest IoU among
    those it overlaps (ranked, as in HoVer-Net, by ``inter / (union + 1e-6)``, which breaks exact IoU ties in
    favour of the larger union; remaining ties have equal intersection and union and so give the same
    value). A prediction may be chosen by several true instances ("duplicates allowed"), and then its
    intersection and union are added once per pairing. Then

        AJI = sum of paired |T ∩ P| / (sum of paired |T ∪ P| + areas of unpaired true + unpaired pred)

    where an unpaired prediction is one chosen by no true instance. Not symmetric in general.

    Edge cases: empty truth or empty prediction (the other not empty) gives 0.0; both empty gives NaN
    (HoVer-Net: 0/0, NaN).
    """
    ov = _overlap(true, pred)
    if ov.ti.size == 0:
        return _aji_total(ov, ov.ti, ov.pj, ov.inter, ov.inter)
    union = ov.union
    score = ov.inter / (union + _AJI_EPS)
    # per true instance: highest score, ties -> lowest pred index (np.argmax on HoVer-Net's dense row)
    order = np.lexsort((ov.pj, -score, ov.ti))
    ti = ov.ti[order]
    first = np.ones(ti.size, bool)
    first[1:] = ti[1:] != ti[:-1]
    sel = order[first]
    return _aji_total(ov, ov.ti[sel], ov.pj[sel], ov.inter[sel], union[sel])


def aji_plus(true, pred) -> float:
    """AJI+ as in HoVer-Net's ``get_fast_aji_plus``: AJI with a unique one-to-one pairing.

    The pairing maximises the summed IoU (``inter / (union + 1e-6)`` as in HoVer-Net) by the Hungarian
    method (``scipy.optimize.linear_sum_assignment`` on the negative IoU matrix), keeping only assigned pairs
    that overlap. Then ``sum of paired |T ∩ P| / (sum of paired |T ∪ P| + areas of all unpaired true and
    pred instances)``. The assignment is solved per connected group of overlapping instances (instances
    without overlap can only be assigned at IoU 0, which HoVer-Net drops too); this reaches the same optimum
    as HoVer-Net's one dense matrix, and only when several assignments tie for the best summed IoU may the
    chosen one differ.

    Edge cases: empty truth or empty prediction (the other not empty) gives 0.0; both empty gives NaN
    (HoVer-Net: 0/0, NaN).
    """
    ov = _overlap(true, pred)
    if ov.ti.size == 0:
        return _aji_total(ov, ov.ti, ov.pj, ov.inter, ov.inter)
    union = ov.union
    sel = _max_weight_matching(ov.ti, ov.pj, ov.inter / (union + _AJI_EPS))
    return _aji_total(ov, ov.ti[sel], ov.pj[sel], ov.inter[sel], union[sel])


# --------------------------------------------------------------------------------------------------- PQ
@dataclass(frozen=True)
class PQResult:
    """Panoptic-quality counts and the scores derived from them.

    ``tp``, ``fp``, ``fn`` count matched pairs, unmatched predictions and unmatched true instances;
    ``iou_sum`` is the summed IoU of the matched pairs. ``dq = tp / (tp + fp/2 + fn/2)`` (the F1 of the
    matching), ``sq = iou_sum / tp`` (mean IoU of the matches), ``pq = dq * sq``.

    Results add (``a + b``) by summing the counts, which is how CoNIC pools over images.

    Edge cases: with no instance at all (``tp = fp = fn = 0``) all three scores are NaN (HoVer-Net's
    ``get_fast_pq`` divides by zero there; CoNIC's ``get_pq`` returns 0 through a 1e-6 guard). With
    ``tp = 0`` and something unmatched, ``dq = sq = pq = 0`` (as in both references). HoVer-Net/CoNIC add
    1e-6 to the denominators; the exact ratios here differ from theirs by less than 1e-6 relative.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    @property
    def empty(self) -> bool:
        """No true and no predicted instance."""
        return self.tp + self.fp + self.fn == 0

    @property
    def dq(self) -> float:
        if self.empty:
            return float("nan")
        return self.tp / (self.tp + 0.5 * self.fp + 0.5 * self.fn)

    @property
    def sq(self) -> float:
        if self.empty:
            return float("nan")
        return self.iou_sum / self.tp if self.tp else 0.0

    @property
    def pq(self) -> float:
        return self.dq * self.sq

    def __add__(self, other: PQResult) -> PQResult:
        if not isinstance(other, PQResult):
            return NotImplemented
        return PQResult(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    def as_dict(self) -> dict[str, float]:
        return {"dq": self.dq, "sq": self.sq, "pq": self.pq, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "iou_sum": self.iou_sum}


def _check_match_iou(match_iou: float) -> None:
    if not 0.0 <= match_iou < 1.0:
        raise ValueError(f"match_iou must be in [0, 1), got {match_iou}")


def _matched_pairs(ti: np.ndarray, pj: np.ndarray, iou: np.ndarray, match_iou: float) -> np.ndarray:
    """Indices (into the pair list) of the matched pairs, as HoVer-Net's ``get_fast_pq``.

    ``match_iou >= 0.5``: every pair with IoU > match_iou (such pairs are necessarily one-to-one).
    Below 0.5: Hungarian assignment maximising the summed IoU, then the assigned pairs with IoU > match_iou.
    """
    if ti.size == 0:
        return np.zeros(0, np.int64)
    if match_iou >= 0.5:
        return np.flatnonzero(iou > match_iou)
    sel = _max_weight_matching(ti, pj, iou)
    return sel[iou[sel] > match_iou]


def _pq_from_overlap(ov: _Overlap, match_iou: float, true_sel: np.ndarray | None = None,
                     pred_sel: np.ndarray | None = None) -> PQResult:
    """PQ counts over a subset of instances (boolean masks over compact ids 0..n, index 0 ignored)."""
    ti, pj, iou = ov.ti, ov.pj, ov.iou
    if true_sel is None:
        n_t, n_p = ov.n_true, ov.n_pred
    else:
        assert pred_sel is not None
        keep = true_sel[ti] & pred_sel[pj]
        ti, pj, iou = ti[keep], pj[keep], iou[keep]
        n_t, n_p = int(true_sel[1:].sum()), int(pred_sel[1:].sum())
    sel = _matched_pairs(ti, pj, iou, match_iou)
    tp = int(sel.size)
    return PQResult(tp=tp, fp=n_p - tp, fn=n_t - tp, iou_sum=float(iou[sel].sum()))


def pq(true, pred, match_iou: float = 0.5) -> PQResult:
    """Panoptic quality of one image (HoVer-Net ``get_fast_pq``; CoNIC ``get_pq``).

    A true and a predicted instance match when their IoU exceeds ``match_iou`` (strictly). For
    ``match_iou >= 0.5`` such matches are unique, so every pair above the threshold is a match; below 0.5 the
    unique matching is the Hungarian assignment maximising the summed IoU, keeping assigned pairs above the
    threshold (as HoVer-Net). Returns a :class:`PQResult` with ``dq``, ``sq``, ``pq`` and the counts ``tp``,
    ``fp``, ``fn``, ``iou_sum`` needed for pooling. Symmetric (swapping truth and prediction swaps fp and fn).

    Edge cases: empty truth with predictions (or the reverse) gives dq = sq = pq = 0 (all fp, or all fn);
    both empty gives NaN for all three scores (HoVer-Net raises ZeroDivisionError, CoNIC returns 0 through its
    1e-6 guard; NaN lets a per-image mean skip the image with ``np.nanmean``, and the counts, all 0, still pool).
    """
    _check_match_iou(match_iou)
    return _pq_from_overlap(_overlap(true, pred), match_iou)


# -------------------------------------------------------------------------------------- instance types
def _types_for_compact(compact: np.ndarray, ids: np.ndarray, n: int, types: TypeSource, name: str) -> np.ndarray:
    """Class of each compact instance (index 0 = background, set to 0)."""
    out = np.zeros(n + 1, np.int64)
    if isinstance(types, Mapping):
        missing = [int(i) for i in ids if int(i) not in types]
        if missing:
            raise ValueError(f"{name}: no class given for instance ids {missing[:10]}")
        out[1:] = [int(types[int(i)]) for i in ids]
        if n and out[1:].min() < 0:
            raise ValueError(f"{name}: classes must be >= 0")
        return out
    tm = _as_label_map(types, name)
    _check_same_shape(compact, tm, f"instance map and {name}")
    if n == 0:
        return out
    k = int(tm.max()) + 1 if tm.size else 1
    counts = np.bincount(compact.ravel() * k + tm.ravel(), minlength=(n + 1) * k).reshape(n + 1, k)
    counts[:, 0] = 0  # type 0 only when the instance has no other type
    best = counts.argmax(axis=1)  # ties -> smallest class
    best[counts.max(axis=1) == 0] = 0
    out[:] = best
    out[0] = 0
    return out


def instance_types(inst, type_map) -> dict[int, int]:
    """Class of each instance of ``inst`` by majority vote of ``type_map`` over its pixels.

    Follows HoVer-Net's post-processing: the most frequent type among the instance's pixels, except that
    type 0 (background/unlabelled) is taken only when the instance has no pixel of another type; ties go
    to the smallest class id. Returns ``{instance id: class}`` with the original ids (empty dict for an
    empty map).
    """
    compact, ids, n = _compact(inst, "inst")
    classes = _types_for_compact(compact, ids, n, type_map, "type_map")
    return {int(i): int(c) for i, c in zip(ids, classes[1:], strict=True)}


# ------------------------------------------------------------------------------------------ multi-class
@dataclass(frozen=True)
class MultiClassPQ:
    """Per-class PQ of one image.

    ``per_class[c]`` holds the counts of class c (classes 1..num_classes); ``pq_per_class[c]`` the class's
    PQ, NaN for a class left out of the mean (see :func:`multiclass_pq`); ``mpq`` the mean of the non-NaN
    values (NaN when all are NaN); ``binary`` the class-agnostic PQ of the same image.
    """

    per_class: dict[int, PQResult]
    pq_per_class: dict[int, float]
    mpq: float
    binary: PQResult


def _prepare_typed(true_inst, true_type, pred_inst, pred_type, num_classes: int):
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t, tids, nt = _compact(true_inst, "true_inst")
    p, pids, npred = _compact(pred_inst, "pred_inst")
    _check_same_shape(t, p)
    tt = _types_for_compact(t, tids, nt, true_type, "true_type")
    pt = _types_for_compact(p, pids, npred, pred_type, "pred_type")
    for name, arr in (("true_type", tt), ("pred_type", pt)):
        if arr.size and arr.max() > num_classes:
            raise ValueError(f"{name} has class {int(arr.max())} but num_classes is {num_classes}")
    return _overlap_compact(t, nt, p, npred), tt, pt


def _per_class(ov: _Overlap, tt: np.ndarray, pt: np.ndarray, num_classes: int, match_iou: float):
    out = {}
    for c in range(1, num_classes + 1):
        ts, ps = tt == c, pt == c
        ts[0] = ps[0] = False
        out[c] = _pq_from_overlap(ov, match_iou, ts, ps)
    return out


def multiclass_pq(true_inst, true_type, pred_inst, pred_type, num_classes: int, *, match_iou: float = 0.5,
                  skip_absent: Literal["truth", "both"] = "truth") -> MultiClassPQ:
    """Per-class PQ and mPQ of one image.

    Each instance gets one class: from a per-pixel type map by majority vote (:func:`instance_types`), or
    from a ``{instance id: class}`` dict. Classes are 1..num_classes; instances of class 0 take part in no
    class (as CoNIC, which loops over classes 1..nr_classes); a class above num_classes raises ValueError. For each class c, PQ is computed between the true
    and predicted instances of class c with the matching of :func:`pq` (pairs with IoU > match_iou).
    CoNIC's code splits the maps pixel-wise (``inst * (type == c)``); for type maps that are constant within
    each instance (as CoNIC ground truth and HoVer-Net-style predictions) the two agree.

    ``mpq`` is the mean PQ over the classes kept. ``skip_absent="truth"`` (default) leaves out each class
    with no true instance in this image, even if it was predicted: the PanNuke per-image mPQ convention of
    TissueImageAnalytics/PanNuke-metrics ("if ground truth is empty for that class, skip from calculation",
    then ``np.nanmean``). ``skip_absent="both"`` leaves out only classes absent from both truth and prediction,
    so predicted-only classes count with PQ 0. Left-out classes have NaN in ``pq_per_class``; if every class
    is left out, ``mpq`` is NaN. For the dataset-level CoNIC mPQ+, use :class:`MPQPlus` instead.
    """
    _check_match_iou(match_iou)
    if skip_absent not in ("truth", "both"):
        raise ValueError(f"skip_absent must be 'truth' or 'both', got {skip_absent!r}")
    ov, tt, pt = _prepare_typed(true_inst, true_type, pred_inst, pred_type, num_classes)
    per_class = _per_class(ov, tt, pt, num_classes, match_iou)
    values = {}
    for c, r in per_class.items():
        absent = (r.tp + r.fn == 0) if skip_absent == "truth" else r.empty
        values[c] = float("nan") if absent else r.pq
    kept = [v for v in values.values() if not np.isnan(v)]
    mpq = float(np.mean(kept)) if kept else float("nan")
    return MultiClassPQ(per_class=per_class, pq_per_class=values, mpq=mpq, binary=_pq_from_overlap(ov, match_iou))


@dataclass
class MPQPlus:
    """Accumulator for the CoNIC challenge's multi-class PQ+ (mPQ+) and the pooled binary PQ.

    For every image and class, instances are matched as in :func:`pq` (IoU > match_iou, per image and class);
    TP, FP, FN and the summed IoU of each class are added up over all images; PQ of each class is computed
    from the pooled counts; mPQ+ is the mean over all classes 1..num_classes (CoNIC ``compute_stats.py``).

    Convention (CoNIC): a class with no instance in any image (TP = FP = FN = 0) has PQ+ 0 and counts in the
    mean, as CoNIC's 1e-6 guards give 0 there. ``bpq_plus`` is the class-agnostic PQ pooled the same way
    (NaN if no image had any instance). CoNIC's "pq" entry is instead the mean over images of the per-image
    binary PQ; ``image_pq`` keeps those values (NaN for images with no instance at all, where CoNIC gives 0).

    Usage::

        acc = MPQPlus(num_classes=6)
        for t_inst, t_type, p_inst, p_type in data:
            acc.update(t_inst, t_type, p_inst, p_type)
        acc.mpq_plus, acc.pq_plus_per_class
    """

    num_classes: int
    match_iou: float = 0.5
    per_class: dict[int, PQResult] = field(init=False)
    binary: PQResult = field(init=False)
    image_pq: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        _check_match_iou(self.match_iou)
        self.reset()

    def reset(self) -> None:
        self.per_class = {c: PQResult() for c in range(1, self.num_classes + 1)}
        self.binary = PQResult()
        self.image_pq = []

    def update(self, true_inst, true_type, pred_inst, pred_type) -> MultiClassPQ:
        """Add one image (types as per-pixel maps or ``{id: class}`` dicts); returns its per-image result."""
        result = multiclass_pq(true_inst, true_type, pred_inst, pred_type, self.num_classes,
                               match_iou=self.match_iou)
        for c, r in result.per_class.items():
            self.per_class[c] = self.per_class[c] + r
        self.binary = self.binary + result.binary
        self.image_pq.append(result.binary.pq)
        return result

    @property
    def n_images(self) -> int:
        return len(self.image_pq)

    @property
    def pq_plus_per_class(self) -> dict[int, float]:
        return {c: (0.0 if r.empty else r.pq) for c, r in self.per_class.items()}

    @property
    def mpq_plus(self) -> float:
        return float(np.mean(list(self.pq_plus_per_class.values())))

    @property
    def bpq_plus(self) -> float:
        return self.binary.pq
