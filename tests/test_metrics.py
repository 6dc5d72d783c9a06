"""Tests of cerberus_histo.metrics: hand-computed cases, edge cases, properties, and slow references.

The slow references below are written straight from the definitions (HoVer-Net stats_utils / compute_stats,
CoNIC compute_stats, GlaS MATLAB code) with one full-image mask per instance and loops over instance pairs.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import directed_hausdorff

from cerberus_histo.metrics import (
    GlaSAccumulator,
    MPQPlus,
    PQResult,
    aji,
    aji_plus,
    classification_metrics,
    detection_f1,
    dice,
    dice2,
    glas_metrics,
    instance_types,
    multiclass_pq,
    object_dice,
    object_f1,
    object_hausdorff,
    pair_centroids,
    pq,
)
from cerberus_histo.metrics.detection import DetectionAccumulator

NAN = float("nan")


# ------------------------------------------------------------------------------------------ generators
def random_map(rng, shape=(40, 40), n=10) -> np.ndarray:
    """Random overlapping ellipses painted in turn with random (non-contiguous) ids."""
    lab = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ids = rng.choice(np.arange(1, 100_000), size=n, replace=False)
    for k in ids:
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(1.5, 7, size=2)
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
    return lab


def perturbed(rng, true: np.ndarray) -> np.ndarray:
    """A 'prediction': each instance shifted by up to 2 px, some dropped or merged, plus new blobs."""
    pred = np.zeros_like(true)
    ids = [int(i) for i in np.unique(true) if i]
    for i in ids:
        r = rng.uniform()
        if r < 0.12:
            continue
        new = int(rng.integers(1, 50_000)) if r > 0.25 or not pred.any() else int(rng.choice(pred[pred > 0]))
        ys, xs = np.nonzero(true == i)
        dy, dx = rng.integers(-2, 3, size=2)
        ys, xs = np.clip(ys + dy, 0, true.shape[0] - 1), np.clip(xs + dx, 0, true.shape[1] - 1)
        pred[ys, xs] = new
    extra = random_map(rng, true.shape, 2) + 60_000
    pred = np.where((extra > 60_000) & (rng.uniform() < 0.8), extra, pred)
    return pred


def renumber(rng, lab: np.ndarray) -> np.ndarray:
    ids = np.unique(lab)
    ids = ids[ids > 0]
    new = rng.choice(np.arange(1, 10 * len(ids) + 1000), size=len(ids), replace=False)
    out = np.zeros_like(lab)
    for i, j in zip(ids, new, strict=True):
        out[lab == i] = j
    return out


def pairs_of_maps(n_cases=12, seed=0, shape=(40, 40), n=10):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_cases):
        t = random_map(rng, shape, n)
        out.append((t, perturbed(rng, t)))
    return out


CASES = pairs_of_maps()


# ------------------------------------------------------------------------------------- slow references
def _ids(x):
    u = np.unique(x)
    return u[u > 0]


def ref_tables(t, p):
    tids, pids = _ids(t), _ids(p)
    inter = np.zeros((len(tids), len(pids)))
    union = np.zeros((len(tids), len(pids)))
    for a, i in enumerate(tids):
        tm = t == i
        for b, j in enumerate(pids):
            pm = p == j
            inter[a, b] = np.sum(tm & pm)
            union[a, b] = np.sum(tm | pm)
    at = np.array([np.sum(t == i) for i in tids], float)
    ap = np.array([np.sum(p == j) for j in pids], float)
    return tids, pids, inter, union, at, ap


def ref_dice(t, p):
    return 2 * np.sum((t > 0) & (p > 0)) / (np.sum(t > 0) + np.sum(p > 0))


def ref_dice2(t, p):
    _, _, inter, _, at, ap = ref_tables(t, p)
    num = den = 0.0
    for a in range(inter.shape[0]):
        for b in range(inter.shape[1]):
            if inter[a, b] > 0:
                num += 2 * inter[a, b]
                den += at[a] + ap[b]
    return num / den


def ref_aji(t, p):
    _, _, inter, union, at, ap = ref_tables(t, p)
    iou = inter / (union + 1e-6)
    num = den = 0.0
    used = set()
    for a in range(inter.shape[0]):
        if inter.shape[1] and iou[a].max() > 0:
            b = int(np.argmax(iou[a]))
            num += inter[a, b]
            den += union[a, b]
            used.add(b)
        else:
            den += at[a]
    den += sum(ap[b] for b in range(inter.shape[1]) if b not in used)
    return num / den


def ref_aji_plus(t, p):
    _, _, inter, union, at, ap = ref_tables(t, p)
    iou = inter / (union + 1e-6)
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    num = inter[rows, cols].sum()
    den = union[rows, cols].sum()
    den += sum(at[a] for a in range(len(at)) if a not in set(rows))
    den += sum(ap[b] for b in range(len(ap)) if b not in set(cols))
    return num / den


def ref_pq_counts(t, p, match_iou=0.5):
    _, _, inter, union, at, ap = ref_tables(t, p)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    if match_iou >= 0.5:
        rows, cols = np.nonzero(iou > match_iou)
    else:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > match_iou
        rows, cols = rows[keep], cols[keep]
    tp = len(rows)
    return tp, len(ap) - tp, len(at) - tp, float(iou[rows, cols].sum())


def ref_pq(tp, fp, fn, iou_sum):
    if tp + fp + fn == 0:
        return NAN
    return tp / (tp + 0.5 * fp + 0.5 * fn) * (iou_sum / tp if tp else 0.0)


def ref_types(inst, type_map):
    """HoVer-Net majority vote: most frequent type, 0 only if nothing else, ties -> smallest."""
    out = {}
    for i in _ids(inst):
        vals, counts = np.unique(type_map[inst == i], return_counts=True)
        order = sorted(zip(vals.tolist(), counts.tolist(), strict=True), key=lambda v: v[1], reverse=True)
        c = order[0][0]
        if c == 0 and len(order) > 1:
            c = order[1][0]
        out[int(i)] = int(c)
    return out


def ref_only_class(inst, types, c):
    keep = [i for i, k in types.items() if k == c]
    return np.where(np.isin(inst, keep), inst, 0)


def ref_hd(A, B):
    a, b = np.argwhere(A), np.argwhere(B)
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])


def ref_glas(t, p):
    """GlaS F1 / object Dice / object Hausdorff by loops over objects (MATLAB code's structure)."""
    S_ids, G_ids = _ids(p), _ids(t)
    area = {("S", j): np.sum(p == j) for j in S_ids} | {("G", i): np.sum(t == i) for i in G_ids}

    def partner(mask, other, side):
        vals, counts = np.unique(other[mask & (other > 0)], return_counts=True)
        if len(vals) == 0:
            return None
        # max overlap; ties -> smaller area, then lower label
        best = sorted(zip(vals, counts, strict=True), key=lambda v: (-v[1], area[(side, v[0])], v[0]))[0]
        return best[0]

    tp = 0
    t1_d = t1_h = 0.0
    tot_S, tot_G = np.sum(p > 0), np.sum(t > 0)
    for j in S_ids:
        Sj = p == j
        g = partner(Sj, t, "G")
        if g is not None:
            Gj = t == g
            if np.sum(Sj & Gj) / np.sum(Gj) > 0.5:
                tp += 1
            d = 2 * np.sum(Sj & Gj) / (Sj.sum() + Gj.sum())
            h = ref_hd(Gj, Sj)
        else:
            d = 0.0
            h = min(ref_hd(t == i, Sj) for i in G_ids)
        t1_d += Sj.sum() / tot_S * d
        t1_h += Sj.sum() / tot_S * h
    t2_d = t2_h = 0.0
    for i in G_ids:
        Gi = t == i
        s = partner(Gi, p, "S")
        if s is not None:
            Si = p == s
            d = 2 * np.sum(Si & Gi) / (Si.sum() + Gi.sum())
            h = ref_hd(Gi, Si)
        else:
            d = 0.0
            h = min(ref_hd(Gi, p == j) for j in S_ids)
        t2_d += Gi.sum() / tot_G * d
        t2_h += Gi.sum() / tot_G * h
    fp, fn = len(S_ids) - tp, len(G_ids) - tp
    return 2 * tp / (2 * tp + fp + fn), 0.5 * (t1_d + t2_d), 0.5 * (t1_h + t2_h)


# ------------------------------------------------------------------------------------------ hand cases
def hand_maps():
    """Truth: A = rows 0-3 x cols 0-3 (16 px), B = rows 0-3 x cols 6-9 (16 px).

    Pred: P1 = rows 0-3 x cols 0-2 (12 px, inside A: IoU 12/16 = 0.75),
          P2 = rows 0-1 x cols 6-9 (8 px, inside B: IoU 8/16 = 0.5, NOT > 0.5),
          P3 = rows 6-7 x cols 0-1 (4 px, overlaps nothing).
    """
    t = np.zeros((10, 12), np.int32)
    t[0:4, 0:4] = 5
    t[0:4, 6:10] = 9
    p = np.zeros((10, 12), np.int32)
    p[0:4, 0:3] = 2
    p[0:2, 6:10] = 7
    p[6:8, 0:2] = 3
    return t, p


def test_hand_dice_dice2_aji():
    t, p = hand_maps()
    # Dice: |T| = 32, |P| = 24, |T∩P| = 12 + 8 = 20 -> 40 / 56
    assert dice(t, p) == pytest.approx(40 / 56)
    # DICE2: pairs (A,P1): 2*12 over 16+12; (B,P2): 2*8 over 16+8 -> 40 / 52
    assert dice2(t, p) == pytest.approx(40 / 52)
    # AJI: A->P1 (inter 12, union 16), B->P2 (inter 8, union 16); P3 unpaired adds 4 -> 20 / 36
    assert aji(t, p) == pytest.approx(20 / 36)
    assert aji_plus(t, p) == pytest.approx(20 / 36)


def test_hand_pq():
    t, p = hand_maps()
    r = pq(t, p)
    # only (A,P1) matches (IoU 0.75); (B,P2) has IoU exactly 0.5, not > 0.5
    assert (r.tp, r.fp, r.fn) == (1, 2, 1)
    assert r.iou_sum == pytest.approx(0.75)
    assert r.dq == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 1))  # 0.4
    assert r.sq == pytest.approx(0.75)
    assert r.pq == pytest.approx(0.3)
    # a lower threshold (Hungarian branch) also takes (B,P2)
    r = pq(t, p, match_iou=0.3)
    assert (r.tp, r.fp, r.fn) == (2, 1, 0)
    assert r.pq == pytest.approx(2 / 2.5 * 1.25 / 2)
    d = r.as_dict()
    assert set(d) == {"dq", "sq", "pq", "tp", "fp", "fn", "iou_sum"}


