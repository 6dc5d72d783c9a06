"""Gland segmentation metrics of the GlaS challenge (MICCAI 2015): object F1, object Dice, object Hausdorff.

Definitions from the challenge's Evaluation page (glas.grand-challenge.org/Evaluation, Sirinukunwattana et
al. 2017) and its MATLAB code (``F1score.m``, ``ObjectDice.m``, ``ObjectHausdorff.m`` of evaluation_v6,
K. Sirinukunwattana 2015); written from them, not copied.

Notation: S_j are the segmented (predicted) objects, G_i the ground-truth objects. The partner of an object
is the object of the other map that overlaps it most (MATLAB ``mode`` of the non-zero labels under it). On an
exact tie in overlap, MATLAB takes the smallest label, which depends on the numbering; here the tie goes to
the partner of smaller area (the higher Dice and overlap ratio), then to the first in label order.

Per image (as the MATLAB functions):

* object F1: S_j is a true positive if it has a partner G and ``|S_j ∩ G| / |G| > 0.5`` (strictly, as the
  code; the page says "at least 50%"); each G has at most one such S_j, so TP is one-to-one.
  FP = #S - TP, FN = #G - TP (the page's definition: a G without a segmented object covering more than half
  of it). F1 = 2 TP / (2 TP + FP + FN). One circulating copy of ``F1score.m`` instead counts as FN only the G
  that are nobody's partner; that variant is not used.
* object Dice: ``0.5 * sum_j w_j Dice(G(S_j), S_j) + 0.5 * sum_i w~_i Dice(G_i, S(G_i))`` with
  ``w_j = |S_j| / sum |S|``, ``w~_i = |G_i| / sum |G|`` and Dice 0 for an object without partner.
* object Hausdorff: the same weighting of the Hausdorff distance ``H(G, S)`` between pixel sets (Euclidean,
  in pixels); an object without overlapping partner is compared with the object of the other map at the
  smallest Hausdorff distance.

Over a data set, the page defines the weights over all objects of all images (its 𝒢 and 𝒮 are unions over
the images); :class:`GlaSAccumulator` pools that way (and pools TP, FP, FN for F1), and also keeps the
per-image values for a mean over images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .instance import _check_same_shape, _compact, _Overlap, _overlap_compact

__all__ = ["GlaSStats", "GlaSAccumulator", "glas_metrics", "object_f1", "object_dice", "object_hausdorff"]


@dataclass(frozen=True)
class GlaSStats:
    """Sums from which the GlaS scores follow; they add over images (``a + b``) for pooled scores.

    ``dice_pred_sum = sum_j |S_j| Dice(G(S_j), S_j)``, ``dice_true_sum = sum_i |G_i| Dice(G_i, S(G_i))``,
    and likewise ``hd_*_sum`` with the Hausdorff distance (NaN when not computed).

    Edge cases (as the MATLAB code): no object on either side gives F1 1, object Dice 1, object Hausdorff 0;
    objects on one side only give F1 0, object Dice 0 and object Hausdorff inf (MATLAB's ``Hausdorff`` is Inf
    against an empty set; ``ObjectHausdorff.m`` itself fails there). Pooled, an image with objects on one side
    only adds Dice 0 and Hausdorff inf for those objects.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    area_true: int = 0
    area_pred: int = 0
    dice_true_sum: float = 0.0
    dice_pred_sum: float = 0.0
    hd_true_sum: float = 0.0
    hd_pred_sum: float = 0.0

    @property
    def n_true(self) -> int:
        return self.tp + self.fn

    @property
    def n_pred(self) -> int:
        return self.tp + self.fp

    @property
    def f1(self) -> float:
        if self.n_true == 0 and self.n_pred == 0:
            return 1.0
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)

    @property
    def object_dice(self) -> float:
        if self.n_true == 0 and self.n_pred == 0:
            return 1.0
        if self.n_true == 0 or self.n_pred == 0:
            return 0.0
        return 0.5 * self.dice_pred_sum / self.area_pred + 0.5 * self.dice_true_sum / self.area_true

    @property
    def object_hausdorff(self) -> float:
        if self.n_true == 0 and self.n_pred == 0:
            return 0.0
        if self.n_true == 0 or self.n_pred == 0:
            return float("inf")
        return 0.5 * self.hd_pred_sum / self.area_pred + 0.5 * self.hd_true_sum / self.area_true

    def __add__(self, other: GlaSStats) -> GlaSStats:
        if not isinstance(other, GlaSStats):
            return NotImplemented
        return GlaSStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def _boundary(lab: np.ndarray) -> np.ndarray:
    """Pixels of an object with a neighbour (8-/full connectivity) of another label or outside the image."""
    pad = np.pad(lab, 1, constant_values=-1)
    core = tuple(slice(1, -1) for _ in range(lab.ndim))
    out = np.zeros(lab.shape, bool)
    for step in itertools.product((-1, 0, 1), repeat=lab.ndim):
        if any(step):
            shifted = tuple(slice(1 + s, pad.shape[d] - 1 + s) for d, s in enumerate(step))
            out |= pad[shifted] != pad[core]
    return out & (lab > 0)


