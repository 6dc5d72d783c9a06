"""Readers: the in-memory reader, image files, and whole slides (synthetic pyramids and the real CMU slide)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.errors import CerberusError
from cerberus_histo.io.readers import IMAGE_SUFFIXES, ArrayReader, read_image, to_rgb8
from cerberus_histo.io.slides import SlideReader, open_slide

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
needs_cmu = pytest.mark.skipif(not CMU.is_file(), reason=f"real slide {CMU} not present")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A 2048 x 1536 synthetic pyramid at 0.25 um/px: levels at 0.25, 0.5, 1 and 2 um/px."""
    root = tmp_path_factory.mktemp("readers")
    return write_synthetic_slide(root / "s.tif", 2048, 1536, mpp=0.25, seed=3, field=256, offset=128, n_fields=2,
                                 tile=256, progress=False)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)


# ---------------------------------------------------------------- ArrayReader


def test_native_read_is_the_slice_and_a_copy(image):
    r = ArrayReader(image, 0.5)
    assert r.dimensions == (120, 100) and r.mpp == 0.5 and r.level_mpps == [0.5]
    out = r.read_region((10, 20), (30, 40))
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, image[20:60, 10:40])
    out[:] = 0
    assert image[20:60, 10:40].any(), "read_region must not hand out a view of the image"
    np.testing.assert_array_equal(r.read_region((0, 0), (120, 100), 0.5), image)


def test_out_of_bounds_is_white_and_negative_locations_work(image):
    r = ArrayReader(image, 0.5)
    out = r.read_region((-5, -7), (20, 20))
    assert out.shape == (20, 20, 3)
    assert (out[:7] == 255).all() and (out[:, :5] == 255).all()
    np.testing.assert_array_equal(out[7:, 5:], image[:13, :15])
    tail = r.read_region((110, 95), (20, 10))
    np.testing.assert_array_equal(tail[:5, :10], image[95:, 110:])
    assert (tail[5:] == 255).all() and (tail[:, 10:] == 255).all()
    assert (r.read_region((500, -300), (16, 8), 2.0) == 255).all()


def test_double_mpp_averages_2x2_blocks_at_the_right_place():
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (64, 1, 3))  # value = x
    r = ArrayReader(ramp, 0.5)
    out = r.read_region((10, 4), (20, 8), 1.0)
    assert out.shape == (8, 20, 3)
    expected = 10.5 + 2 * np.arange(20)  # mean of columns 10+2j and 11+2j
    assert np.abs(out[0, :, 0] - expected).max() <= 0.5
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    down = ArrayReader(img, 0.25).read_region((0, 0), (32, 32), 0.5).astype(float)
    blocks = img.reshape(32, 2, 32, 2, 3).astype(float).mean((1, 3))
    assert np.abs(down - blocks).max() <= 1