def test_aji_is_not_symmetric():
    # truth: one 10x10 object; prediction: its two 5x10 halves (IoU 0.5 each)
    t = np.zeros((10, 10), np.int32)
    t[:] = 1
    p = np.zeros((10, 10), np.int32)
    p[:5] = 1
    p[5:] = 2
    # true -> one half: inter 50, union 100; other half unpaired adds 50 -> 50/150
    assert aji(t, p) == pytest.approx(1 / 3)
    # each half -> the whole: inter 50 + 50, union 100 + 100 -> 0.5
    assert aji(p, t) == pytest.approx(0.5)
    assert aji_plus(t, p) == pytest.approx(1 / 3)
    assert aji_plus(p, t) == pytest.approx(1 / 3)
    assert dice(t, p) == dice(p, t) == 1.0


def test_pq_result_adds():
    a, b = PQResult(2, 1, 0, 1.5), PQResult(1, 0, 3, 0.9)
    s = a + b
    assert (s.tp, s.fp, s.fn) == (3, 1, 3) and s.iou_sum == pytest.approx(2.4)
    assert s.pq == pytest.approx(3 / (3 + 0.5 + 1.5) * 2.4 / 3)


# ------------------------------------------------------------------------------------------ edge cases
def test_instance_edge_cases():
    z = np.zeros((8, 8), np.int32)
    x = np.zeros((8, 8), np.int32)
    x[2:5, 2:5] = 4
    # both empty: undefined -> NaN; PQ counts all zero
    for f in (dice, dice2, aji, aji_plus):
        assert math.isnan(f(z, z))
    r = pq(z, z)
    assert (r.tp, r.fp, r.fn, r.iou_sum) == (0, 0, 0, 0.0) and r.empty
    assert math.isnan(r.dq) and math.isnan(r.sq) and math.isnan(r.pq)
    # one side empty: 0
    for f in (dice, dice2, aji, aji_plus):
        assert f(x, z) == 0.0 and f(z, x) == 0.0
    assert pq(x, z).as_dict() == {"dq": 0.0, "sq": 0.0, "pq": 0.0, "tp": 0, "fp": 0, "fn": 1, "iou_sum": 0.0}
    assert (pq(z, x).fp, pq(z, x).pq) == (1, 0.0)
    # non-empty but disjoint: 0 everywhere
    y = np.zeros((8, 8), np.int32)
    y[6:8, 6:8] = 1
    assert dice2(x, y) == 0.0 and aji(x, y) == 0.0 and pq(x, y).pq == 0.0


