import numpy as np
import openslide
import pytest
import tiffslide
from conftest import assert_clean_error, run_cli

from cerberus_histo.data.slide import ID_STRIDE, SlideTruth, write_synthetic_slide

SMALL = dict(field=256, offset=128, n_fields=3, tile=256, progress=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    jpeg = write_synthetic_slide(root / "s.tif", 1500, 1100, seed=1, **SMALL)
    flat = write_synthetic_slide(root / "s_deflate.tif", 1500, 1100, seed=1, compression="deflate", **SMALL)
    return jpeg, flat


def test_readers_see_a_pyramid_with_the_right_mpp(slides):
    jpeg, _ = slides
    s = openslide.OpenSlide(str(jpeg))
    assert s.dimensions == (1500, 1100) and s.level_count == 4
    assert s.level_dimensions[1] == (750, 550) and s.level_downsamples[3] == pytest.approx(8, rel=0.01)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5) == float(s.properties["openslide.mpp-y"])
    t = tiffslide.TiffSlide(str(jpeg))
    assert t.dimensions == (1500, 1100) and float(t.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)


def test_levels_and_compression_agree(slides):
    jpeg, flat = slides
    a = np.asarray(openslide.OpenSlide(str(jpeg)).read_region((0, 0), 0, (1500, 1100)).convert("RGB"), float)
    b = np.asarray(openslide.OpenSlide(str(flat)).read_region((0, 0), 0, (1500, 1100)).convert("RGB"), float)
    assert np.abs(a - b).mean() < 3  # JPEG at quality 90 vs lossless
    level1 = np.asarray(openslide.OpenSlide(str(flat)).read_region((0, 0), 1, (750, 550)).convert("RGB"), float)
    down = b.reshape(550, 2, 750, 2, 3).mean((1, 3))
    assert np.abs(level1 - down).mean() < 3


def test_truth_matches_the_image(slides):
    _, flat = slides
    img = np.asarray(openslide.OpenSlide(str(flat)).read_region((0, 0), 0, (1500, 1100)).convert("RGB"))
    truth = SlideTruth(flat)
    inst, classes = truth.read_region("nuclei", 0, 0, 1500, 1100)
    grey = img.mean(-1)
    assert grey[inst > 0].mean() < grey[inst == 0].mean() - 60  # nuclei lie on dark pixels
    assert set(classes.values()) <= set(range(1, 7)) and set(classes) == set(np.unique(inst[inst > 0]).tolist())
    tissue = truth.tissue(0, 0, 1500, 1100)
    assert (tissue == 0).any() and np.percentile(grey[tissue == 0], 1) > 200  # background is white
    assert np.all(inst[tissue == 0] == 0)  # and holds no nuclei
    # a sub-region read is the crop of a larger read, with the same ids
    sub, sub_classes = truth.read_region("nuclei", 300, 200, 400, 300)
    assert np.array_equal(sub, inst[200:500, 300:700])
    assert all(classes[k] == v for k, v in sub_classes.items())
    # lumina lie in the gland their id points to
    lumen, parent = truth.read_region("lumen", 0, 0, 1500, 1100)
    gland, _ = truth.read_region("gland", 0, 0, 1500, 1100)
    assert parent and all(np.all(gland[lumen == lid] == gid) for lid, gid in parent.items())


def test_objects_cross_round_chunk_borders(slides):
    """The field grid is offset, so objects straddle borders at multiples of 512 (what the WSI engine tests need)."""
    truth = SlideTruth(slides[0])
    inst, _ = truth.read_region("nuclei", 0, 0, 1500, 1100)
    lay = truth.layout
    field_borders = {c * lay.field - lay.offset for c in range(lay.ncols + 1)}
    assert not field_borders & set(range(0, 1500, 512))  # round chunk borders fall inside fields
    crossing = set()
    for b in range(64, 1500, 64):
        if b not in field_borders:
            crossing |= (set(np.unique(inst[:, b - 1])) & set(np.unique(inst[:, b]))) - {0}
    assert crossing  # so objects straddle such borders
    assert len({int(i) // ID_STRIDE for i in np.unique(inst[inst > 0])}) > 1  # ids unique across fields


def test_deterministic(tmp_path, slides):
    again = write_synthetic_slide(tmp_path / "s.tif", 1500, 1100, seed=1, **SMALL)
    assert again.read_bytes() == slides[0].read_bytes()


def test_cli_and_bad_input(tmp_path):
    proc = run_cli("synth", "slide", "--out", tmp_path / "c.tif", "--width", "600", "--height", "500",
                   "--field", "256", "--fields", "2", "--mpp", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert float(openslide.OpenSlide(str(tmp_path / "c.tif")).properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert (tmp_path / "c.truth.json").exists() and (tmp_path / "c.truth.npz").exists()
    assert_clean_error(run_cli("synth", "slide", "--out", tmp_path / "d.tif", "--width", "10", "--height", "500"),
                       "64 x 64")
    assert_clean_error(run_cli("synth", "slide", "--out", tmp_path / "d.png", "--width", "100", "--height", "100"),
                       ".tif")
    assert not list(tmp_path.glob("d*"))


@pytest.mark.slow
def test_memory_does_not_grow_with_slide_size(tmp_path):
    import tracemalloc

    peaks = []
    for side in (2048, 6144):  # 9x the pixels
        tracemalloc.start()
        write_synthetic_slide(tmp_path / f"m{side}.tif", side, side, seed=0, field=256, offset=128, n_fields=2,
                              tile=512, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks
