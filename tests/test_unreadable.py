"""Slides with damaged tiles (issue 17, item 1): a read that fails is retried once on a fresh handle, then the file
tiles that stay unreadable are filled white and recorded (level-0 boxes in the store's metadata, the slide's summary
and metadata, and the cohort table); the rest of the slide completes, and ``infer-wsi`` exits 3. ``--strict`` makes
such a slide fail."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from conftest import run_cli, slide_model

from cerberus_histo.data.slide import write_synthetic_slide
from cerberus_histo.errors import CerberusError
from cerberus_histo.infer.options import RunOptions
from cerberus_histo.infer.wsi import make_predictor, predict_slide
from cerberus_histo.io.slides import open_slide
from cerberus_histo.models.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

TILE = 128  # the test slides' file tiles (level-0 px); at 4 um/px level 0 is what the model reads
WINDOW = ("--input-shape", "192", "--output-shape", "128")


def damage_tiles(slide: Path, out: Path, tiles: dict[int, str]) -> Path:
    """A copy of ``slide`` whose level-0 file tiles ``{index: how}`` are damaged: ``garbage`` overwrites the
    tile's bytes with random ones, ``truncated`` zeroes the second half (as a write cut short leaves it)."""
    with tifffile.TiffFile(slide) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(slide.read_bytes())
    rng = np.random.default_rng(0)
    for k, how in tiles.items():
        o, n = offsets[k], counts[k]
        if how == "garbage":
            data[o:o + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            data[o + n // 2:o + n] = bytes(n - n // 2)
    out.write_bytes(bytes(data))
    return out


def tile_box(slide: Path, k: int) -> list[int]:
    """The level-0 box ``[x, y, w, h]`` of file tile ``k`` of level 0."""
    with open_slide(slide) as reader:
        cols = -(-reader.dimensions[0] // TILE)
    ty, tx = divmod(k, cols)
    return [tx * TILE, ty * TILE, TILE, TILE]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """A 1024 x 768 synthetic slide at 4 um/px (file tiles of 128 px, 8 x 6 at level 0) and a copy whose two
    darkest (tissue) tiles far apart are damaged, one with garbage, one truncated."""
    root = tmp_path_factory.mktemp("unreadable")
    clean = write_synthetic_slide(root / "clean.tif", 1024, 768, mpp=4.0, seed=7, field=256, offset=128, n_fields=3,
                                  tile=TILE, progress=False)
    with open_slide(clean) as reader:
        image = reader.read_region((0, 0), reader.dimensions)
    means = image.reshape(6, TILE, 8, TILE, 3).mean(axis=(1, 3, 4)).ravel()
    first = int(np.argmin(means))
    far = [k for k in np.argsort(means) if abs(k // 8 - first // 8) + abs(k % 8 - first % 8) >= 5]
    bad = {first: "garbage", int(far[0]): "truncated"}
    damaged = damage_tiles(clean, root / "damaged.tif", bad)
    return {"clean": clean, "damaged": damaged, "bad": sorted(bad), "root": root}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return slide_model(tmp_path_factory.mktemp("model") / "tiny")


def test_reader_retries_then_records_the_damaged_tiles_only(slides):
    clean, damaged = slides["clean"], slides["damaged"]
    boxes = [tile_box(clean, k) for k in slides["bad"]]
    with open_slide(clean) as reader:
        want = reader.read_region((0, 0), reader.dimensions)
    with open_slide(damaged, unreadable="record") as reader:
        got = reader.read_region((0, 0), reader.dimensions)
        again = reader.read_region((0, 0), (64, 64))  # the handle still reads after the failures
        assert sorted(list(b) for b in reader.unreadable) == sorted(boxes)
    assert np.array_equal(again, want[:64, :64])
    white = np.zeros(got.shape[:2], bool)
    for x, y, w, h in boxes:
        white[y:y + h, x:x + w] = True
    assert (got[white] == 255).all()  # the damaged tiles are white, every other pixel is the slide's
    assert np.array_equal(got[~white], want[~white])
    with open_slide(damaged) as reader, pytest.raises(CerberusError, match="cannot read level 0"):
        reader.read_region((0, 0), reader.dimensions)  # the default: a one-line error


def _instances(db: Path) -> list[tuple[str, str, float, float]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT properties, geometry, cx, cy FROM annotations").fetchall()
    finally:
        con.close()
    return sorted((json.loads(p)["task"], g.hex() if g else "", cx, cy) for p, g, cx, cy in rows
                  if json.loads(p)["task"] != "tissue")


def test_slide_with_damaged_tiles_completes_and_records_them(slides, model_dir, tmp_path):
    """The rest of the slide is what the undamaged slide gives: every object farther than one window's reach
    from the damaged tiles is the same object."""
    predictor = make_predictor(load_model(model_dir), input_shape=192, output_shape=128, threads=1,
                               postproc_workers=0)
    config = predictor.model.config
    opts = RunOptions(chunk_size=256, margin_um=256, postproc_workers=0, progress=False)
    lines: list[str] = []
    clean = predict_slide(predictor, config, slides["clean"], tmp_path / "clean", opts)
    res = predict_slide(predictor, config, slides["damaged"], tmp_path / "damaged", opts.replace(echo=lines.append))
    boxes = sorted(tile_box(slides["clean"], k) for k in slides["bad"])
    assert clean.unreadable == [] and sorted(res.unreadable) == boxes
    assert sum("unreadable region at level 0" in line for line in lines) == 2, lines
    meta = json.loads(res.paths["metadata"].read_text())
    summary = json.loads(res.paths["summary_json"].read_text())
    assert sorted(meta["unreadable_regions"]) == boxes and sorted(summary["unreadable_regions"]) == boxes
    con = sqlite3.connect(res.paths["store"])
    stored = json.loads(con.execute("SELECT value FROM metadata WHERE key = 'unreadable_regions'").fetchone()[0])
    con.close()
    assert sorted(stored) == boxes
    reach = 192 + 64  # a window's input side and the post-processing's context, in px (level 0 = model here)
    near = shapely.union_all([shapely.box(x - reach, y - reach, x + w + reach, y + h + reach) for x, y, w, h in boxes])

    def far(rows):
        return [r for r in rows if not near.contains(shapely.Point(r[2], r[3]))]

    want, got = far(_instances(clean.paths["store"])), far(_instances(res.paths["store"]))
    assert len(want) > 20 and got == want


@pytest.mark.slow
def test_cli_exit_code_table_and_strict(slides, model_dir, tmp_path):
    """infer-wsi on a damaged and a good slide: exit 3, the damaged slide's row says it completed with unreadable
    regions, the good one is done; a re-run skips both and says it again; --strict fails the damaged slide."""
    args = ["--model", model_dir, "--input", slides["damaged"], "--input", slides["clean"], *WINDOW,
            "--chunk-size", "256", "--postproc-workers", "0"]
    out = tmp_path / "out"
    proc = run_cli("infer-wsi", *args, "--output", out)
    assert proc.returncode == 3, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split(None, 4)[1:] for line in proc.stdout.splitlines()[1:3]}
    assert rows["clean.tif"][0] == "done" and rows["damaged.tif"][0] == "unreadable", proc.stdout
    assert "completed with 2 unreadable regions" in rows["damaged.tif"][3]
    assert (out / "done" / "damaged.json").is_file() and (out / "damaged.db").is_file()
    assert "1 completed with unreadable regions, 0 failed" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: 1 of 2 slides completed with unreadable regions") and "Traceback" not in proc.stderr

    again = run_cli("infer-wsi", *args, "--output", out)
    assert again.returncode == 3 and "completed before with 2 unreadable regions" in again.stdout, again.stdout

    strict = run_cli("infer-wsi", *args, "--strict", "--output", tmp_path / "strict")
    assert strict.returncode == 2, strict.stderr[-2000:]
    rows = {line.split()[0]: line.split(None, 4)[1:] for line in strict.stdout.splitlines()[1:3]}
    assert rows["damaged.tif"][0] == "failed" and "cannot read level 0" in rows["damaged.tif"][3]
    assert rows["clean.tif"][0] == "done"
    assert not (tmp_path / "strict" / "done" / "damaged.json").exists()
    assert not (tmp_path / "strict" / "damaged.db").exists()