def test_input_checks():
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(TypeError):
        pq(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="negative"):
        aji(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError):
        pq(np.zeros((3, 3), int), np.zeros((3, 3), int), match_iou=1.0)
    # boolean maps are one instance each
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True
    assert pq(b, b).pq == 1.0


def test_glas_edge_cases():
    z = np.zeros((8, 8), np.int32)
    x = np.zeros((8, 8), np.int32)
    x[2:5, 2:5] = 4
    # both empty: F1 1, object Dice 1, object Hausdorff 0 (MATLAB code)
    assert (object_f1(z, z), object_dice(z, z), object_hausdorff(z, z)) == (1.0, 1.0, 0.0)
    # one empty: F1 0, object Dice 0, object Hausdorff inf
    for a, b in ((x, z), (z, x)):
        assert (object_f1(a, b), object_dice(a, b), object_hausdorff(a, b)) == (0.0, 0.0, math.inf)
    # no prediction covers more than half of its partner -> F1 0
    y = np.zeros((8, 8), np.int32)
    y[2:3, 2:5] = 1
    assert object_f1(x, y) == 0.0


def test_detection_and_classification_edge_cases():
    e = np.zeros((0, 2))
    r = detection_f1(e, [], e, [])
    assert math.isnan(r.f1) and math.isnan(r.type_accuracy) and r.f1_per_class == {}
    r = detection_f1([[1.0, 1.0]], [1], e, [])
    assert (r.tp, r.fp, r.fn, r.f1) == (0, 0, 1, 0.0)
    assert r.f1_per_class == {1: 0.0}
    r = detection_f1(e, None, [[1.0, 1.0]], None)
    assert (r.fp, r.f1) == (1, 0.0) and math.isnan(r.type_accuracy)
    pairs, ut, up = pair_centroids(e, e, 5)
    assert pairs.shape == (0, 2) and ut.size == 0 and up.size == 0
    with pytest.raises(ValueError):
        detection_f1([[0, 0]], [1], [[0, 0]], None)
    c = classification_metrics([], [], 3)
    assert math.isnan(c.accuracy) and math.isnan(c.macro_f1) and c.confusion.sum() == 0
    with pytest.raises(ValueError):
        classification_metrics([0, 3], [0, 1], 3)


