"""Whole-slide inference: chunks merge exactly like one pass, truth is recovered, resume is exact, many slides run
on Dask, and bad slides fail alone with their reason."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import tifffile
from conftest import REPO, assert_clean_error, run_cli, slide_model
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.slide import SlideTruth, write_synthetic_slide
from cerberus_histo.infer.chunks import TISSUE_PAD_UM, mask_cells, plan_chunks, window_keeper
from cerberus_histo.infer.options import RunOptions
from cerberus_histo.infer.results import RegionPrediction
from cerberus_histo.infer.tiling import Geometry, plan_tiles
from cerberus_histo.infer.wsi import SlideJob, WSIResult, predict_slide
from cerberus_histo.io.grid import GridReader
from cerberus_histo.io.slides import open_slide
from cerberus_histo.io.tissue import tissue_mask
from cerberus_histo.outputs.records import annotation_records
from cerberus_histo.outputs.store import AnnotationStore
from cerberus_histo.postproc import postprocess

CMU = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
CONFIG = ModelConfig.preset("original", encoder="tiny")
SMALL = dict(field=256, offset=128, n_fields=2, tile=256, progress=False)
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# ---- an oracle: the truth as probabilities (checks chunking and merging exactly, no network) ----------------
def _interior(inst: np.ndarray, size: int) -> np.ndarray:
    """Pixels whose ``size`` x ``size`` neighbourhood lies in one instance (the eroded interior)."""
    _, rank = np.unique(inst, return_inverse=True)
    lab = rank.reshape(inst.shape).astype(np.float32)  # small exact values for OpenCV's fast min/max filters
    k = np.ones((size, size), np.uint8)
    lo = cv2.erode(lab, k, borderType=cv2.BORDER_REPLICATE)
    return (inst > 0) & (lo == cv2.dilate(lab, k, borderType=cv2.BORDER_REPLICATE))


class Oracle:
    """A predictor whose probabilities are a synthetic slide's truth (interior / contour band / type one-hot, the
    tissue class at each cell's centre). Like the engine, windows that ``keep`` rejects stay 0; the kept windows'
    global output crops are recorded."""

    def __init__(self, slide: Path):
        self.truth, self.geometry, self.cell = SlideTruth(slide), Geometry(256, 128, fit=False), 16
        self.mpp = self.truth.mpp
        self.kept: list[tuple[int, int, int, int]] = []

    def predict_region(self, reader, region, progress=None, keep=None, fit=None) -> RegionPrediction:
        x, y, w, h = region
        probs = {}
        for task, size, n_cls in (("nuclei", 3, 7), ("gland", 11, 3), ("lumen", 3, None)):
            inst, classes = self.truth.read_region(task, x, y, w, h)
            inner = _interior(inst, size)
            p = np.zeros((3, h, w), np.float16)
            p[0][inst == 0], p[1][inner], p[2][(inst > 0) & ~inner] = 1, 1, 1
            probs[f"{task}-inst"] = p
            if n_cls:
                lut = np.zeros(int(inst.max(initial=0)) + 1, np.int64)
                lut[list(classes)] = list(classes.values())
                probs[f"{task}-type"] = (np.arange(n_cls)[:, None, None] == lut[inst][None]).astype(np.float16)
        ch, cw = -(-h // 16), -(-w // 16)
        tissue = self.truth.tissue(x, y, cw * 16, ch * 16)[8::16, 8::16]
        probs["tissue-class"] = (np.arange(9)[:, None, None] == tissue[None]).astype(np.float16)
        tiles = plan_tiles(w, h, self.geometry, fit).tiles()
        flags = np.ones(len(tiles), bool) if keep is None else np.asarray(keep(tiles))
        for t, k in zip(tiles, flags, strict=True):
            x0, y0, x1, y1 = t.crop
            if k:
                self.kept.append((x + x0, y + y0, x + x1, y + y1))
                continue
            for name, p in probs.items():
                if name == "tissue-class":
                    p[:, y0 // 16:-(-y1 // 16), x0 // 16:-(-x1 // 16)] = 0
                else:
                    p[:, y0:y1, x0:x1] = 0
        return RegionPrediction(probs, region, self.mpp, 16, int(flags.sum()), {"forward": 0.0})


# ---- helpers -----------------------------------------------------------------------------------------------
def store_rows(db: Path, table: str = "annotations") -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        con.close()


def instance_set(db: Path) -> list[tuple[str, str, str]]:
    """(task, WKB hex, class) of every instance in a store."""
    out = []
    for blob, props, cx, cy in store_rows_q(db, "SELECT geometry, properties, cx, cy FROM annotations"):
        p = json.loads(props)
        if p["task"] != "tissue":
            g = shapely.from_wkb(zlib.decompress(blob)) if blob else shapely.Point(cx, cy)
            out.append((p["task"], shapely.to_wkb(g, hex=True), p["type"]))
    return sorted(out)


def store_rows_q(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def one_pass(predictor, slide: Path):
    """The slide predicted as ONE region by the same predictor (same reading grid, same tissue windows), post-
    processed as a tile: ``(instances as in instance_set, masked tissue-class map)``."""
    reader = open_slide(slide)
    mask, mask_mpp = tissue_mask(reader)
    scale = predictor.mpp / reader.mpp
    w, h = (max(1, round(v / scale)) for v in reader.dimensions)
    keep = window_keeper(mask, mask_mpp, reader.mpp, scale, (0, 0), predictor.geometry.margin,
                         TISSUE_PAD_UM / reader.mpp)
    pred = predictor.predict_region(GridReader(reader, predictor.mpp), (0, 0, w, h), keep=keep)
    res = postprocess({k: v for k, v in pred.probs.items() if k != "tissue-class"}, predictor.mpp)
    rec = annotation_records(res, CONFIG, reader.mpp, scale)
    inst = sorted((t, shapely.to_wkb(g, hex=True), r.class_name(k)) for t, r in rec.items()
                  for k, g in enumerate(r.geometry))
    cmap = np.argmax(pred.probs["tissue-class"], axis=0).astype(np.uint8)
    cmap[~mask_cells(mask, mask_mpp, cmap.shape, 16 * scale, reader.mpp)] = 0
    return inst, cmap


def crossing(db: Path, border: float, axis: int) -> int:
    """Objects whose bounds straddle the line ``x = border`` (axis 0) or ``y = border`` (axis 1)."""
    rows = store_rows_q(db, "SELECT r.min_x, r.max_x, r.min_y, r.max_y FROM rtree r")
    return sum(1 for r in rows if r[2 * axis] < border < r[2 * axis + 1])


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 2100 x 1600 px synthetic slide at 0.5 um/px: tissue islands of 512-px fields on white."""
    return write_synthetic_slide(tmp_path_factory.mktemp("wsi") / "synth.tif", 2100, 1600, seed=2, field=512,
                                 offset=128, n_fields=3, tile=256, progress=False)


