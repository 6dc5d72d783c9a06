"""Tissue masks: real slide, synthetic slide truth, pen marks, user masks and box fractions."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cerberus_histo.data.slide import SlideTruth, write_synthetic_slide
from cerberus_histo.data.synthetic import synth_tile
from cerberus_histo.errors import CerberusError
from cerberus_histo.io.readers import ArrayReader
from cerberus_histo.io.slides import open_slide
from cerberus_histo.io.tissue import box_fractions, load_mask, mask_fraction, mask_tiles, save_mask, tissue_mask

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
GLASS = (242, 241, 246)


@pytest.mark.skipif(not CMU.is_file(), reason=f"real slide {CMU} not present")
def test_cmu_mask_covers_tissue_not_glass():
    with open_slide(CMU) as r:
        mask, mask_mpp = tissue_mask(r)
        thumb = r.thumbnail(8.0)
    assert mask.dtype == bool and mask.shape == thumb.shape[:2] and mask_mpp == pytest.approx(8.0, rel=0.01)
    assert 0.1 < mask.mean() < 0.9
    grey = thumb.mean(axis=2)
    assert grey[mask].mean() < grey[~mask].mean() - 60  # tissue is clearly darker than what is left out
    assert np.percentile(grey[~mask], 25) > 225  # what is left out is mostly bright glass


def _glass_with_tissue_and_ink() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 2400 px square at 2 um/px (4.8 mm): glass, a 896 px block of synthetic tissue, green/blue/black marker
    strokes (0.2-0.3 mm wide) and a blue handwritten label on the glass. Returns (image, tissue, ink truth)."""
    img = np.full((2400, 2400, 3), GLASS, np.uint8)
    tiles = [synth_tile(448, seed, classes=classes).image  # muscle, stroma, inflammatory, debris: fast to draw
             for seed, classes in enumerate(([4], [5], [3, 5], [6, 4]))]
    img[200:1096, 200:1096] = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])
    tissue = np.zeros(img.shape[:2], bool)
    tissue[200:1096, 200:1096] = True
    ink = np.zeros(img.shape[:2], np.uint8)
    for colour, a, b, width in (((40, 160, 70), (1500, 100), (2300, 2200), 150),  # green marker
                                ((50, 70, 190), (100, 1700), (2300, 1900), 100),  # blue marker
                                ((35, 20, 40), (1300, 200), (1300, 2300), 120)):  # black (purplish) marker
        cv2.line(img, a, b, colour, width)
        cv2.line(ink, a, b, 1, width)
    cv2.putText(img, "B7", (1500, 1000), cv2.FONT_HERSHEY_SIMPLEX, 9, (40, 60, 170), 24)
    cv2.putText(ink, "B7", (1500, 1000), cv2.FONT_HERSHEY_SIMPLEX, 9, 1, 24)
    img = cv2.GaussianBlur(img, (0, 0), 4)  # soft stroke edges, as scanned
    return img, tissue, ink.astype(bool)


def test_pen_marks_are_not_tissue():
    img, tissue, ink = _glass_with_tissue_and_ink()
    reader = ArrayReader(img, 2.0)
    mask, mask_mpp = tissue_mask(reader)
    assert mask.shape == (600, 600) and mask_mpp == pytest.approx(8.0)
    small = lambda a: cv2.resize(a.astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_AREA)  # noqa: E731
    tissue_small, ink_small = small(tissue) > 0.5, small(ink) > 0
    assert mask[tissue_small].mean() > 0.95  # the tissue block is found ...
    assert not (mask & ink_small & ~tissue_small).any()  # ... and no ink on glass, not even stroke edges
    assert abs(mask.sum() - tissue_small.sum()) < 0.05 * tissue_small.sum()


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(np.full((800, 800, 3), GLASS, float) + rng.normal(0, 3, (800, 800, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(ArrayReader(glass, 0.5))[0].any()
    grey = np.full((800, 800, 3), 205, np.uint8)  # a darker, uniform grey background
    assert not tissue_mask(ArrayReader(grey, 0.5), mpp=4.0)[0].any()


def test_synthetic_slide_mask_matches_truth(tmp_path):
    path = write_synthetic_slide(tmp_path / "s.tif", 2048, 2048, mpp=0.5, seed=5, field=256, offset=128, n_fields=3,
                                 tile=256, progress=False)
    with open_slide(path) as r:
        mask, mask_mpp = tissue_mask(r, mpp=4.0)
    truth = SlideTruth(path).tissue(0, 0, 2048, 2048) > 0
    truth_small = cv2.resize(truth.astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_AREA) > 0.5
    assert 0.1 < truth_small.mean() < 0.9
    assert (mask == truth_small).mean() > 0.95


def test_save_and_load_mask_scale_to_the_slide(tmp_path):
    reader = ArrayReader(np.full((1000, 1600, 3), 255, np.uint8), 0.5)  # 800 x 500 um
    mask = np.zeros((50, 80), bool)
    mask[10:30, 20:60] = True
    save_mask(tmp_path / "m.png", mask)
    assert sorted(np.unique(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED))) == [0, 255]
    loaded, mpp = load_mask(tmp_path / "m.png", reader)
    np.testing.assert_array_equal(loaded, mask)
    assert mpp == pytest.approx(10.0)
    cv2.imwrite(str(tmp_path / "ones.png"), mask.astype(np.uint8))  # a 0/1 mask counts too
    assert load_mask(tmp_path / "ones.png", reader)[0].sum() == mask.sum()
    with pytest.warns(UserWarning, match="stretched"):
        stretched, _ = load_mask(tmp_path / "m.png", ArrayReader(np.zeros((1600, 1600, 3), np.uint8), 0.5))
    assert stretched.shape == (80, 80)
    (tmp_path / "bad.png").write_text("not a mask")
    with pytest.raises(CerberusError, match="not an image"):
        load_mask(tmp_path / "bad.png", reader)
    with pytest.raises(CerberusError, match="not found"):
        load_mask(tmp_path / "nope.png", reader)
    with pytest.raises(CerberusError, match=".png"):
        save_mask(tmp_path / "m.jpg", mask)


def test_box_fractions_in_level0_coordinates():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half, at 8 um/px
    slide_mpp = 0.5  # one mask pixel = 16 x 16 level-0 pixels
    assert mask_fraction(mask, 8.0, (0, 0, 80, 160), slide_mpp) == 1.0
    assert mask_fraction(mask, 8.0, (80, 0, 160, 160), slide_mpp) == 0.0
    assert mask_fraction(mask, 8.0, (40, 40, 120, 120), slide_mpp) == pytest.approx(0.5)
    assert mask_fraction(mask, 8.0, (-160, 0, 0, 160), slide_mpp) == 0.0  # left of the slide
    assert mask_fraction(mask, 8.0, (-80, 0, 80, 160), slide_mpp) == pytest.approx(0.5)  # half off the slide
    assert mask_fraction(mask, 8.0, (79, 3, 80, 4), slide_mpp) == 1.0  # a box inside one mask pixel
    boxes = np.array([[0, 0, 80, 80], [70, 0, 150, 80], [100, 0, 180, 80], [2000, 2000, 2100, 2100]])
    np.testing.assert_allclose(box_fractions(mask, 8.0, boxes, slide_mpp), [1, 1 / 6, 0, 0])  # 70..150 -> px 4..9
    assert mask_tiles(mask, 8.0, boxes, slide_mpp).tolist() == [True, True, False, False]
    assert mask_tiles(mask, 8.0, boxes, slide_mpp, min_fraction=0.5).tolist() == [True, False, False, False]