# ------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("case", range(4))
def test_identical_maps_are_perfect(case):
    t = CASES[case][0]
    assert dice(t, t) == 1.0
    assert dice2(t, t) == 1.0
    assert aji(t, t) == pytest.approx(1.0)
    assert aji_plus(t, t) == pytest.approx(1.0)
    r = pq(t, t)
    assert (r.dq, r.sq, r.pq) == (1.0, 1.0, 1.0)
    g = glas_metrics(t, t)
    assert (g.f1, g.object_dice, g.object_hausdorff) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("case", range(6))
def test_renumbering_changes_nothing(case):
    rng = np.random.default_rng(100 + case)
    t, p = CASES[case]
    t2, p2 = renumber(rng, t), renumber(rng, p)
    for f in (dice, dice2, aji, aji_plus):
        assert f(t2, p2) == pytest.approx(f(t, p), abs=1e-12)
    assert pq(t2, p2) == pq(t, p)
    g, g2 = glas_metrics(t, p), glas_metrics(t2, p2)
    assert (g2.f1, g2.object_dice, g2.object_hausdorff) == pytest.approx((g.f1, g.object_dice, g.object_hausdorff))


@pytest.mark.parametrize("case", range(6))
def test_symmetry(case):
    t, p = CASES[case]
    assert dice(t, p) == dice(p, t)
    assert dice2(t, p) == pytest.approx(dice2(p, t))
    a, b = pq(t, p), pq(p, t)
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fn, b.fp) and a.pq == pytest.approx(b.pq)
    assert object_dice(t, p) == pytest.approx(object_dice(p, t))
    assert object_hausdorff(t, p) == pytest.approx(object_hausdorff(p, t))
    rng = np.random.default_rng(case)
    xt, xp = rng.uniform(0, 100, (30, 2)), rng.uniform(0, 100, (25, 2))
    assert detection_f1(xt, None, xp, None, radius_px=8).f1 == detection_f1(xp, None, xt, None, radius_px=8).f1


