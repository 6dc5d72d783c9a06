"""Defaults chosen for the machine (infer/runtime.py): precision by hardware, batch and chunk from memory, the
settings line, and windows that fit a slide along an axis that one chunk covers."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_cli

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.infer import runtime as rt
from cerberus_histo.infer.engine import Predictor
from cerberus_histo.infer.options import RunOptions
from cerberus_histo.infer.tiling import Geometry, coverage, plan_tiles
from cerberus_histo.infer.wsi import make_predictor, plan_chunks, predict_slide

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8))


def test_auto_precision_follows_the_hardware(tiny, monkeypatch):
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)
    r = rt.plan_runtime(tiny, (256, 256), device="cpu")
    assert (r.precision, r.batch_size, r.channels_last) == ("bf16", 1, True)
    assert "native bf16" in r.why["precision"]
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: False)
    r = rt.plan_runtime(tiny, (256, 256), device="cpu")
    assert r.precision == "fp32" and "no native bf16" in r.why["precision"]
    r = rt.plan_runtime(tiny, (256, 256), device="cpu", precision="bf16", batch_size=3, postproc_workers=2)
    assert (r.precision, r.batch_size, r.postproc_workers) == ("bf16", 3, 2) and "precision" not in r.why
    # fp16 on a CPU (no fp16 arithmetic there) is replaced, with a warning: tests/test_messages.py


def test_settings_line_names_every_choice(tiny, monkeypatch):
    monkeypatch.setattr(rt, "available_bytes", lambda: 100 * rt.GB)
    r = rt.plan_runtime(tiny, (256, 256), device="cpu", threads=1)
    line = r.line()
    for word in ("device cpu", f"precision {r.precision}", "layout channels_last", "batch 1", "1 torch thread",
                 "memory budget 3.0 GB"):
        assert word in line, (word, line)
    assert r.postproc_workers == max(0, rt.cpu_cores() - 1)
    monkeypatch.setattr(rt, "available_bytes", lambda: 4 * rt.GB)  # a small machine: half of what is free
    assert rt.plan_runtime(tiny, (256, 256), device="cpu").memory_gb == 2.0
    assert rt.plan_runtime(tiny, (256, 256), device="cpu", memory_gb=12).memory_gb == 12


def test_window_memory_is_traced_and_scales_with_area(tiny):
    small = rt.window_bytes(tiny, (256, 256), "fp32")
    assert rt.window_bytes(tiny, (512, 512), "fp32") == pytest.approx(4 * small, rel=0.01)
    assert rt.window_bytes(tiny, (256, 256), "fp32", batch=2) == pytest.approx(2 * small, rel=0.01)
    half = rt.window_bytes(tiny, (256, 256), "bf16")
    assert 0.4 * small < half < 0.8 * small  # activations in bf16, the softmax in float32
    # the input alone is 3 bytes a pixel; a U-Net with 8-channel heads holds far more
    assert small > 256 * 256 * 8 * 4


def test_chunk_side_from_the_budget():
    r = rt.Runtime("cpu", "bf16", True, 1, 2, 0, int(3 * rt.GB), int(0.9 * rt.GB), 100 * 2**20)
    per_px = r.chunk_bytes_per_px(19)
    assert per_px == 2 * 19 + rt.READ_BYTES_PER_PX + rt.POSTPROC_BYTES_PER_PX
    left = r.memory_bytes - rt.BASE_BYTES - r.weight_bytes - r.batch_bytes
    side = r.chunk_for(60000, 60000, 720, 720, 19)
    assert side % 720 == 0 and (side + 1440) ** 2 * per_px <= left < (side + 720 + 1440) ** 2 * per_px
    # a slide that fits whole is one chunk; a strip is bounded by its area, not its length
    assert r.chunk_for(2220, 2967, 720, 720, 19) >= 2967
    assert r.chunk_for(12000, 16, 720, 720, 19) == 17 * 720  # one chunk: no margins computed twice
    # more memory, larger chunks; workers each hold a chunk; never less than one window
    bigger = rt.Runtime("cpu", "bf16", True, 1, 2, 0, int(8 * rt.GB), r.batch_bytes, r.weight_bytes)
    assert bigger.chunk_for(60000, 60000, 720, 720, 19) > side
    workers = rt.Runtime("cpu", "bf16", True, 1, 2, 3, r.memory_bytes, r.batch_bytes, r.weight_bytes)
    assert workers.chunk_bytes_per_px(19) > 3 * per_px
    tiny_budget = rt.Runtime("cpu", "bf16", True, 1, 2, 0, 2**20, r.batch_bytes, r.weight_bytes)
    assert tiny_budget.chunk_for(60000, 60000, 720, 720, 19) == 720


def test_predictor_uses_channels_last(tiny):
    p = Predictor(tiny, device="cpu", precision="fp32", batch_size=2)
    assert p.batch_size == 2 and p.runtime.channels_last
    conv = next(m for m in p.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_strip_windows_fit_the_short_axis():
    """A 12000 x 16 strip: windows of 1024 x 320 px (16 px + the 152-px margin on each side), not 1024 x 1024; the
    long axis keeps the slide-wide grid of 720-px crops, and every pixel is still covered once."""
    g = Geometry(1024, 720, fit=False)
    plan = plan_tiles(12000, 16, g, fit=(False, True))
    assert plan.window_shape == (320, 1024) and len(plan) == 17
    assert (coverage(plan) == 1).all()
    assert plan_tiles(12000, 16, g).window_shape == (1024, 1024)  # what it was


def test_strip_slide_runs_fitted_windows(tiny, tmp_path):
    img = np.full((16, 3000, 3), 230, np.uint8)
    img[:, ::7] = (120, 60, 140)
    cv2.imwrite(str(tmp_path / "strip.png"), img[..., ::-1])
    cv2.imwrite(str(tmp_path / "mask.png"), np.full((16, 3000), 255, np.uint8))
    p = make_predictor(tiny, input_shape=256, output_shape=128, precision="fp32")
    shapes = []
    plan = p.plan
    p.plan = lambda w, h, fit=None: shapes.append(plan(w, h, fit).window_shape) or plan(w, h, fit)
    res = predict_slide(p, tiny.config, tmp_path / "strip.png", tmp_path / "out",
                        RunOptions(mpp=0.5, mask=tmp_path / "mask.png", chunk_size=1024, progress=False))
    assert set(shapes) == {(16 + 128, 256)}  # windows fitted along y (one chunk), the grid along x (three)
    meta = json.loads(res.paths["metadata"].read_text())
    chunks = plan_chunks(3000, 16, 128, 1024, 512, 16)
    assert len(chunks) == 3 and meta["windows"]["run_now"] == meta["windows"]["run"]
    # each window of the slide's grid runs once: those the chunks share come from the window cache
    assert meta["windows"]["run"] == meta["windows"]["one_pass"] == len(plan(3000, 16, (False, True)))
    assert meta["windows"]["cache"]["reused"] == sum(len(plan(c.region[2], 16, (False, True))) for c in chunks) \
        - meta["windows"]["run"] > 0


def test_cli_states_the_settings(tmp_path, tiny):
    tiny.save(tmp_path / "model")
    img = np.full((300, 300, 3), 230, np.uint8)
    cv2.imwrite(str(tmp_path / "t.png"), img)
    proc = run_cli("infer-tile", "--model", tmp_path / "model", "--input", tmp_path / "t.png", "--output",
                   tmp_path / "out", "--device", "cpu", "--formats", "npz")
    assert proc.returncode == 0, proc.stderr
    line = next(s for s in proc.stderr.splitlines() if s.startswith("device "))
    assert "precision" in line and "layout channels_last" in line and "batch 1" in line


def test_a_region_that_fits_runs_in_one_window_when_memory_allows():
    """A 1000-px tile: one 1312-px window (1.72 Mpx of network input) instead of four 816-px ones (2.66 Mpx), when
    the budget holds it; otherwise the geometry's windows."""
    g = Geometry.default()
    one = plan_tiles(1000, 1000, g, max_pixels=1312 * 1312)
    assert len(one) == 1 and one.window_shape == (1312, 1312) and (coverage(one) == 1).all()
    assert plan_tiles(1000, 1000, g, max_pixels=1312 * 1311).window_shape == (816, 816)
    assert len(plan_tiles(1025, 1000, g, max_pixels=10**8)) == 2 * 2  # longer than the input side: the grid
    assert plan_tiles(1000, 600, g, fit=(True, False), max_pixels=10**8).window_shape == (1024, 816)  # not fitted
    budget = rt.Runtime("cpu", "bf16", True, 1, 2, 0, int(3 * rt.GB), 0, 100 * 2**20, pixel_bytes=800)
    assert budget.max_window_pixels() >= 1328 * 1328
    assert rt.Runtime("cpu", "fp32", True, 1, 2, 0, int(3 * rt.GB), 0, 100 * 2**20,
                      pixel_bytes=1600).max_window_pixels() < 1328 * 1328
    assert rt.Runtime("cuda", "bf16", True, 8, 2, 6, 0, 0, 0, pixel_bytes=800,
                      device_bytes=8 * rt.GB).max_window_pixels() == 8 * rt.GB // 800


def test_bad_settings_are_one_line_errors(tmp_path, tiny):
    tiny.save(tmp_path / "model")
    cv2.imwrite(str(tmp_path / "t.png"), np.full((64, 64, 3), 230, np.uint8))
    for option, value, word in (("--memory-gb", "0", "memory-gb"), ("--threads", "0", "threads"),
                                ("--batch-size", "0", "batch-size")):
        proc = run_cli("infer-wsi", "--model", tmp_path / "model", "--input", tmp_path / "t.png", "--mpp", "0.5",
                       "--output", tmp_path / "out", "--device", "cpu", option, value)
        assert_clean_error(proc, word)
