"""Every geometry of a run lies inside its image and inside the user's mask, a mask with a hole included: slides
(store rows and GeoJSON; a synthetic slide whose size is a multiple of neither the chunk nor the cell, and
CMU-1-Small-Region.svs where present) and tiles (``infer-tile --mask``)."""

from __future__ import annotations

import json
import sqlite3
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from conftest import REPO, slide_model

from cerberus_histo import Cerberus
from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.infer.tiles import infer_tiles
from cerberus_histo.io.readers import ArrayReader
from cerberus_histo.io.slides import open_slide

CMU = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
#: the tiny model at 4 um/px, as tests/test_wsi.py runs it: a 256-px chunk is 2048 level-0 px at 0.5 um/px, a
#: 16-px cell 128; the synthetic slide below is a multiple of neither
RUN = dict(input_shape=192, output_shape=128, chunk_size=256, batch_size=1, postproc_workers=0, precision="fp32",
           progress=False)
TOL = 1e-6  # level-0 px: floating-point rounding of a cut, nothing more
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return slide_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """2500 x 1900 level-0 px (312.5 x 237.5 model px): not a multiple of the 256-px chunk or the 16-px cell."""
    return write_synthetic_slide(tmp_path_factory.mktemp("bounds") / "odd.tif", 2500, 1900, seed=7, field=256,
                                 offset=128, n_fields=3, tile=256, progress=False, tissue_fraction=1.0)


def ring_mask(path: Path, width: int, height: int) -> np.ndarray:
    """A ring-shaped mask image (``width`` x ``height`` px): tissue between two circles, a hole in the middle."""
    yy, xx = np.mgrid[:height, :width]
    r = np.hypot(xx - width / 2, yy - height / 2)
    side = min(width, height)
    mask = (r < 0.48 * side) & (r > 0.2 * side)
    cv2.imwrite(str(path), mask.astype(np.uint8) * 255)
    return mask


def region_of(path: Path, reader):
    """The mask image at ``path`` over ``reader``'s image as the runs read it (:func:`~cerberus_histo.io.tissue.
    load_mask`: stretched to the image's width, its pixels kept square), as one shapely geometry in image px."""
    from cerberus_histo.io.tissue import load_mask
    from cerberus_histo.outputs.records import mask_region

    mask, mask_mpp = load_mask(path, reader)
    w, h = reader.dimensions
    return shapely.intersection(mask_region(mask, mask_mpp / reader.mpp), shapely.box(0, 0, w, h))


def store_geometries(db: Path) -> list:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT geometry, cx, cy FROM annotations").fetchall()
    finally:
        con.close()
    return [shapely.from_wkb(zlib.decompress(blob)) if blob else shapely.Point(cx, cy) for blob, cx, cy in rows]


def geojson_geometries(path: Path) -> list:
    from shapely.geometry import shape

    data = json.loads(path.read_text())
    features = data["features"] if isinstance(data, dict) else data
    return [shape(f["geometry"]) for f in features]


def outside(geoms, bounds) -> list:
    """The geometries not covered by ``bounds`` (grown by :data:`TOL`)."""
    grown = shapely.buffer(bounds, TOL)
    shapely.prepare(grown)
    return [g.wkt[:120] for g in geoms if not shapely.covers(grown, g)]


def check_slide(model_dir: Path, slide: Path, tmp_path: Path) -> int:
    reader = open_slide(slide)
    w0, h0 = reader.dimensions
    mw = 250
    ring_mask(tmp_path / "ring.png", mw, max(1, round(mw * h0 / w0)))
    frame = shapely.box(0, 0, w0, h0)
    region = region_of(tmp_path / "ring.png", reader)
    hole = shapely.Point(w0 / 2, h0 / 2)
    assert not region.contains(hole) and len(shapely.get_parts(region)[0].interiors) == 1  # the mask has a hole
    model = Cerberus.load(model_dir)
    masked = model.predict_wsi(slide, tmp_path / "masked", mask=tmp_path / "ring.png", **RUN)
    plain = model.predict_wsi(slide, tmp_path / "plain", **RUN)
    n = 0
    for res, bounds in ((masked, region), (plain, frame)):
        for name, geoms in (("store", store_geometries(res.paths["store"])),
                            ("geojson", geojson_geometries(res.paths["geojson"]))):
            assert geoms, (slide.name, name)
            assert not outside(geoms, frame), (slide.name, name, "outside the slide", outside(geoms, frame)[:3])
            assert not outside(geoms, bounds), (slide.name, name, "outside the mask", outside(geoms, bounds)[:3])
            n += len(geoms)
    # the mask removed something: the plain run has objects in the hole or outside the ring, the masked one none
    plain_geoms = store_geometries(plain.paths["store"])
    assert outside(plain_geoms, region)
    return n


def test_slide_geometries_inside_the_slide_and_a_ring_mask(model_dir, synth, tmp_path):
    assert check_slide(model_dir, synth, tmp_path) > 0