def test_importing_metrics_does_not_import_torch():
    code = "import sys, cerberus_histo.metrics; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------- agreement with slow references
@pytest.mark.parametrize("case", range(len(CASES)))
def test_instance_metrics_match_slow_reference(case):
    t, p = CASES[case]
    assert dice(t, p) == pytest.approx(ref_dice(t, p), abs=1e-6)
    assert dice2(t, p) == pytest.approx(ref_dice2(t, p), abs=1e-6)
    assert aji(t, p) == pytest.approx(ref_aji(t, p), abs=1e-6)
    assert aji_plus(t, p) == pytest.approx(ref_aji_plus(t, p), abs=1e-6)
    for thr in (0.5, 0.3, 0.7):
        tp, fp, fn, s = ref_pq_counts(t, p, thr)
        r = pq(t, p, match_iou=thr)
        assert (r.tp, r.fp, r.fn) == (tp, fp, fn)
        assert r.iou_sum == pytest.approx(s, abs=1e-6)
        assert r.pq == pytest.approx(ref_pq(tp, fp, fn, s), abs=1e-6)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_glas_matches_slow_reference(case):
    t, p = CASES[case]
    f1, od, oh = ref_glas(t, p)
    g = glas_metrics(t, p)
    assert g.f1 == pytest.approx(f1, abs=1e-6)
    assert g.object_dice == pytest.approx(od, abs=1e-6)
    assert g.object_hausdorff == pytest.approx(oh, abs=1e-6)


