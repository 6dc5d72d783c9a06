import cv2
import numpy as np
import pytest

from cerberus_histo.data.targets import (
    CONTOUR,
    INTERIOR,
    ellipse_kernel,
    fix_mirror_padding,
    instance_target,
    separation_weight,
    type_target,
)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 11, 15])
def test_ellipse_kernel_matches_opencv(k):
    expected = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)).astype(bool)
    assert np.array_equal(ellipse_kernel(k), expected)


def test_kernel_3_is_the_cross():
    assert ellipse_kernel(3).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_single_square_by_hand():
    inst = np.zeros((9, 9), np.int32)
    inst[2:7, 2:7] = 1  # 5x5 square
    label = instance_target(inst, 3)
    # interior: the square eroded by the cross = its inner 3x3
    assert np.array_equal(np.argwhere(label == INTERIOR).min(0), [3, 3])
    assert np.array_equal(np.argwhere(label == INTERIOR).max(0), [5, 5])
    assert (label == INTERIOR).sum() == 9
    # band: the square dilated by the cross (25 + 4 * 5 = 45 px) minus the interior
    assert (label == CONTOUR).sum() == 45 - 9
    assert label[1, 1] == 0 and label[1, 2] == CONTOUR and label[0, 4] == 0


def test_objects_cut_by_the_image_edge_are_not_eroded_there():
    inst = np.zeros((6, 6), np.int32)
    inst[:, :3] = 1
    label = instance_target(inst, 3)
    assert label[0, 0] == INTERIOR and label[5, 0] == INTERIOR  # image edge: not eroded
    assert label[0, 2] == CONTOUR and label[0, 3] == CONTOUR  # true boundary: band 1 px each side


def _naive(inst, k):
    """The original's per-instance full-image OpenCV computation."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    inner_map = np.zeros(inst.shape, np.uint8)
    contour = np.zeros(inst.shape, np.uint8)
    for i in np.unique(inst)[1:]:
        m = (inst == i).astype(np.uint8)
        inner = cv2.erode(m, kernel)
        inner_map |= inner
        contour |= cv2.dilate(m, kernel) - inner
    return (inner_map + 2 * contour).astype(np.uint8)


def _random_instances(seed, shape=(96, 96), n=25):
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(2, 12, 2)
        inst[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = i  # later ones overlap earlier ones
    return inst


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [3, 11])
def test_instance_target_equals_the_original_computation(seed, k):
    inst = _random_instances(seed)
    assert np.array_equal(instance_target(inst, k), _naive(inst, k))


def test_instance_target_restricted_to_ids():
    inst = _random_instances(7)
    some = [3, 5, 8]
    expected = _naive(np.where(np.isin(inst, some), inst, 0), 3)
    assert np.array_equal(instance_target(inst, 3, ids=some), expected)


def test_fix_mirror_padding():
    inst = np.zeros((6, 8), np.int32)
    inst[0:2, 0:2] = 4  # first piece of id 4 (raster order)
    inst[4:6, 6:8] = 4  # a reflected copy
    inst[0:2, 6:8] = 2
    fixed = fix_mirror_padding(inst)
    assert fixed[0, 0] == 4 and fixed[5, 7] == 5 and fixed[0, 7] == 2
    assert inst[5, 7] == 4  # input untouched
    # diagonal neighbours are separate pieces (4-connectivity, as the original)
    diag = np.array([[1, 0], [0, 1]], np.int32)
    assert sorted(np.unique(fix_mirror_padding(diag))) == [0, 1, 2]


def test_separation_weight_by_hand():
    interior = np.zeros((5, 11), bool)
    interior[:, 0:4] = True
    interior[:, 7:11] = True  # two components, 3 px gap (columns 4, 5, 6)
    w = separation_weight(interior, sigma=3.0)
    assert w.dtype == np.float32 and np.all(w[interior] == 1)
    # column 5: 2 px to each component -> d1 + d2 = 4
    assert w[2, 5] == pytest.approx(1 + 10 * np.exp(-((4 / 3) ** 2) / 2), rel=1e-6)
    # column 4: 1 and 3 px -> also 4
    assert w[2, 4] == pytest.approx(w[2, 5], rel=1e-6)
    single = np.zeros((5, 5), bool)
    single[1:3, 1:3] = True
    assert np.all(separation_weight(single, 3.0) == 1)
    assert np.all(separation_weight(np.zeros((4, 4), bool), 3.0) == 1)


def test_separation_weight_equals_the_dense_definition():
    from scipy import ndimage as ndi

    interior = instance_target(_random_instances(2, n=12), 3) == INTERIOR
    comps, n = ndi.label(interior)
    stack = np.full(interior.shape + (n,), 1000.0)
    for i, sl in enumerate(ndi.find_objects(comps)):
        box = tuple(slice(max(s.start - 10, 0), min(s.stop + 10, size)) for s, size in zip(sl, interior.shape, strict=True))
        stack[box + (i,)] = ndi.distance_transform_edt(comps[box] != i + 1)
    near = np.sort(stack, axis=-1)[..., :2]
    expected = 10 * np.exp(-((near.sum(-1) / 3) ** 2) / 2)
    expected[comps > 0] = 0
    np.testing.assert_allclose(separation_weight(interior, 3.0), 1 + expected, rtol=1e-5, atol=1e-6)


def test_type_target():
    inst = np.array([[0, 1, 1], [2, 2, 3]])
    assert type_target(inst, [1, 2, 3], [4, 6, 1]).tolist() == [[0, 4, 4], [6, 6, 1]]
    assert type_target(inst, [2], [5]).tolist() == [[0, 0, 0], [5, 5, 0]]
    with pytest.raises(ValueError, match="classes"):
        type_target(inst, [1, 2], [1])


def test_targets_do_not_import_torch():
    import subprocess
    import sys

    code = "import cerberus_histo.data.targets, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