@pytest.fixture(scope="module")
def oracle_run(synth, tmp_path_factory) -> tuple[Oracle, WSIResult]:
    oracle = Oracle(synth)
    res = predict_slide(oracle, CONFIG, synth, tmp_path_factory.mktemp("oracle"),
                        RunOptions(chunk_size=512, margin_um=128, postproc_workers=0, progress=False))
    return oracle, res


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny six-head network at 4 um/px (small slides are a few windows), random weights with BatchNorm
    statistics measured on random images, so it finds instances."""
    return slide_model(tmp_path_factory.mktemp("model") / "tiny")


WINDOW = ("--input-shape", "192", "--output-shape", "128")


# ---- chunking and merging ----------------------------------------------------------------------------------
def test_chunk_grid_is_on_the_window_grid():
    chunks = plan_chunks(1000, 700, 128, 300, 100, 16)  # margin 100 -> 112 px (cells of 16)
    assert [c.core[:2] for c in chunks[:4]] == [(0, 0), (384, 0), (768, 0), (0, 384)]
    assert all(c.net[0] % 128 == 0 and c.net[1] % 128 == 0 for c in chunks)  # the network on the window grid
    assert chunks[4].core == (384, 384, 768, 700) and chunks[4].ext == (272, 272, 880, 700)  # post-processed
    assert chunks[4].net == (256, 256, 896, 700) and chunks[4].region == (256, 256, 640, 444)
    assert chunks[0].ext == (0, 0, 496, 496) and chunks[0].net == (0, 0, 512, 512)
    cover = np.zeros((700, 1000), int)
    for c in chunks:
        cover[c.core[1]:c.core[3], c.core[0]:c.core[2]] += 1
    assert (cover == 1).all()


def test_oracle_chunks_equal_one_pass_exactly(synth, oracle_run):
    oracle, res = oracle_run
    db = res.paths["store"]
    got = instance_set(db)
    ref, ref_cmap = one_pass(Oracle(synth), synth)
    assert len(got) == len(ref) and got == ref  # same instances, nothing duplicated or lost at seams
    assert cv2.imread(str(res.paths["tissue"]), cv2.IMREAD_UNCHANGED).tolist() == ref_cmap.tolist()
    meta = json.loads(res.paths["metadata"].read_text())
    assert meta["dropped_large_objects"] == 0 and meta["chunks"]["total"] > meta["chunks"]["with_tissue"] > 4
    assert sum(crossing(db, b, 0) for b in (512, 1024, 1536, 2048)) > 20  # merging was exercised
    assert sum(crossing(db, b, 1) for b in (512, 1024, 1536)) > 20


def test_oracle_run_recovers_the_synthetic_truth(synth, oracle_run):
    _, res = oracle_run
    truth = SlideTruth(synth)
    rows = [(json.loads(p), cx, cy) for p, cx, cy in store_rows_q(res.paths["store"],
                                                                  "SELECT properties, cx, cy FROM annotations")]
    for task, radius, recall in (("nuclei", 3.0, 0.97), ("gland", 12.0, 0.9)):
        inst, classes = truth.read_region(task, 0, 0, 2100, 1600)
        ids = np.array(sorted(classes))
        true_xy = np.array(ndi.center_of_mass(np.ones_like(inst), inst, ids))[:, ::-1]
        pred = [(p, cx, cy) for p, cx, cy in rows if p["task"] == task]
        pred_xy = np.array([(cx, cy) for _, cx, cy in pred])
        dist, idx = cKDTree(pred_xy).query(true_xy, distance_upper_bound=radius)
        found = np.isfinite(dist)
        assert found.mean() >= recall, (task, found.mean())
        assert len(pred) <= len(ids) * 1.03  # no duplicates
        names = CONFIG.task(task).class_names
        same = [names[classes[int(i)]] == pred[j][0]["type"] for i, j, f in zip(ids, idx, found, strict=True) if f]
        assert np.mean(same) > 0.95  # and classified as the truth
    glands = {p["id"] for p, _, _ in rows if p["task"] == "gland"}
    lumina = [p for p, _, _ in rows if p["task"] == "lumen"]
    linked = [p for p in lumina if int(p["parent_gland"])]  # 0: the lumen's gland was not found
    assert lumina and len(linked) >= 0.9 * len(lumina)
    assert all(int(p["parent_gland"]) in glands for p in linked)  # slide-wide ids link across chunks


def test_only_tissue_windows_are_inferred_and_outputs_are_complete(synth, oracle_run):
    oracle, res = oracle_run
    reader = open_slide(synth)
    mask, mask_mpp = tissue_mask(reader)
    saved = cv2.imread(str(res.paths["mask"]), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(saved, mask)
    pad = TISSUE_PAD_UM / reader.mpp
    from cerberus_histo.io.tissue import mask_tiles

    boxes = np.array([(x0 - pad, y0 - pad, x1 + pad, y1 + pad) for x0, y0, x1, y1 in oracle.kept], float)
    assert mask_tiles(mask, mask_mpp, boxes, reader.mpp).all()  # every window run touches tissue
    meta = json.loads(res.paths["metadata"].read_text())
    all_windows = len(plan_tiles(2100, 1600, oracle.geometry))
    assert len({k[:2] for k in oracle.kept}) < 0.8 * all_windows  # white glass is skipped
    assert meta["windows"]["run"] < meta["windows"]["in_tissue_chunks"]
    for key in ("store", "geojson", "hovernet", "summary_json", "summary_csv", "thumbnail", "mask", "tissue",
                "metadata", "marker"):
        assert res.paths[key].is_file(), key
    assert {"read", "infer", "postprocess", "write", "outputs", "total", "device_utilisation"} <= set(meta["timings_s"])
    assert meta["processing_mpp"] == 0.5 and meta["mpp"] == pytest.approx(0.5) and "numpy" in meta["software"]
    with AnnotationStore(res.paths["store"]) as store:
        n = store.count()
        assert store.metadata["mpp"] == pytest.approx(0.5) and not list(res.paths["store"].parent.glob("*.partial"))
    features = json.loads(res.paths["geojson"].read_text())["features"]
    assert len(features) == n and sum(res.counts.values()) == n
    nuclei = [f for f in features if f["properties"]["objectType"] == "detection"]
    assert len(nuclei) == res.counts["nuclei"] and nuclei[0]["geometry"]["type"] in ("Polygon", "MultiPolygon")
    summary = json.loads(res.paths["summary_json"].read_text())
    by_tissue = summary["nuclei_by_tissue"]
    assert sum(r["count"] for rows in by_tissue.values() for r in rows.values()) == res.counts["nuclei"]
    assert summary["counts"] == res.counts and summary["analysed_area_um2"] > 0
    assert summary["gland"]["gland"]["count"] + summary["gland"].get("surface-epi", {"count": 0})["count"] \
        == res.counts["gland"]
    csv_rows = res.paths["summary_csv"].read_text().splitlines()
    assert csv_rows[0] == "task,class,tissue_class,count,area_um2,mean_area_um2"
    assert any(r.startswith("lumen,lumen,all,") for r in csv_rows)
    hovernet = json.loads(res.paths["hovernet"].read_text())
    assert sum(len(v) for k, v in hovernet.items() if k != "mag") == res.objects


def test_interrupted_run_resumes_to_the_same_store(synth, oracle_run, tmp_path):
    """Stop after two committed chunks, resume, compare every row with the uninterrupted run."""
    _, full = oracle_run

    class Stop(Exception):
        pass

    def stop_at(n: int):
        seen = []

        def hook(index: int) -> None:
            seen.append(index)
            if len(seen) == n:
                raise Stop
        return hook

    run = RunOptions(chunk_size=512, margin_um=128, postproc_workers=0, progress=False)
    with pytest.raises(Stop):
        predict_slide(Oracle(synth), CONFIG, SlideJob(synth, on_commit=stop_at(2)), tmp_path, run)
    partial = tmp_path / "synth.db.partial"
    assert partial.is_file() and not (tmp_path / "synth.db").exists() and not (tmp_path / "done").exists()
    assert len(store_rows(partial, "cerberus_chunks")) == 2
    res = predict_slide(Oracle(synth), CONFIG, synth, tmp_path, run)
    assert not partial.exists() and res.paths["marker"].is_file()
    assert json.loads(res.paths["metadata"].read_text())["chunks"]["done_before"] == 2
    for table in ("annotations", "rtree"):
        assert store_rows(res.paths["store"], table) == store_rows(full.paths["store"], table)
    again = predict_slide(Oracle(synth), CONFIG, synth, tmp_path, run)
    assert again.skipped and again.counts == res.counts
    # a partial result of other settings is never resumed: with another margin the slide starts again
    with pytest.raises(Stop):
        predict_slide(Oracle(synth), CONFIG, SlideJob(synth, on_commit=stop_at(2)), tmp_path / "b", run)
    lines: list[str] = []
    with pytest.raises(Stop):
        predict_slide(Oracle(synth), CONFIG, SlideJob(synth, on_commit=stop_at(1)), tmp_path / "b",
                      run.replace(margin_um=200, echo=lines.append))
    assert any("starting this slide again" in line for line in lines)
    assert len(store_rows(tmp_path / "b" / "synth.db.partial", "cerberus_chunks")) == 1


# ---- the real network --------------------------------------------------------------------------------------
def test_network_chunks_equal_one_pass(model_dir, tmp_path):
    """A real (random) network through the Python API, post-processing in a worker process, 4 x 3 chunks: chunked =
    one pass, instance for instance, and each window of the slide's grid runs once (the chunks' shared windows
    come from the window cache, in memory or, with no memory to spare, from files beside the store)."""
    slide = write_synthetic_slide(tmp_path / "net.tif", 3300, 2600, seed=4, **SMALL)
    model = Cerberus.load(model_dir)
    from cerberus_histo.infer.wsi import make_predictor

    ref, ref_cmap = one_pass(make_predictor(model, input_shape=192, output_shape=128, batch_size=1,
                                            precision="fp32"), slide)
    for memory_gb, out in ((None, "out"), (0.1, "spilled")):  # 0.1 GB: nothing to spare beside a chunk
        res = model.predict_wsi(slide, tmp_path / out, chunk_size=128, margin_um=1024, input_shape=192,
                                output_shape=128, batch_size=1, postproc_workers=1, precision="fp32",
                                progress=False, memory_gb=memory_gb)
        got = instance_set(res.paths["store"])
        meta = json.loads(res.paths["metadata"].read_text())
        # a random network may make an object larger than the margin: cut at chunk borders, dropped and reported
        assert len(got) > 20 and set(got) <= set(ref) and len(ref) - len(got) == meta["dropped_large_objects"] <= 1
        assert cv2.imread(str(res.paths["tissue"]), cv2.IMREAD_UNCHANGED).tolist() == ref_cmap.tolist()
        assert res.objects == len(got) and meta["chunks"]["total"] == 12 and meta["chunks"]["with_tissue"] >= 10
        windows, cache = meta["windows"], meta["windows"]["cache"]
        assert windows["run"] == windows["one_pass"] and cache["reused"] > 0
        assert windows["run"] + cache["reused"] <= windows["in_tissue_chunks"]  # those with tissue, from either
        assert (cache["spilled"] > 0) == (memory_gb is not None) and not list(tmp_path.glob(f"{out}/*.partial"))


def _hovernet_shape(data: dict) -> dict:
    """A HoVer-Net JSON's format: its sections and, per section, the keys and value types of its entries."""
    def kind(v):
        return "null" if v is None else "list" if isinstance(v, list) else "number"

    return {k: (kind(v) if not isinstance(v, dict) else sorted({(f, kind(x)) for e in v.values()
                                                                  for f, x in e.items()}))
            for k, v in data.items()}