def test_glas_hand_case():
    """G1 = rows 0-9 x cols 0-9 (100 px), G2 = rows 20-23 x cols 20-23 (16 px).

    S1 = rows 0-9 x cols 0-5 (60 px, 60% of G1 -> TP), S2 = rows 20-23 x cols 20-21 (8 px, exactly 50% of G2
    -> not TP), S3 = rows 30-31 x cols 0-1 (4 px, no overlap -> FP). TP 1, FP 2, FN 1 -> F1 = 2 / 5.
    """
    t = np.zeros((40, 30), np.int32)
    t[0:10, 0:10] = 1
    t[20:24, 20:24] = 2
    p = np.zeros((40, 30), np.int32)
    p[0:10, 0:6] = 1
    p[20:24, 20:22] = 2
    p[30:32, 0:2] = 3
    assert object_f1(t, p) == pytest.approx(0.4)
    # Dice: S1-G1 = 120/160, S2-G2 = 16/24, S3 = 0; weights by area over 72 (S) and 116 (G)
    d1, d2 = 120 / 160, 16 / 24
    expected = 0.5 * (60 * d1 + 8 * d2) / 72 + 0.5 * (100 * d1 + 16 * d2) / 116
    assert object_dice(t, p) == pytest.approx(expected)
    # Hausdorff: H(G1,S1) = 4 (col 9 to col 5), H(G2,S2) = 2; S3 has no overlap -> nearest object:
    # H(S3,G1) = |(0,9)-(30,1)| = sqrt(964), H(S3,G2) = |(20,23)-(30,1)| = sqrt(584) -> sqrt(584)
    expected = 0.5 * (60 * 4 + 8 * 2 + 4 * math.sqrt(584)) / 72 + 0.5 * (100 * 4 + 16 * 2) / 116
    assert object_hausdorff(t, p) == pytest.approx(expected)
    # object F1 is not symmetric: with truth and prediction swapped, G1 covers all of S1 -> TP, and so on
    assert object_f1(p, t) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_glas_accumulator_pools_over_images():
    acc = GlaSAccumulator()
    for t, p in CASES[:3]:
        acc.update(t, p)
    # pooled object Dice = weights over all objects of all images (stats add)
    s = acc.per_image
    total = s[0] + s[1] + s[2]
    expected = 0.5 * total.dice_pred_sum / total.area_pred + 0.5 * total.dice_true_sum / total.area_true
    assert acc.pooled.object_dice == pytest.approx(expected)
    assert acc.pooled.f1 == pytest.approx(2 * total.tp / (2 * total.tp + total.fp + total.fn))
    means = acc.mean_per_image()
    assert means["f1"] == pytest.approx(np.mean([x.f1 for x in s]))


# ------------------------------------------------------------------------------------------ multi-class
def test_instance_types_majority_vote():
    inst = np.array([[1, 1, 1, 2, 2, 3], [1, 1, 0, 2, 2, 3]])
    typ = np.array([[0, 0, 0, 4, 5, 0], [2, 2, 1, 5, 4, 0]])
    # inst 1: types 0,0,0,2,2 -> 0 most frequent but another type exists -> 2
    # inst 2: 4,5,5,4 -> tie -> smallest (4); inst 3: only 0 -> 0
    assert instance_types(inst, typ) == {1: 2, 2: 4, 3: 0}
    assert instance_types(np.zeros((2, 2), int), np.zeros((2, 2), int)) == {}


def _typed_case(rng, num_classes=3):
    t = random_map(rng, (40, 40), 12)
    p = perturbed(rng, t)
    # per-pixel types, constant within each true instance, noisy within predictions
    tt = np.zeros_like(t)
    for i in _ids(t):
        tt[t == i] = rng.integers(1, num_classes + 1)
    pt = np.where(rng.uniform(size=t.shape) < 0.8, tt, rng.integers(0, num_classes + 1, size=t.shape))
    pt = np.where(p > 0, np.maximum(pt, 1), 0)
    return t, tt, p, pt