class _Objects:
    """Pixel coordinates of each object of a compact label map, and its boundary for nearest-point queries.

    The nearest pixel of an object B to a point outside B is always a boundary pixel of B (a step from an
    interior pixel towards the point stays in B and gets closer), so distances to B use a k-d tree on its
    boundary only; points inside B are at distance 0.
    """

    def __init__(self, lab: np.ndarray, n: int):
        self.lab, self.n = lab, n
        flat = lab.ravel()
        order = np.argsort(flat, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=n + 1))])
        self.coords = np.stack(np.unravel_index(order, lab.shape), axis=1)
        self.bflag = _boundary(lab).ravel()[order]
        self._trees: dict[int, cKDTree] = {}

    def pixels(self, k: int) -> np.ndarray:
        return self.coords[self.starts[k]:self.starts[k + 1]]

    def tree(self, k: int) -> cKDTree:
        if k not in self._trees:
            s = slice(self.starts[k], self.starts[k + 1])
            self._trees[k] = cKDTree(self.coords[s][self.bflag[s]])
        return self._trees[k]

    def directed_to(self, a: int, other: _Objects, b: int) -> float:
        """max over pixels of object a (here) of the distance to object b of ``other``."""
        pts = self.pixels(a)
        pts = pts[other.lab[tuple(pts.T)] != b]
        if pts.size == 0:
            return 0.0
        return float(other.tree(b).query(pts)[0].max())


def _hausdorff(A: _Objects, a: int, B: _Objects, b: int) -> float:
    return max(A.directed_to(a, B, b), B.directed_to(b, A, a))


def _nearest_hausdorff(A: _Objects, a: int, B: _Objects) -> float:
    """Smallest Hausdorff distance between object a of A and any object of B (a overlaps none of them)."""
    # exact lower bounds for all candidates at once: h(B_k -> a) from one distance transform of a's complement
    dist_to_a = ndi.distance_transform_edt(A.lab != a)
    lower = np.asarray(ndi.maximum(dist_to_a, labels=B.lab, index=np.arange(1, B.n + 1)), float).reshape(-1)
    best = float("inf")
    for k in np.argsort(lower, kind="stable"):
        if lower[k] >= best:
            break
        best = min(best, max(lower[k], A.directed_to(a, B, int(k) + 1)))
    return best


def _partners(src: np.ndarray, dst: np.ndarray, inter: np.ndarray, dst_area: np.ndarray, n_src: int):
    """For each source object, the pair index of its most-overlapping partner (-1 if none).

    Ties in overlap go to the partner of smaller area, then to the lower label.
    """
    best = np.full(n_src + 1, -1, np.int64)
    if src.size:
        order = np.lexsort((dst, dst_area[dst], -inter, src))
        s = src[order]
        first = np.ones(s.size, bool)
        first[1:] = s[1:] != s[:-1]
        best[s[first]] = order[first]
    return best