def test_real_slide_geometries_inside_the_slide_and_a_ring_mask(model_dir, tmp_path):
    if not CMU.is_file():
        pytest.skip(f"{CMU} not found: the real slide is absent")
    assert check_slide(model_dir, CMU, tmp_path) > 0


def test_tile_geometries_inside_the_tile_and_a_ring_mask(model_dir, synth, tmp_path):
    """infer-tile --mask: one mask for every tile, or a folder of masks per tile; the mask's contents are a
    setting of the result."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    rgb = open_slide(synth).thumbnail(2.0)  # 1250 x 950 px at 2 um/px: 625 x 475 model px
    h, w = rgb.shape[:2]
    cv2.imwrite(str(tiles / "t0.png"), np.ascontiguousarray(rgb[..., ::-1]))
    cv2.imwrite(str(tiles / "t1.png"), np.ascontiguousarray(rgb[::-1, :, ::-1]))
    ring_mask(tmp_path / "ring.png", 100, 76)
    frame = shapely.box(0, 0, w, h)
    region = region_of(tmp_path / "ring.png", ArrayReader(rgb, 2.0))
    settings = dict(mpp=2.0, input_shape=192, output_shape=128, batch_size=1, postproc_workers=0, precision="fp32",
                    progress=False, formats=("geojson", "sqlite", "npz", "csv"))
    plain = infer_tiles(model_dir, tiles, tmp_path / "plain", **settings)
    said: list[str] = []
    masked = infer_tiles(model_dir, tiles, tmp_path / "masked", mask=tmp_path / "ring.png", echo=said.append,
                         **settings)
    assert plain.done == masked.done == ["t0.png", "t1.png"] and not masked.failed, said
    for stem in ("t0", "t1"):
        plain_geoms = store_geometries(tmp_path / "plain" / f"{stem}.db")
        assert plain_geoms and outside(plain_geoms, region)  # the mask has something to remove
        for geoms in (store_geometries(tmp_path / "masked" / f"{stem}.db"),
                      geojson_geometries(tmp_path / "masked" / f"{stem}.geojson")):
            assert geoms and not outside(geoms, frame) and not outside(geoms, region), outside(geoms, region)[:3]
        # the rule for an object crossing the mask (docs/wsi.md, Masks): kept when its centroid is inside, cut
        con = sqlite3.connect(tmp_path / "masked" / f"{stem}.db")
        centroids = con.execute("SELECT cx, cy FROM annotations WHERE properties NOT LIKE '%\"tissue\"%'").fetchall()
        con.close()
        assert centroids and not outside([shapely.Point(c) for c in centroids], region)
        marker = json.loads((tmp_path / "masked" / "done" / f"{stem}.json").read_text())
        assert marker["settings"]["mask"].startswith("sha1:")
        assert "mask" not in json.loads((tmp_path / "plain" / "done" / f"{stem}.json").read_text())["settings"]
    # the same mask again: skipped; new contents at the same path: redone, saying so
    again = infer_tiles(model_dir, tiles, tmp_path / "masked", mask=tmp_path / "ring.png", **settings)
    assert again.skipped == ["t0.png", "t1.png"] and not again.done
    ring_mask(tmp_path / "ring.png", 100, 80)
    said.clear()
    again = infer_tiles(model_dir, tiles, tmp_path / "masked", mask=tmp_path / "ring.png", echo=said.append,
                        **settings)
    assert again.done == ["t0.png", "t1.png"] and any("other settings (mask)" in s for s in said), said
    # a folder of masks: one per tile; a tile without its mask fails alone
    masks = tmp_path / "masks"
    masks.mkdir()
    ring_mask(masks / "t0.png", 100, 76)
    per = infer_tiles(model_dir, tiles, tmp_path / "per", mask=masks, echo=said.append, **settings)
    assert per.done == ["t0.png"] and "no mask for t1.png" in per.failed["t1.png"]
    assert not outside(store_geometries(tmp_path / "per" / "t0.db"), region)


def test_cli_infer_tile_takes_a_mask(model_dir, tmp_path):
    from conftest import run_cli

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tiles / "a.png"), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    ring_mask(tmp_path / "m.png", 64, 48)
    proc = run_cli("infer-tile", "--model", model_dir, "--input", tiles, "--output", tmp_path / "out", "--mask",
                   tmp_path / "m.png", "--mpp", "4", "--input-shape", "192", "--output-shape", "128",
                   "--postproc-workers", "0", "--formats", "geojson")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "done" / "a.json").read_text())["settings"]["mask"].startswith("sha1:")
    proc = run_cli("infer-tile", "--model", model_dir, "--input", tiles, "--output", tmp_path / "out2", "--mask",
                   tmp_path / "missing.png")
    assert proc.returncode != 0 and "missing.png not found" in proc.stderr