def test_multiclass_pq_and_mpq_plus_match_reference():
    rng = np.random.default_rng(7)
    k = 4  # class 4 never appears: absent from everything
    acc = MPQPlus(num_classes=k)
    pooled = {c: np.zeros(4) for c in range(1, k + 1)}
    for _ in range(5):
        t, tt, p, pt = _typed_case(rng, 3)
        res = acc.update(t, tt, p, pt)
        t_types, p_types = ref_types(t, tt), ref_types(p, pt)
        kept = []
        for c in range(1, k + 1):
            counts = ref_pq_counts(ref_only_class(t, t_types, c), ref_only_class(p, p_types, c))
            r = res.per_class[c]
            assert (r.tp, r.fp, r.fn) == counts[:3]
            assert r.iou_sum == pytest.approx(counts[3], abs=1e-9)
            pooled[c] += counts
            if counts[0] + counts[2] > 0:  # class present in truth (PanNuke convention)
                kept.append(ref_pq(*counts))
                assert res.pq_per_class[c] == pytest.approx(kept[-1], abs=1e-6)
            else:
                assert math.isnan(res.pq_per_class[c])
        assert res.mpq == pytest.approx(np.mean(kept), abs=1e-6)
        # dict types give the same as per-pixel maps
        res2 = multiclass_pq(t, t_types, p, p_types, k)
        assert res2.per_class == res.per_class
    # CoNIC mPQ+: pooled counts per class, class with no instance at all -> 0, mean over all k classes
    expected = [0.0 if c.sum() == 0 else ref_pq(int(c[0]), int(c[1]), int(c[2]), c[3]) for c in pooled.values()]
    assert acc.pq_plus_per_class[4] == 0.0
    assert acc.mpq_plus == pytest.approx(np.mean(expected), abs=1e-6)
    assert acc.n_images == 5


def test_multiclass_skip_conventions():
    t = np.zeros((10, 10), np.int32)
    t[0:4, 0:4] = 1
    p = t.copy()
    p[6:9, 6:9] = 2  # a predicted-only object of class 2
    tt = {1: 1}
    ptypes = {1: 1, 2: 2}
    r = multiclass_pq(t, tt, p, ptypes, 3)
    # default (PanNuke): classes without truth are skipped even when predicted
    assert r.pq_per_class[1] == 1.0 and math.isnan(r.pq_per_class[2]) and math.isnan(r.pq_per_class[3])
    assert r.mpq == 1.0
    r = multiclass_pq(t, tt, p, ptypes, 3, skip_absent="both")
    assert r.pq_per_class[2] == 0.0 and math.isnan(r.pq_per_class[3]) and r.mpq == 0.5
    with pytest.raises(ValueError):
        multiclass_pq(t, {1: 5}, p, ptypes, 3)
    with pytest.raises(ValueError):
        multiclass_pq(t, {}, p, ptypes, 3)


# ------------------------------------------------------------------------------------------ detection
def test_detection_hand_case():
    # pairs within 5 px: T0-P0 (d 1), T1-P1 (d 3); T2 and P2 are 70 px apart -> FN and FP
    true_xy = [[0, 0], [10, 0], [50, 50]]
    true_t = [1, 2, 1]
    pred_xy = [[1, 0], [10, 3], [100, 100]]
    pred_t = [1, 1, 2]
    r = detection_f1(true_xy, true_t, pred_xy, pred_t, radius_px=5)
    assert (r.tp, r.fp, r.fn) == (2, 1, 1)
    assert r.f1 == pytest.approx(4 / 6)
    assert r.type_accuracy == 0.5
    # class 1: paired subset {(1,1), (2,1)}: TP 1, FP 1; unpaired true of class 1: 1 -> 2 / (2 + 2 + 1)
    # class 2: paired subset {(2,1)}: FN 1; unpaired pred of class 2: 1 -> 0 / (2 + 1)
    assert r.f1_per_class == {1: pytest.approx(0.4), 2: 0.0}
    # radius in µm: 2 µm at 0.5 µm/px = 4 px drops nothing here; 1 µm = 2 px drops T1-P1 (3 px)
    assert detection_f1(true_xy, true_t, pred_xy, pred_t, radius_um=2, mpp=0.5).tp == 2
    assert detection_f1(true_xy, true_t, pred_xy, pred_t, radius_um=1, mpp=0.5).tp == 1
    # a distance equal to the radius is kept
    assert detection_f1(true_xy, true_t, pred_xy, pred_t, radius_px=3).tp == 2