def glas_metrics(true, pred, *, hausdorff: bool = True) -> GlaSStats:
    """All GlaS sums for one image (see the module docstring); ``.f1``, ``.object_dice``, ``.object_hausdorff``.

    ``hausdorff=False`` skips the distance computations (``hd_*_sum`` are then NaN).
    """
    t, _, nt = _compact(true, "true")
    p, _, npred = _compact(pred, "pred")
    _check_same_shape(t, p)
    ov: _Overlap = _overlap_compact(t, nt, p, npred)
    a_t, a_p = ov.area_true, ov.area_pred
    tot_t, tot_p = int(a_t[1:].sum()), int(a_p[1:].sum())
    if nt == 0 or npred == 0:  # no partner can exist: Dice 0 and Hausdorff inf for every object present

        def hd_sum(n: int) -> float:
            return (float("inf") if n else 0.0) if hausdorff else float("nan")

        return GlaSStats(tp=0, fp=npred, fn=nt, area_true=tot_t, area_pred=tot_p,
                         hd_true_sum=hd_sum(nt), hd_pred_sum=hd_sum(npred))

    dice_pair = 2.0 * ov.inter / (a_t[ov.ti] + a_p[ov.pj])
    part_of_pred = _partners(ov.pj, ov.ti, ov.inter, a_t, npred)  # pair index per pred object
    part_of_true = _partners(ov.ti, ov.pj, ov.inter, a_p, nt)

    # F1: a predicted object is a TP when it covers more than half of its partner
    has_p = part_of_pred[1:] >= 0
    k = part_of_pred[1:][has_p]
    tp = int(np.count_nonzero(ov.inter[k] / a_t[ov.ti[k]] > 0.5))

    dice_pred = np.zeros(npred)
    dice_pred[has_p] = dice_pair[k]
    has_t = part_of_true[1:] >= 0
    dice_true = np.zeros(nt)
    dice_true[has_t] = dice_pair[part_of_true[1:][has_t]]

    hd_pred_sum = hd_true_sum = float("nan")
    if hausdorff:
        T, P = _Objects(t, nt), _Objects(p, npred)
        hd_pair: dict[int, float] = {}

        def pair_hd(idx: int) -> float:
            if idx not in hd_pair:
                hd_pair[idx] = _hausdorff(T, int(ov.ti[idx]), P, int(ov.pj[idx]))
            return hd_pair[idx]

        hd_pred = np.array([pair_hd(int(part_of_pred[j])) if part_of_pred[j] >= 0 else _nearest_hausdorff(P, j, T)
                            for j in range(1, npred + 1)])
        hd_true = np.array([pair_hd(int(part_of_true[i])) if part_of_true[i] >= 0 else _nearest_hausdorff(T, i, P)
                            for i in range(1, nt + 1)])
        hd_pred_sum = float((a_p[1:] * hd_pred).sum())
        hd_true_sum = float((a_t[1:] * hd_true).sum())

    return GlaSStats(tp=tp, fp=npred - tp, fn=nt - tp, area_true=tot_t, area_pred=tot_p,
                     dice_true_sum=float((a_t[1:] * dice_true).sum()),
                     dice_pred_sum=float((a_p[1:] * dice_pred).sum()),
                     hd_true_sum=hd_true_sum, hd_pred_sum=hd_pred_sum)


def object_f1(true, pred) -> float:
    """GlaS object-level F1 of one image (``F1score.m``): 2 TP / (2 TP + FP + FN).

    TP: predicted objects covering more than 50% of the area of their most-overlapping true object.
    Both maps empty gives 1.0, one empty 0.0 (as the MATLAB code). Not symmetric in general.
    """
    return glas_metrics(true, pred, hausdorff=False).f1


def object_dice(true, pred) -> float:
    """GlaS object-level Dice of one image (``ObjectDice.m``); symmetric.

    ``0.5 * sum_j |S_j|/|S| Dice(G(S_j), S_j) + 0.5 * sum_i |G_i|/|G| Dice(G_i, S(G_i))`` with G(.)/S(.) the
    most-overlapping partner (Dice 0 without one). Both maps empty gives 1.0, one empty 0.0 (as MATLAB).
    """
    return glas_metrics(true, pred, hausdorff=False).object_dice


def object_hausdorff(true, pred) -> float:
    """GlaS object-level Hausdorff distance of one image in pixels (``ObjectHausdorff.m``); symmetric.

    The object-Dice weighting applied to the Hausdorff distance between each object and its most-overlapping
    partner, or, without overlap, the object of the other map nearest in Hausdorff distance. Both maps empty
    gives 0.0; one empty gives inf (no partner can exist).
    """
    return glas_metrics(true, pred, hausdorff=True).object_hausdorff


@dataclass
class GlaSAccumulator:
    """GlaS scores over a data set.

    ``pooled`` sums the per-image :class:`GlaSStats`: the challenge page's definition, with object weights
    normalised over all objects of all images and F1 from the total TP, FP, FN; its ``.f1``,
    ``.object_dice`` and ``.object_hausdorff`` are the data-set scores. ``per_image`` keeps each image's
    stats for per-image means (:meth:`mean_per_image`).
    """

    hausdorff: bool = True
    pooled: GlaSStats = field(default_factory=GlaSStats)
    per_image: list[GlaSStats] = field(default_factory=list)

    def update(self, true, pred) -> GlaSStats:
        s = glas_metrics(true, pred, hausdorff=self.hausdorff)
        self.pooled = self.pooled + s
        self.per_image.append(s)
        return s

    def mean_per_image(self) -> dict[str, float]:
        """Mean over images of each image's F1, object Dice and object Hausdorff (NaN with no image)."""
        out = {}
        for name in ("f1", "object_dice", "object_hausdorff"):
            vals = [getattr(s, name) for s in self.per_image]
            out[name] = float(np.mean(vals)) if vals else float("nan")
        return out
