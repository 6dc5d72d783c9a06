"""Whole-slide inference at growing slide sizes: wall time, time per mm² of tissue, peak memory, overhead.

For each size (level-0 pixels per side, 0.5 um/px) a synthetic pyramidal slide with tissue islands on white is
written, then predicted by ``predict_slide`` in a **fresh subprocess** (so its peak memory is its own). Printed
per slide: wall time, tissue area (mm², from the tissue mask), seconds per mm² of tissue, objects, peak RSS of the
slide process (``ru_maxrss``) and of its whole process tree (sampled with psutil every 0.1 s: the process plus its
post-processing workers), per-stage times, the device utilisation (share of the wall time the forward pass ran)
and **end-to-end time over forward-only time for the same windows**: in the same subprocess, after the slide, the
predictor's network is timed on batches of random windows of the shape the slide's windows had, and the time for the
number of windows the slide ran is extrapolated. On a shared machine both sides of the ratio see the load of
the moment; ``forward`` (the network's time inside the run) is printed too.

Defaults fit a 2-core CPU in minutes: the tiny encoder (``head_channels`` 8, random weights with calibrated
BatchNorm) at **4 um/px** (``--model-mpp``; the slides stay at 0.5 um/px, so every read is resampled), windows of
256 px keeping 128, chunks of 1024 model px, fp32, one post-processing worker. This measures the pipeline (reading,
chunking, post-processing, writing, memory) rather than a real network.

``--original`` runs the original model instead (ResNet-34, six heads, random weights with calibrated BatchNorm,
0.5 um/px) with **every inference setting left to the defaults chosen for the machine** (device, precision,
layout, batch, chunk, workers; options given beside it still apply). With a GPU, the child's peak GPU memory and
the GPU's utilisation (``nvidia-smi`` every 0.25 s while the slide runs) are printed too; ``benchmarks/gpu.sh``
runs the 1 cm² slide this way:

    python benchmarks/wsi_scale.py --sizes 10000,30000 --json wsi.json
    python benchmarks/wsi_scale.py --original --sizes 20000 --tissue-fraction 1      # 1 cm² of tissue, GPU
    python benchmarks/wsi_scale.py --original --sizes 4000,12000 --tissue-fraction 0.2  # one chunk against many

Each window of the slide's grid runs once however the slide is chunked (issue 31): printed per slide are the
windows run over the windows of one pass over the tissue, and the window cache's figures; with several sizes, each
against the first (seconds per mm² of tissue, that ratio, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_model(folder: Path, encoder: str = "resnet34", head_channels: int | None = None,
                mpp: float = 0.5) -> Path:
    """The original preset with random weights (seed 0, BatchNorm calibrated on random images), saved to ``folder``."""
    import torch
    from model_speed import calibrated

    from cerberus_histo import Cerberus, ModelConfig

    torch.manual_seed(0)
    extra = {} if head_channels is None else {"head_channels": head_channels}
    cfg = ModelConfig.preset("original", encoder=encoder, mpp=mpp, **extra)
    return calibrated(Cerberus(cfg), "cpu").save(folder)


def run_one(args) -> dict:
    """The child: one slide, then the forward-only timing; prints one JSON line."""
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cerberus_histo import Cerberus
    from cerberus_histo.infer.options import RunOptions
    from cerberus_histo.infer.wsi import make_predictor, predict_slide

    model = Cerberus.load(args.model)
    predictor = make_predictor(model, input_shape=args.input_shape, output_shape=args.output_shape,
                               batch_size=args.batch_size, device=args.device, precision=args.precision,
                               postproc_workers=args.postproc_workers)
    print(predictor.runtime.line(), file=sys.stderr, flush=True)
    g, batch = predictor.geometry, predictor.batch_size
    shapes: Counter = Counter()  # the window shapes the slide's plans use (fitted where one chunk covers an axis)
    plan = predictor.plan

    def counting_plan(width, height, fit=None):
        p = plan(width, height, fit)
        shapes[p.window_shape] += 1
        return p

    predictor.plan = counting_plan

    def seconds_per_window(shape: tuple[int, int]) -> float:
        """The network alone (softmax and crops included, as in the pipeline) on batches of random windows."""
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 3, *shape), dtype=np.uint8))
        x = x.to(predictor.device)
        crop = (g.margin, g.margin, shape[1] - g.margin, shape[0] - g.margin)
        predictor._probs(x, [crop] * batch)  # warm-up
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.forward_batches):
            predictor._probs(x, [crop] * batch)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / (args.forward_batches * batch)

    if predictor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(predictor.device)
    t0 = time.perf_counter()
    res = predict_slide(predictor, model.config, args.one, args.out,
                        RunOptions(chunk_size=args.chunk_size, margin_um=args.margin_um, progress=False,
                                   echo=lambda m: print(m, file=sys.stderr)))
    wall = time.perf_counter() - t0
    meta = json.loads(res.paths["metadata"].read_text())
    windows = int(meta["windows"]["run"])
    # forward-only for the same number of windows of the slide's (most used) window shape, timed after the slide
    shape = shapes.most_common(1)[0][0] if shapes else (g.input_shape, g.input_shape)
    forward_only = seconds_per_window(shape) * windows
    return {"wall_s": wall, "objects": res.objects, "windows": windows, "forward_only_s": forward_only,
            "one_pass_windows": int(meta["windows"]["one_pass"]), "cache": meta["windows"]["cache"],
            "timings_s": meta["timings_s"], "tissue_mm2": res.summary["analysed_area_um2"] / 1e6,
            "chunks": meta["chunks"], "chunk_px": meta["chunk_size"], "dropped": meta["dropped_large_objects"],
            "runtime": predictor.runtime.line(),
            "gpu_peak_gb": (torch.cuda.max_memory_allocated(predictor.device) / 2**30
                            if predictor.device.type == "cuda" else None),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def wait_peak_rss(proc: subprocess.Popen) -> int:
    """Wait for ``proc``; the peak RSS (bytes) of its process tree, sampled every 0.1 s."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    return peak