def ref_class_f1(pt, pp, ut, up, c):
    tp = tn = fp = fn = 0
    for a, b in zip(pt, pp, strict=True):
        if a != c and b != c:
            continue  # HoVer-Net keeps only pairs with true or predicted class c
        tp += a == c and b == c
        fp += a != c and b == c
        fn += a == c and b != c
    fp_d, fn_d = sum(x == c for x in up), sum(x == c for x in ut)
    return 2 * (tp + tn) / (2 * (tp + tn) + 2 * fp + 2 * fn + fp_d + fn_d)


def test_detection_pools_images_like_hovernet():
    rng = np.random.default_rng(3)
    acc = DetectionAccumulator(radius_um=6, mpp=0.5)  # 12 px
    assert acc.radius == 12
    pt, pp, ut, up = [], [], [], []
    for _ in range(4):
        xt = rng.uniform(0, 200, (40, 2))
        xp = np.concatenate([xt[:32] + rng.normal(0, 5, (32, 2)), rng.uniform(0, 200, (6, 2))])
        tt, ptypes = rng.integers(1, 4, 40), rng.integers(1, 4, 38)
        acc.update(xt, tt, xp, ptypes)
        pairs, un_t, un_p = pair_centroids(xt, xp, 12)
        d = np.linalg.norm(xt[pairs[:, 0]] - xp[pairs[:, 1]], axis=1)
        assert np.all(d <= 12)
        assert len(pairs) + len(un_t) == 40 and len(pairs) + len(un_p) == 38
        pt += tt[pairs[:, 0]].tolist()
        pp += ptypes[pairs[:, 1]].tolist()
        ut += tt[un_t].tolist()
        up += ptypes[un_p].tolist()
    r = acc.result()
    assert (r.tp, r.fp, r.fn) == (len(pt), len(up), len(ut))
    assert r.f1 == pytest.approx(2 * len(pt) / (2 * len(pt) + len(up) + len(ut)))
    for c in (1, 2, 3):
        assert r.f1_per_class[c] == pytest.approx(ref_class_f1(pt, pp, ut, up, c))


# ------------------------------------------------------------------------------------------ classification
def test_classification_hand_case():
    r = classification_metrics([0, 1, 2, 2], [0, 2, 2, 1], 4)
    assert r.confusion.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert r.accuracy == 0.5
    # recall: 1, 0, 1/2 (class 3 absent from truth: left out) -> 0.5
    assert r.balanced_accuracy == pytest.approx(0.5)
    # F1: 2*1/2, 0/2, 2*1/4 (class 3 absent from both: left out) -> 0.5
    assert r.macro_f1 == pytest.approx(0.5)
    assert math.isnan(r.f1_per_class[3]) and math.isnan(r.recall_per_class[3])
    # a class only predicted counts with F1 0 in the macro mean
    r = classification_metrics([0, 0], [0, 1], 3)
    assert r.macro_f1 == pytest.approx((2 / 3 + 0) / 2)
    assert r.balanced_accuracy == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ scale
def test_thousand_instances_are_fast():
    import time

    # 32 x 32 grid of 14 x 14 squares; prediction shifted by 2 px (IoU 168/224 = 0.75 each)
    t = np.zeros((512, 512), np.int32)
    for k in range(32 * 32):
        r, c = divmod(k, 32)
        t[r * 16: r * 16 + 14, c * 16: c * 16 + 14] = k + 1
    p = np.zeros_like(t)
    p[:, 2:] = t[:, :-2]
    start = time.perf_counter()
    r = pq(t, p)
    assert (r.tp, r.fp, r.fn) == (1024, 0, 0) and r.sq == pytest.approx(0.75)
    assert aji_plus(t, p) == pytest.approx(0.75)
    assert aji(t, p) == pytest.approx(0.75)
    assert dice2(t, p) == pytest.approx(2 * 168 / (2 * 196))
    assert time.perf_counter() - start < 10  # generous: seconds, not minutes
