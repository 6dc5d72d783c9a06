"""Inference: window math, the engine (one path for tiles and slides), predict_tile and ``cerberus infer-tile``."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import SHARED, assert_clean_error, calibrate, run_cli

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.data.synthetic import synth_tile
from cerberus_histo.infer.engine import Predictor
from cerberus_histo.infer.results import TilePrediction
from cerberus_histo.infer.tiling import Geometry, cell_count, cell_weights, coverage, plan_axis, plan_tiles
from cerberus_histo.io.readers import ArrayReader
from cerberus_histo.postproc import Instances, TaskResult

MARGIN = 96  # >= the tiny network's receptive field (dense maps: 64 px, tissue cells: 80 px around the cell)
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def model() -> Cerberus:
    """The tiny six-head network, random weights with BatchNorm statistics measured on random images (so
    activations have a realistic scale and the random network finds a few dozen "nuclei" per tile)."""
    torch.manual_seed(0)
    net = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8))
    calibrate(net)
    return net.eval()


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return synth_tile(192, seed=3).image


def same_instances(a: Instances, b: Instances) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.bbox, b.bbox)
    np.testing.assert_allclose(a.centroid, b.centroid, atol=1e-9)
    np.testing.assert_array_equal(a.area, b.area)
    np.testing.assert_array_equal(a.types, b.types)


# ---- window math (no network) ---------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", [Geometry.original(), Geometry.default(), Geometry(352, 160, fit=False),
                                      Geometry(256, 64)])
@pytest.mark.parametrize("size", [(1, 1), (7, 300), (143, 144), (145, 1000), (1024, 1500)])
def test_windows_cover_the_region_once(geometry, size):
    h, w = size
    plan = plan_tiles(w, h, geometry)
    assert (coverage(plan) == 1).all()  # every output pixel comes from exactly one window
    windows = [t.window for t in plan.tiles()]
    assert len(set(windows)) == len(windows) == math.ceil(h / geometry.output_shape) * math.ceil(w / geometry.output_shape)
    wh, ww = plan.window_shape
    for t in plan.tiles():
        x0, y0, x1, y1 = t.window
        assert (y1 - y0, x1 - x0) == (wh, ww)
        assert x0 % 16 == y0 % 16 == (-geometry.margin) % 16  # one stride phase for every window
        cx0, cy0, cx1, cy1 = t.crop_in_window
        assert cx0 == cy0 == geometry.margin and cx1 <= ww - geometry.margin and cy1 <= wh - geometry.margin
        rx0, ry0, rx1, ry1 = plan.read_box
        assert rx0 <= x0 and ry0 <= y0 and x1 <= rx1 and y1 <= ry1
    if geometry.fit:  # small regions get small windows; the margin never shrinks
        assert ww <= max(w, 16) + 15 + 2 * geometry.margin and ww - 2 * geometry.margin >= 16
    else:
        assert (wh, ww) == (geometry.input_shape,) * 2


def test_tiny_image_gets_one_small_window():
    plan = plan_tiles(5, 3, Geometry.default())
    assert len(plan) == 1 and plan.window_shape == (16 + 304, 16 + 304)
    assert plan.tiles()[0].crop == (0, 0, 5, 3)
    assert len(plan_tiles(5, 3, Geometry.original())) == 1


@pytest.mark.parametrize("geometry", [Geometry.original(), Geometry.default(), Geometry(352, 160, fit=False)])
@pytest.mark.parametrize("length", [1, 16, 100, 300, 1000])
def test_cell_weights_sum_to_one(geometry, length):
    axis = plan_axis(length, geometry)
    total = np.zeros(cell_count(length, 16))
    for k in range(axis.count):
        m0, j0, w = cell_weights(axis, k, 16)
        assert j0 >= 0 and j0 + w.shape[1] <= axis.input // 16
        total[m0:m0 + w.shape[0]] += w.sum(1)
        if geometry.margin % 16 == 0:
            assert set(np.unique(w)) <= {0.0, 1.0}
    np.testing.assert_allclose(total, 1.0)


def test_geometry_is_validated():
    with pytest.raises(ValueError, match="even"):
        Geometry(448, 145)
    with pytest.raises(ValueError, match="multiple"):
        Geometry(450, 144)
    with pytest.raises(ValueError, match="<="):
        Geometry(144, 448)
    assert Geometry.original().margin == Geometry.default().margin == 152


# ---- the network side -----------------------------------------------------------------------------------
def test_dense_class_head_equals_the_patch_head_at_its_centre(model):
    feat = torch.randn(2, 32, 9, 9)
    head = model.heads["tissue-class"]
    dense = head.dense(feat)
    assert dense.shape == (2, 9, 9, 9)
    torch.testing.assert_close(dense[:, :, 4, 4], head(feat))
    big = torch.randn(1, 32, 20, 20)
    torch.testing.assert_close(head.dense(big)[:, :, 7, 11], head(big[..., 3:12, 7:16]))


def test_sliding_window_equals_one_pass(model, tile):
    """With a margin covering the receptive field, 2 x 2 windows give the same probabilities and the same
    instances as one window over the whole tile: nothing split or duplicated at the seams (x, y = 96)."""
    reader = ArrayReader(tile, 0.5)
    one = Predictor(model, Geometry(192 + 2 * MARGIN, 192, fit=False)).predict_region(reader)
    slide = Predictor(model, Geometry(96 + 2 * MARGIN, 96, fit=False), batch_size=3).predict_region(reader)
    assert (one.windows, slide.windows) == (1, 4)
    for name in one.probs:
        np.testing.assert_allclose(slide.probs[name], one.probs[name], atol=1e-5)
    assert one.probs["tissue-class"].shape == (9, 12, 12)
    from cerberus_histo.infer.tiles import postprocess_region

    a, b = postprocess_region(one), postprocess_region(slide)
    for task in ("nuclei", "gland", "lumen"):
        np.testing.assert_array_equal(a[task].inst_map, b[task].inst_map)
        same_instances(a[task].instances, b[task].instances)
    np.testing.assert_array_equal(a["tissue"].class_map, b["tissue"].class_map)
    boxes = a["nuclei"].instances.bbox
    crossing = ((boxes[:, 0] < 96) & (boxes[:, 2] > 96)) | ((boxes[:, 1] < 96) & (boxes[:, 3] > 96))
    assert len(boxes) > 10 and crossing.sum() >= 1  # the seams really cut through nuclei


def test_original_geometry_equals_default_when_the_margin_covers_the_receptive_field(model, tile):
    """Same margin (152) and stride phase: 448/144 (4 windows) and the default (1 window) agree."""
    reader = ArrayReader(tile[:150, :150], 0.5)
    orig = Predictor(model, Geometry.original(), batch_size=4).predict_region(reader)
    ours = Predictor(model).predict_region(reader)
    assert (orig.windows, ours.windows) == (4, 1)
    for name in orig.probs:
        tol = 1e-5 if name != "tissue-class" else 0.2  # cells: the original's are blended across crop borders
        np.testing.assert_allclose(ours.probs[name], orig.probs[name], atol=tol)


def test_regions_agree_with_the_whole_image(model, tile):
    """A region at an offset that is a multiple of 16 (the slide engine's chunks) gives the whole image's
    probabilities there, tissue cells included, and a region reaching past the image reads white."""
    reader = ArrayReader(tile, 0.5)
    p = Predictor(model)
    whole = p.predict_region(reader)
    part = p.predict_region(reader, (32, 48, 96, 80))
    for name, q in part.probs.items():
        ref = whole.probs[name][:, 3:8, 2:8] if name == "tissue-class" else whole.probs[name][:, 48:128, 32:128]
        np.testing.assert_allclose(q, ref, atol=1e-5)
    edge = p.predict_region(reader, (-64, -64, 96, 96))
    blank = p.predict_region(ArrayReader(np.full((96, 96, 3), 255, np.uint8), 0.5), (-160, -160, 96, 96))
    # pixels >= 52 px outside the image see only white within the receptive field (48 px to the right/below)
    np.testing.assert_allclose(edge.probs["nuclei-inst"][:, :12, :12], blank.probs["nuclei-inst"][:, :12, :12],
                               atol=1e-5)


def test_windows_not_kept_are_not_run(model, tile):
    reader = ArrayReader(tile[:160, :160], 0.5)
    p = Predictor(model, Geometry(80 + 2 * MARGIN, 80, fit=False))
    full = p.predict_region(reader)
    seen = []
    part = p.predict_region(reader, keep=lambda tiles: seen.extend(tiles) or [t.row == t.col for t in tiles])
    assert (full.windows, part.windows, len(seen)) == (4, 2, 4)
    for name in ("nuclei-inst", "gland-type"):
        np.testing.assert_allclose(part.probs[name][:, :80, :80], full.probs[name][:, :80, :80], atol=1e-6)
        np.testing.assert_allclose(part.probs[name][:, 80:, 80:], full.probs[name][:, 80:, 80:], atol=1e-6)
        assert not part.probs[name][:, :80, 80:].any() and not part.probs[name][:, 80:, :80].any()
    assert p.predict_region(reader, keep=lambda tiles: [False] * len(tiles)).windows == 0


@pytest.mark.skipif(not (SHARED / "data" / "CMU-1-Small-Region.svs").is_file(), reason="real slide not present")
def test_the_engine_reads_a_real_slide(model):
    from cerberus_histo.io.slides import open_slide

    with open_slide(SHARED / "data" / "CMU-1-Small-Region.svs") as reader:
        p = Predictor(model)
        assert p.full_region(reader) == (0, 0, 2216, 2961)  # 2220 x 2967 px at 0.499 um/px, in 0.5 um/px pixels
        pred = p.predict_region(reader, (1000, 1200, 120, 72))
    assert pred.shape == (72, 120) and pred.probs["tissue-class"].shape == (9, 5, 8)
    np.testing.assert_allclose(pred.probs["nuclei-inst"].sum(0), 1.0, atol=1e-5)
    assert pred.windows == 1 and pred.timings["read"] > 0


def test_predict_tile_result_types(model, tile):
    pred = model.predict_tile(tile[:100, :130])
    assert isinstance(pred, TilePrediction)
    assert pred.shape == pred.image_shape == (100, 130) and pred.scale == 1.0 and pred.mpp == pred.image_mpp == 0.5
    assert set(pred.results) == {"gland", "lumen", "nuclei", "tissue"}
    assert all(isinstance(r, TaskResult) for r in pred.results.values())
    nuc = pred.results["nuclei"]
    assert nuc.inst_map.shape == (100, 130) and nuc.inst_map.dtype == np.int32 and nuc.type_map.shape == (100, 130)
    assert isinstance(nuc.instances, Instances) and pred.counts()["nuclei"] == len(nuc.instances)
    assert pred.results["tissue"].class_map.shape == (7, 9) and pred.cell == 16
    assert {"read", "forward", "stitch", "postprocess"} <= set(pred.timings)
    with pytest.raises(KeyError, match="tissue"):
        pred.instances("tissue")
    with pytest.warns(UserWarning, match="greyscale"):
        dot = model.predict_tile(np.full((1, 1), 200, np.uint8))  # smaller than any window, grey
    assert dot.shape == (1, 1) and dot.results["nuclei"].inst_map.shape == (1, 1)
    assert dot.results["tissue"].class_map.shape == (1, 1)


def test_resampling_maps_back_to_image_pixels(model, tile):
    """An image at 0.25 µm/px (each pixel repeated 2 x 2) is resampled to the model's 0.5: same instances as
    the 0.5 µm/px image, with coordinates twice as large in image pixels."""
    small = tile[:, :144]
    big = cv2.resize(small, (288, 384), interpolation=cv2.INTER_NEAREST)
    ref = model.predict_tile(small)
    pred = model.predict_tile(big, mpp=0.25)
    assert pred.image_shape == (384, 288) and pred.shape == (192, 144) and pred.scale == 2.0
    assert "resample" in pred.timings
    same_instances(pred.instances("nuclei", frame="model"), ref.instances("nuclei"))
    np.testing.assert_allclose(pred.instances("nuclei").centroid, ref.instances("nuclei").centroid * 2)
    assert len(ref.instances("nuclei")) > 3


def test_tta_is_flip_equivariant_and_bf16_runs(model, tile):
    img = tile[:32, :48]
    small = Geometry(48 + 64, 48)  # one window per image, laid out symmetrically (sides are multiples of 16)
    tta = Predictor(model, small, tta=True)
    p = tta.predict_region(ArrayReader(img, 0.5)).probs["nuclei-inst"]
    q = tta.predict_region(ArrayReader(img[:, ::-1], 0.5)).probs["nuclei-inst"][:, :, ::-1]
    np.testing.assert_allclose(p, q, atol=1e-5)  # averaging the 4 flips makes the prediction flip-equivariant
    plain = Predictor(model, small).predict_region(ArrayReader(img, 0.5)).probs["nuclei-inst"]
    assert np.abs(plain - p).max() > 1e-3
    bf16 = Predictor(model, small, precision="bf16", prob_dtype=np.float16).predict_region(ArrayReader(img, 0.5))
    b = bf16.probs["nuclei-inst"]
    assert b.dtype == np.float16 and b.shape == (3, 32, 48)
    np.testing.assert_allclose(b.astype(np.float32).sum(0), 1.0, atol=1e-2)
    assert (b.argmax(0) == plain.argmax(0)).mean() > 0.8


def test_bad_options_are_one_line_errors(model):
    from cerberus_histo.errors import CerberusError

    with pytest.raises(CerberusError, match="precision"):
        Predictor(model, precision="int8")
    with pytest.raises(CerberusError, match="multiple"):
        Predictor(model, input_shape=450, output_shape=144)
    with pytest.raises(CerberusError, match="head"):
        Predictor(model, heads=["nuclei-foo"])


# ---- the command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


def test_cli_folder_with_bad_images(model_dir, tile, tmp_path):
    src, out = tmp_path / "tiles", tmp_path / "out"
    src.mkdir()
    cv2.imwrite(str(src / "good.png"), cv2.cvtColor(tile[:80, :96], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(src / "grey16.png"), (tile[:64, :64, 0].astype(np.uint16) * 257))
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("not an image\n")
    proc = run_cli("infer-tile", "--model", model_dir, "--input", src, "--output", out, "--postproc-workers", "1",
                   "--formats", "geojson,npz,overlay")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "infer-tile:" not in ln]
    assert lines[-1].startswith("error: ") and "2 of 4" in lines[-1] and "Traceback" not in proc.stderr
    assert sum("empty.png" in ln for ln in lines[:-1]) == 1 and sum("notes.png" in ln for ln in lines[:-1]) == 1
    assert any(ln.startswith("warning:") and "grey16.png" in ln for ln in lines)
    for stem in ("good", "grey16"):
        assert (out / f"{stem}.geojson").is_file() and (out / f"{stem}_overlay.png").is_file()
        marker = json.loads((out / "done" / f"{stem}.json").read_text())
        assert marker["formats"] == ["geojson", "npz", "overlay"] and marker["counts"]["nuclei"] >= 0
        assert {"decode", "forward", "postprocess", "export"} <= set(marker["timings_s"])
    with np.load(out / "good.npz") as z:
        assert z["nuclei_inst"].shape == (80, 96)
    assert not (out / "done" / "empty.json").exists() and not list(out.glob("notes*"))


def test_cli_rerun_skips_finished_images(model_dir, tile, tmp_path):
    src, out = tmp_path / "tiles", tmp_path / "out"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), cv2.cvtColor(tile[:64, :80], cv2.COLOR_RGB2BGR))
    args = ("infer-tile", "--model", model_dir, "--input", src, "--output", out, "--postproc-workers", "0",
            "--formats", "npz,csv", "--input-shape", "448", "--output-shape", "144")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    marker = out / "done" / "a.json"
    stamp = (marker.stat().st_mtime_ns, (out / "a.npz").stat().st_mtime_ns)
    assert json.loads(marker.read_text())["window"] == "448/144"
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "1 already done" in second.stdout
    assert (marker.stat().st_mtime_ns, (out / "a.npz").stat().st_mtime_ns) == stamp


def test_cli_old_name_workers_is_postproc_workers_for_a_release(model_dir, tile, tmp_path):
    """`infer-tile --workers`, the old name of --postproc-workers (in infer-wsi --workers starts Dask workers), still
    sets the post-processing processes, with one warning line; --help shows the new name only."""
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), cv2.cvtColor(tile[:64, :80], cv2.COLOR_RGB2BGR))
    args = ("infer-tile", "--model", model_dir, "--input", src, "--formats", "npz", "--device", "cpu",
            "--precision", "fp32")
    old = run_cli(*args, "--output", tmp_path / "old", "--workers", "1")
    assert old.returncode == 0, old.stderr
    err = [ln for ln in old.stderr.splitlines() if ln.strip() and "infer-tile:" not in ln]  # (no progress bar)
    assert err[0] == "warning: infer-tile --workers is now --postproc-workers; --workers will be removed"
    assert sum("--workers" in ln for ln in err) == 1 and "1 post-processing worker" in err[1], err
    new = run_cli(*args, "--output", tmp_path / "new", "--postproc-workers", "1")
    assert new.returncode == 0 and "--workers" not in new.stderr and "1 post-processing worker" in new.stderr
    with np.load(tmp_path / "old" / "a.npz") as a, np.load(tmp_path / "new" / "a.npz") as b:
        assert set(a.files) == set(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    both = run_cli(*args, "--output", tmp_path / "both", "--workers", "1", "--postproc-workers", "1")
    assert both.returncode == 2 and both.stderr.strip().splitlines()[-1].startswith(
        "error: pass --postproc-workers only (--workers is its old name)")
    helps = {c: run_cli(c, "--help").stdout for c in ("infer-tile", "infer-wsi")}
    assert "--postproc-workers" in helps["infer-tile"] and "--workers" not in helps["infer-tile"]
    assert "--postproc-workers" in helps["infer-wsi"] and "--workers" in helps["infer-wsi"]  # Dask workers there


def test_cli_model_folder_without_weights(model_dir, tile, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.yaml").write_text((model_dir / "model.yaml").read_text())
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), tile[:32, :32])
    proc = run_cli("infer-tile", "--model", broken, "--input", src, "--output", tmp_path / "out")
    assert_clean_error(proc, "weights.pt")


def test_cli_output_is_a_file(model_dir, tile, tmp_path):
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), tile[:32, :32])
    blocker = tmp_path / "out.txt"
    blocker.write_text("x")
    proc = run_cli("infer-tile", "--model", model_dir, "--input", src, "--output", blocker)
    assert_clean_error(proc, "out.txt", "not a folder")