def test_tiles_and_slides_write_the_same_formats(model_dir, tmp_path):
    """One writer each: a tile of a slide and the slide itself write the same summary header and tasks, and HoVer-Net
    JSON of one format (sections, entry keys, value types)."""
    slide = write_synthetic_slide(tmp_path / "s.tif", 900, 700, seed=5, **SMALL)
    model = Cerberus.load(model_dir)
    window = dict(input_shape=192, output_shape=128, batch_size=1, precision="fp32", progress=False)
    res = model.predict_wsi(slide, tmp_path / "slide", chunk_size=256, postproc_workers=0, **window)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    cv2.imwrite(str(tiles / "t.png"), np.ascontiguousarray(tifffile.imread(slide)[:600, :800, ::-1]))
    from cerberus_histo.infer.tiles import infer_tiles

    run = infer_tiles(model_dir, tiles, tmp_path / "tile", mpp=json.loads(res.paths["metadata"].read_text())["mpp"],
                      postproc_workers=0, **window)
    assert run.done == ["t.png"]
    tile = {"csv": tmp_path / "tile" / "t_summary.csv", "json": tmp_path / "tile" / "t.json"}
    tile_csv, slide_csv = tile["csv"].read_text().splitlines(), res.paths["summary_csv"].read_text().splitlines()
    assert tile_csv[0] == slide_csv[0] == "task,class,tissue_class,count,area_um2,mean_area_um2"
    assert {r.split(",")[0] for r in tile_csv[1:]} == {r.split(",")[0] for r in slide_csv[1:]}
    tile_hover, slide_hover = json.loads(tile["json"].read_text()), json.loads(res.paths["hovernet"].read_text())
    assert tile_hover["mag"] == slide_hover["mag"] and len(slide_hover["nuc"]) > 5 and len(tile_hover["nuc"]) > 5
    assert _hovernet_shape(tile_hover) == _hovernet_shape(slide_hover)