def measure(args, slide: Path, out: Path) -> dict:
    """Run one slide in a subprocess; sample the RSS of its process tree."""
    from run_all import GPUSampler

    cmd = [sys.executable, __file__, "--one", str(slide), "--out", str(out), "--model", str(args.model)]
    if args.original:
        cmd.append("--original")
    for key in ("device", "precision", "batch_size", "input_shape", "output_shape", "chunk_size", "margin_um",
                "postproc_workers", "threads"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    with GPUSampler() as gpu:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        peak = wait_peak_rss(proc)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"slide {slide} failed (exit {proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_tree_mb"] = peak / 2**20
    res["gpu_sampled"] = gpu.summary()
    return res


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,60000", help="Slide sides in level-0 px (comma-separated).")
    ap.add_argument("--work", type=Path, default=None, help="Folder for slides and outputs (default: a temp dir).")
    ap.add_argument("--model", type=Path, default=None, help="A model folder (default: the tiny random model).")
    ap.add_argument("--original", action="store_true",
                    help="The original model (ResNet-34, six heads, 0.5 um/px) with every inference setting left to "
                         "the defaults chosen for the machine.")
    ap.add_argument("--tissue-fraction", type=float, default=0.45, help="Of the synthetic slides' field grid.")
    ap.add_argument("--encoder", default=None, help="Default: tiny (resnet34 with --original).")
    ap.add_argument("--head-channels", type=int, default=None, help="Default: 8 (the preset's with --original).")
    ap.add_argument("--model-mpp", type=float, default=None, help="Default: 4 (0.5 with --original).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None, help="Default: fp32 (auto with --original).")
    ap.add_argument("--batch-size", type=int, default=None, help="Default: 8 (auto with --original).")
    ap.add_argument("--input-shape", type=int, default=None, help="Default: 256 (1024 with --original).")
    ap.add_argument("--output-shape", type=int, default=None, help="Default: 128 (720 with --original).")
    ap.add_argument("--chunk-size", type=int, default=None, help="Default: 1024 (auto with --original).")
    ap.add_argument("--margin-um", type=float, default=256.0)
    ap.add_argument("--postproc-workers", type=int, default=None, help="Default: 1 (auto with --original).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the slide process.")
    ap.add_argument("--forward-batches", type=int, default=8, help="Batches timed for the forward-only figure.")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    pipeline = {"encoder": "tiny", "head_channels": 8, "model_mpp": 4.0, "precision": "fp32", "batch_size": 8,
                "input_shape": 256, "output_shape": 128, "chunk_size": 1024, "postproc_workers": 1}
    original = {"encoder": "resnet34", "model_mpp": 0.5, "precision": "auto"}
    for key, value in (original if args.original else pipeline).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return []

    import torch
    from model_speed import machine

    where = machine("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    from cerberus_histo.data.slide import write_synthetic_slide

    work = args.work or Path(tempfile.mkdtemp(prefix="wsi_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model = build_model(work / "model", args.encoder, args.head_channels, args.model_mpp)
    rows = []
    print(f"machine: {where}; model {args.model} ({args.encoder}) at {args.model_mpp} um/px, window "
          f"{args.input_shape or 1024}/{args.output_shape or 'input - 304'}, chunk {args.chunk_size or 'auto'} px, "
          f"margin {args.margin_um} um, {args.postproc_workers if args.postproc_workers is not None else 'auto'} "
          "post-processing worker(s)", flush=True)
    for side in (int(s) for s in args.sizes.split(",")):
        slide = work / f"slide_{side}.tif"
        if not slide.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(slide, side, side, mpp=0.5, seed=side, field=512, offset=128, n_fields=3,
                                  tissue_fraction=args.tissue_fraction, progress=False)
            print(f"wrote {slide.name} in {time.perf_counter() - t0:.1f} s", flush=True)
        out = work / f"out_{side}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        r = measure(args, slide, out)
        r.update(side=side, gpx=side * side / 1e9, s_per_mm2=r["wall_s"] / max(r["tissue_mm2"], 1e-9),
                 e2e_over_forward=r["wall_s"] / max(r["forward_only_s"], 1e-9),
                 windows_over_one_pass=r["windows"] / max(r["one_pass_windows"], 1))
        t = r["timings_s"]
        print(f"{side:>6}^2 px  wall {r['wall_s']:7.1f} s  tissue {r['tissue_mm2']:7.1f} mm2  "
              f"{r['s_per_mm2']:6.3f} s/mm2  objects {r['objects']:>8}  peak RSS {r['ru_maxrss_mb']:6.0f} MB "
              f"(tree {r['peak_rss_tree_mb']:6.0f} MB)  e2e/forward-only {r['e2e_over_forward']:5.2f}  "
              f"device busy {t['device_utilisation']:.0%}  [read {t['read']:.1f}, forward {t['forward']:.1f}, "
              f"post-process {t['postprocess']:.1f}, write {t['write']:.1f}, outputs {t['outputs']:.1f} s; "
              f"chunks {r['chunks']['with_tissue']}/{r['chunks']['total']} of {r['chunk_px']} px, windows "
              f"{r['windows']}]", flush=True)
        c = r["cache"] or {}
        print(f"  windows run / windows of one pass over the tissue: {r['windows']} / {r['one_pass_windows']} = "
              f"{r['windows_over_one_pass']:.3f}; window cache: {c.get('reused', 0)} reused, {c.get('kept', 0)} kept "
              f"({c.get('spilled', 0)} on disk, peak {c.get('peak_bytes', 0) / 2**20:.0f} MB in memory)", flush=True)
        print(f"  settings: {r['runtime']}", flush=True)
        if r["gpu_peak_gb"] is not None:
            print(f"  GPU: peak memory allocated {r['gpu_peak_gb']:.1f} GiB; {r['gpu_sampled']}; "
                  f"{r['wall_s'] / max(r['tissue_mm2'] / 100, 1e-9):.1f} s per cm2 of tissue", flush=True)
        rows.append(r)
    if len(rows) > 1:  # against the first size (the one-chunk slide), in this run
        base = rows[0]
        for r in rows[1:]:
            print(f"{r['side']}^2 against {base['side']}^2: s/mm2 x{r['s_per_mm2'] / base['s_per_mm2']:.3f}, windows / "
                  f"one pass {r['windows_over_one_pass']:.3f} (against {base['windows_over_one_pass']:.3f}), peak RSS "
                  f"{r['peak_rss_tree_mb'] / 1024:.2f} GB (tree; against {base['peak_rss_tree_mb'] / 1024:.2f} GB)",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": where, "args": {k: str(v) for k, v in
                                                                               vars(args).items()}, "rows": rows},
                                        indent=2))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