def test_half_mpp_upsamples_and_round_trips():
    img = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8), (0, 0), 3)
    r = ArrayReader(img, 0.5)
    up = r.read_region((8, 8), (64, 64), 0.25)  # 32 x 32 level-0 pixels
    assert up.shape == (64, 64, 3)
    back = cv2.resize(up, (32, 32), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(back - img[8:40, 8:40]).mean() < 2


def test_non_integer_ratio_shapes_and_thumbnail(image):
    r = ArrayReader(image, 0.499)
    assert r.read_region((3, 3), (33, 17), 0.5).shape == (17, 33, 3)
    assert r.read_region((0, 0), (7, 5), 3.3).shape == (5, 7, 3)
    assert r.thumbnail(2.0).shape == (25, 30, 3)
    with pytest.raises(ValueError):
        r.read_region((0, 0), (0, 5))
    with pytest.raises(CerberusError, match="microns per pixel"):
        r.read_region((0, 0), (4, 4), -1)
    with pytest.raises(CerberusError, match="microns per pixel"):
        ArrayReader(image, 0)
    with ArrayReader(image, 0.5) as ctx:
        assert ctx.read_region((0, 0), (2, 2)).shape == (2, 2, 3)


# ---------------------------------------------------------------- to_rgb8 / read_image


def test_to_rgb8_conversions_warn_once():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half transparent
    with pytest.warns(UserWarning, match="RGBA to RGB on white") as rec:
        out = to_rgb8(rgba, "x.png")
    assert len(rec) == 1 and "x.png" in str(rec[0].message)
    assert out[:2, :, 0].tolist() == [[200] * 4] * 2 and (out[:2, :, 1:] == 0).all() and (out[2:] == 255).all()
    with pytest.warns(UserWarning, match="greyscale"):
        assert to_rgb8(np.full((3, 5), 7, np.uint8)).shape == (3, 5, 3)
    with pytest.warns(UserWarning, match="uint16") as rec:
        out = to_rgb8(np.array([[0, 257, 65535]], np.uint16))
    assert len(rec) == 1 and out[0, :, 0].tolist() == [0, 1, 255]
    with pytest.warns(UserWarning, match="float32"):
        out = to_rgb8(np.full((2, 2, 3), 0.5, np.float32))
    assert (out == 128).all()
    with pytest.warns(UserWarning, match="bool"):
        assert to_rgb8(np.eye(3, dtype=bool))[0, 0].tolist() == [255, 255, 255]
    ok = np.zeros((2, 2, 3), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb8(ok) is ok
    with pytest.raises(CerberusError, match="shape"):
        to_rgb8(np.zeros((2, 2, 5), np.uint8))


def test_read_image_formats_in_rgb_order(tmp_path):
    img = np.zeros((6, 8, 3), np.uint8)
    img[..., 0] = 250  # red
    cv2.imwrite(str(tmp_path / "a.png"), img[..., ::-1])
    cv2.imwrite(str(tmp_path / "a.bmp"), img[..., ::-1])
    tifffile.imwrite(tmp_path / "a.tif", img)
    for name in ("a.png", "a.bmp", "a.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), img)
    cv2.imwrite(str(tmp_path / "a.jpg"), img[..., ::-1])
    assert np.abs(read_image(tmp_path / "a.jpg").astype(int) - img).max() < 8
    cv2.imwrite(str(tmp_path / "g16.png"), np.full((4, 4), 65535, np.uint16))
    with pytest.warns(UserWarning, match="uint16"):
        assert (read_image(tmp_path / "g16.png") == 255).all()
    assert ".png" in IMAGE_SUFFIXES and ".tiff" in IMAGE_SUFFIXES


@pytest.mark.parametrize("case, words", [("missing", "not found"), ("empty", "0 bytes"), ("text", "not an image"),
                                         ("truncated", "truncated")])
def test_read_image_errors_are_one_line(tmp_path, case, words):
    path = tmp_path / "x.png"
    if case == "empty":
        path.touch()
    elif case == "text":
        path.write_text("id,label\n1,tumour\n")
    elif case == "truncated":
        ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        path.write_bytes(buf.tobytes()[:200])
    with pytest.raises(CerberusError) as exc:
        read_image(path)
    assert words in _one_line(exc) and "x.png" in str(exc.value)


# ---------------------------------------------------------------- slides


def test_synthetic_slide_mpp_and_levels(slide):
    with open_slide(slide) as r:
        assert isinstance(r, SlideReader) and r.backend == "openslide"
        assert r.mpp == pytest.approx(0.25) and r.dimensions == (2048, 1536)
        assert r.level_mpps == pytest.approx([0.25, 0.5, 1.0, 2.0])
        assert float(r.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert [r.best_level(m) for m in (0.1, 0.25, 0.4, 0.5, 0.497, 0.9, 1.0, 1.9, 1.99, 8.0)] == \
            [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # 1% tolerance: 0.5 serves 0.497


def _tissue_location(r, size: int) -> tuple[int, int]:
    """A level-0 location whose size x size region holds tissue (the most saturated one on a coarse grid)."""
    thumb = r.thumbnail(4.0)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1].astype(float)
    k = round(size * r.mpp / 4.0)
    scores = cv2.blur(sat, (k, k))[k // 2:-k, k // 2:-k]
    y, x = np.unravel_index(np.argmax(scores), scores.shape)
    return round(x * 4.0 / r.mpp), round(y * 4.0 / r.mpp)


def test_coarser_mpp_reads_a_level_and_matches_the_downsample(slide):
    with open_slide(slide) as r:
        loc = _tissue_location(r, 512)
        full = r.read_region(loc, (512, 512))
        assert full.std() > 20, "the test region should hold tissue"
        for mpp, size in ((0.5, 256), (1.0, 128), (0.75, 171)):
            region = r.read_region(loc, (size, size), mpp)
            assert region.shape == (size, size, 3)
            ref = cv2.resize(full, (size, size), interpolation=cv2.INTER_AREA).astype(float)
            err = np.abs(region - ref).mean()  # JPEG levels differ a little from a downsample of level 0 ...
            shifted = np.abs(region[:-1, :-1] - ref[1:, 1:]).mean()  # ... much less than a 1-pixel shift does
            assert err < 7 and err < 0.5 * shifted, (mpp, err, shifted)
        edge = r.read_region((1900, 1400), (200, 200), 1.0)  # 400 x 400 level-0 px, half outside
        assert (edge[75:, :] == 255).all() and (edge[:, 75:] == 255).all() and not (edge[:70, :70] == 255).all()
        assert (r.read_region((-4000, 0), (10, 10), 2.0) == 255).all()
        thumb = r.thumbnail(8.0)
        assert thumb.shape == (48, 64, 3)


def test_tiffslide_backend_and_pickling_agree(slide):
    with open_slide(slide) as a, SlideReader(slide, backend="tiffslide") as b:
        assert b.mpp == pytest.approx(0.25) and b.level_mpps == pytest.approx(a.level_mpps)
        loc = _tissue_location(a, 256)
        for mpp in (0.25, 0.5):
            ra, rb = a.read_region(loc, (128, 128), mpp), b.read_region(loc, (128, 128), mpp)
            assert np.abs(ra.astype(float) - rb).mean() < 1
        c = pickle.loads(pickle.dumps(a))
        np.testing.assert_array_equal(c.read_region(loc, (64, 64), 0.5), a.read_region(loc, (64, 64), 0.5))
        c.close()


def test_mpp_override_missing_mpp_and_implausible_mpp(tmp_path, slide):
    assert open_slide(slide, mpp=0.3).mpp == 0.3
    with pytest.raises(CerberusError, match="microns per pixel"):
        open_slide(slide, mpp=-2)
    img = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, img, tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(CerberusError) as exc:
        open_slide(bare)
    assert "has no microns-per-pixel in its metadata; pass --mpp" in _one_line(exc)
    with open_slide(bare, mpp=0.5) as r:
        assert r.mpp == 0.5 and r.read_region((0, 0), (512, 512)).shape == (512, 512, 3)
        np.testing.assert_array_equal(r.read_region((0, 0), (256, 256)), img[:256, :256])
    png = tmp_path / "plain.png"
    cv2.imwrite(str(png), img[..., ::-1])
    with pytest.raises(CerberusError, match="pass --mpp"):
        open_slide(png)
    r = open_slide(png, mpp=0.5)
    assert isinstance(r, ArrayReader) and r.path == png
    np.testing.assert_array_equal(r.read_region((0, 0), (512, 512)), img)
    strips = tmp_path / "strips.tif"  # untiled TIFF with resolution tags -> plain image with its mpp
    tifffile.imwrite(strips, img, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    assert open_slide(strips).mpp == pytest.approx(0.5)
    inch = tmp_path / "inch.tif"  # tiled, resolution in pixels per inch
    tifffile.imwrite(inch, img, tile=(256, 256), photometric="rgb", resolution=(25400 / 0.25, 25400 / 0.25),
                     resolutionunit="INCH")
    assert open_slide(inch).mpp == pytest.approx(0.25)
    dpi72 = tmp_path / "dpi72.tif"  # an image editor's default resolution is no microscope's
    tifffile.imwrite(dpi72, img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(CerberusError, match="pass --mpp"):
        open_slide(dpi72)


def test_bad_slides_are_one_line_errors(tmp_path, slide):
    text = tmp_path / "notes.svs"
    text.write_text("patient 12, block B\n" * 20)
    empty = tmp_path / "empty.svs"
    empty.touch()
    data = slide.read_bytes()
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header.tif"
    header_only.write_bytes(data[:4096])
    cases = [(tmp_path / "missing.svs", "not found"), (tmp_path, "not a file"), (empty, "0 bytes"),
             (text, "not a slide"), (truncated, "corrupt"), (header_only, "corrupt")]
    for path, words in cases:
        with pytest.raises(CerberusError) as exc:
            open_slide(path)
        assert words in _one_line(exc), (path, str(exc.value))


@needs_cmu
def test_real_cmu_slide():
    with open_slide(CMU) as r:
        assert r.backend == "openslide" and r.mpp == pytest.approx(0.499, abs=1e-3)
        assert r.dimensions == (2220, 2967) and r.properties["openslide.vendor"] == "aperio"
        region = r.read_region((1000, 1500), (256, 256), 0.5)
        assert region.shape == (256, 256, 3) and region.std() > 10 and region.mean() < 230
        assert r.read_region((2100, 2900), (256, 256))[100:, 150:].min() == 255  # past the corner
        thumb = r.thumbnail(8.0)
        assert thumb.shape == (185, 139, 3) or thumb.shape == (185, 138, 3)