@pytest.mark.skipif(not CMU.is_file(), reason=f"real slide {CMU} not present")
def test_cli_real_slide_end_to_end(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("infer-wsi", "--model", model_dir, "--input", CMU, "--output", out, *WINDOW, "--chunk-size",
                   "256", "--centroids-only", "--postproc-workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CMU-1-Small-Region.svs  done" in proc.stdout and "device busy" in proc.stderr
    stem = out / "CMU-1-Small-Region"
    reader = open_slide(CMU)
    w0, h0 = reader.dimensions
    # the saved tissue mask covers the tissue, not the glass
    mask = cv2.imread(f"{stem}_mask.png", cv2.IMREAD_GRAYSCALE) > 0
    thumb = reader.thumbnail(8.0).mean(axis=2)  # the mask is computed at 8 um/px
    assert thumb.shape == mask.shape
    assert 0.1 < mask.mean() < 0.9 and thumb[mask].mean() < thumb[~mask].mean() - 60
    # level-0 coordinates: every object lies in the slide, nuclei on the tissue
    with AnnotationStore(Path(f"{stem}.db")) as store:
        n = store.count()
        assert n > 50 and len(store.query((0, 0, w0, h0))) == n
        meta = store.metadata
    assert meta["mpp"] == pytest.approx(0.499) and meta["processing_mpp"] == 4.0
    xy = np.array(store_rows_q(Path(f"{stem}.db"), "SELECT cx, cy FROM annotations WHERE properties LIKE "
                                                   "'%\"task\":\"nuclei\"%'"))
    s = mask.shape[1] / w0
    on_tissue = mask[np.minimum((xy[:, 1] * s).astype(int), mask.shape[0] - 1),
                     np.minimum((xy[:, 0] * s).astype(int), mask.shape[1] - 1)]
    assert on_tissue.mean() > 0.9
    features = json.loads(Path(f"{stem}.geojson").read_text())["features"]
    assert len(features) == n
    # every geometry lies inside the slide: tissue regions end at its edge, not at their last cell's (128 px here)
    bounds = np.array([shapely.geometry.shape(f["geometry"]).bounds for f in features])
    assert bounds[:, :2].min() >= 0 and bounds[:, 2].max() <= w0 and bounds[:, 3].max() <= h0
    assert {f["geometry"]["type"] for f in features if f["properties"]["objectType"] == "detection"} == {"Point"}
    info = json.loads(Path(f"{stem}_metadata.json").read_text())
    assert info["mpp_source"] == "metadata" and "torch" in info["software"] and info["timings_s"]["infer"] > 0
    assert cv2.imread(f"{stem}_thumbnail.png").shape[0] == 2048
    # the same settings (the post-processing workers are the machine's): skipped
    again = run_cli("infer-wsi", "--model", model_dir, "--input", CMU, "--output", out, *WINDOW, "--chunk-size", "256",
                    "--centroids-only")
    assert again.returncode == 0 and "1 already done" in again.stdout


# ---- many slides, bad slides -------------------------------------------------------------------------------
def _bad_inputs(folder: Path, good: Path) -> list[Path]:
    corrupt = folder / "corrupt.tif"
    corrupt.write_bytes(good.read_bytes()[:6000])
    text = folder / "notes.svs"
    text.write_text("this is not a slide\n")
    nompp = folder / "nompp.tif"
    tifffile.imwrite(nompp, np.full((600, 600, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    return [folder / "missing.svs", corrupt, text, nompp]


def test_dask_two_workers_three_slides_and_bad_ones_fail_alone(model_dir, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    good = [write_synthetic_slide(slides / f"s{i}.tif", 1400, 1100, seed=10 + i, **SMALL) for i in range(3)]
    bad = _bad_inputs(slides, good[0])
    out = tmp_path / "out"
    proc = run_cli("infer-wsi", "--model", model_dir, "--input", slides / "s*.tif", *[a for p in bad for a in
                   ("--input", p)], "--output", out, "--workers", "2", *WINDOW, "--chunk-size", "256",
                   "--postproc-workers", "0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    table = {line.split()[0]: line.split(None, 4)[1:] for line in proc.stdout.splitlines()[1:8]}
    for g in good:
        assert table[g.name][0] == "done" and int(table[g.name][1]) > 0, table
        assert (out / "done" / f"{g.stem}.json").is_file() and (out / f"{g.stem}.db").is_file()
    reasons = {p.name: table[p.name] for p in bad}
    assert all(r[0] == "failed" for r in reasons.values()), reasons
    assert "not found" in reasons["missing.svs"][3] and "--mpp" in reasons["nompp.tif"][3]
    assert "not a slide" in reasons["notes.svs"][3] and "corrupt" in reasons["corrupt.tif"][3]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: 4 of 7 slides failed") and "Traceback" not in proc.stderr
    devices = {json.loads((out / f"{g.stem}_metadata.json").read_text())["device"] for g in good}
    assert devices == {"cpu"}


def test_masks_per_slide_and_an_unreadable_mask(model_dir, tmp_path):
    """--mask FOLDER: each slide uses its own mask; an unreadable mask fails its slide only (in-process run)."""
    from cerberus_histo.infer.cohort import infer_wsi

    for name, seed in (("a", 21), ("b", 22)):
        write_synthetic_slide(tmp_path / f"{name}.tif", 2400, 1000, seed=seed, **SMALL)
    masks = tmp_path / "masks"
    masks.mkdir()
    left = np.zeros((100, 240), np.uint8)
    left[:, :80] = 255  # level-0 x < 800
    cv2.imwrite(str(masks / "a.png"), left)
    (masks / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines: list[str] = []
    s = infer_wsi(model_dir, [tmp_path / "*.tif"], tmp_path / "out", mask=masks, input_shape=192, output_shape=128,
                  chunk_size=256, postproc_workers=0, progress=False, echo=lines.append)
    status = {r.slide: r for r in s.rows}
    assert status["a.tif"].status == "done" and status["b.tif"].status == "failed"
    assert "b.png" in status["b.tif"].reason and any(line.startswith("failed: b.tif") for line in lines)
    # windows (128 model px = 1024 level-0 px) touching the mask grown by the pad are run, nothing beyond them
    xs = [x for (x,) in store_rows_q(tmp_path / "out" / "a.db", "SELECT max_x FROM rtree")]
    assert xs and max(xs) <= 1024
    assert json.loads((tmp_path / "out" / "a_metadata.json").read_text())["windows"]["run"] == 1


def test_bad_options(model_dir, tmp_path):
    from cerberus_histo.errors import CerberusError
    from cerberus_histo.infer.cohort import infer_wsi

    assert_clean_error(run_cli("infer-wsi", "--model", model_dir, "--input", tmp_path / "*.svs", "--output",
                               tmp_path / "o"), "matches no file")
    slide = tmp_path / "x.tif"
    slide.write_bytes(b"")
    for kwargs, words in (({"mask": slide, "inputs": [slide, tmp_path / "y.tif"]}, "folder of masks"),
                          ({"workers": 2, "scheduler": "tcp://127.0.0.1:1"}, "not both"),
                          ({"output_shape": 100}, "multiple of the encoder stride"),
                          ({"margin_um": 0}, "--margin-um"), ({"mpp": -1}, "--mpp")):
        with pytest.raises(CerberusError, match=words):
            infer_wsi(model_dir, kwargs.pop("inputs", [slide]), tmp_path / "o", progress=False, **kwargs)
    proc = run_cli("infer-wsi", "--model", model_dir, "--input", slide, "--output", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a failed slide: reported, then the summary
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 slides failed (x.tif)")
    assert "failed: x.tif: " in proc.stderr and "empty" in proc.stdout.splitlines()[1]


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_store(model_dir, tmp_path):
    """SIGKILL the CLI once a chunk is committed, run the same command again: the store equals an uninterrupted
    run's, row for row."""
    slide = write_synthetic_slide(tmp_path / "k.tif", 3000, 2400, seed=31, **SMALL)
    args = ["--model", model_dir, "--input", slide, *WINDOW, "--chunk-size", "128", "--postproc-workers", "1"]
    full = run_cli("infer-wsi", *args, "--output", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cerberus_histo", "infer-wsi", *map(str, args), "--output",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial, deadline = out / "k.db.partial", time.time() + 120
    try:
        while time.time() < deadline:
            try:
                if partial.is_file() and len(store_rows(partial, "cerberus_chunks")) >= 2:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert partial.is_file() and not (out / "k.db").exists()
    done = {row[0] for row in store_rows(partial, "cerberus_chunks")}
    again = run_cli("infer-wsi", *args, "--output", out)
    assert again.returncode == 0, again.stderr[-2000:]
    for table in ("annotations", "rtree"):
        assert store_rows(out / "k.db", table) == store_rows(tmp_path / "full" / "k.db", table)
    # each window once in the full run; the resumed run recomputes at most the windows its chunks share with the
    # chunks committed before the kill (the window cache it lost), and nothing more
    full_windows = json.loads((tmp_path / "full" / "k_metadata.json").read_text())["windows"]
    windows = json.loads((out / "k_metadata.json").read_text())["windows"]
    assert full_windows["run"] == full_windows["one_pass"] == windows["one_pass"]
    chunks = plan_chunks(375, 300, 128, 128, 64, 16)  # 3 x 3 chunks at 4 um/px, margin 256 um
    assert len(chunks) == 9 and 0 < len(done) < 9

    def crops(c):
        return {(x, y) for x in range(c.net[0], c.net[2], 128) for y in range(c.net[1], c.net[3], 128)}

    shared = set().union(*(crops(c) for c in chunks if c.index in done)) & set().union(
        *(crops(c) for c in chunks if c.index not in done))
    assert windows["one_pass"] <= windows["run"] <= windows["one_pass"] + len(shared)
    assert not list(out.glob("*.partial"))
