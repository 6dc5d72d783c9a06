import numpy as np
import pytest

from cerberus_histo.data.augment import Augmenter
from cerberus_histo.data.synthetic import synth_tile


@pytest.fixture(scope="module")
def tile():
    return synth_tile(520, 4)


def test_deterministic_given_seed(tile):
    aug = Augmenter("seg", 448, stain=True)
    a = aug(tile.image, {"n": tile.nuclei_inst}, seed=11)
    b = aug(tile.image, {"n": tile.nuclei_inst}, seed=11)
    c = aug(tile.image, {"n": tile.nuclei_inst}, seed=12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1]["n"], b[1]["n"])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("seed", range(5))
def test_labels_follow_the_image(tile, seed):
    inst, tissue = tile.nuclei_inst, tile.tissue.astype(np.int32)
    img, maps = Augmenter("seg", 448)(tile.image, {"inst": inst, "double": inst * 2, "tissue": tissue}, seed=seed)
    assert img.shape == (448, 448, 3) and img.dtype == np.uint8
    assert maps["inst"].dtype == np.int32 and maps["inst"].shape == (448, 448)
    assert np.array_equal(maps["double"], maps["inst"] * 2)  # every map gets the same geometry
    assert set(np.unique(maps["inst"])) <= set(np.unique(inst))  # nearest neighbour: no new ids
    grey = img.mean(-1)
    assert grey[maps["inst"] > 0].mean() < grey[maps["inst"] == 0].mean() - 30  # nuclei stay on dark pixels


def test_valid_mode_is_a_centre_crop(tile):
    img, maps = Augmenter("valid", 448)(tile.image, {"inst": tile.nuclei_inst})
    assert np.array_equal(img, tile.image[36:484, 36:484]) and np.array_equal(maps["inst"], tile.nuclei_inst[36:484, 36:484])


def test_class_mode_and_small_inputs(tile):
    img, _ = Augmenter("class", 144)(tile.image[:150, :150], seed=1)
    assert img.shape == (144, 144, 3)
    img, maps = Augmenter("seg", 448)(tile.image[:300, :300], {"inst": tile.nuclei_inst[:300, :300]}, seed=2)
    assert img.shape == (448, 448, 3) and maps["inst"].shape == (448, 448)  # reflect-padded


def test_colour_changes_over_seeds(tile):
    aug = Augmenter("seg", 448)
    stats = np.array([aug(tile.image, seed=s)[0].reshape(-1, 3).mean(0) for s in range(8)])
    assert stats.std(0).max() > 2  # hue, saturation, brightness and contrast vary
    stds = [aug(tile.image, seed=s)[0].std() for s in range(8)]
    assert max(stds) / min(stds) > 1.1  # the contrast jitter does something (the original's did not)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        Augmenter("elastic", 448)
