"""Train the six-head model on synthetic data for a fixed budget of CPU minutes; report held-out metrics.

Three separately labelled tile datasets (glands with their classes, lumina, nuclei with their types) and a
tissue-class patch set are synthesised, cut into patches, and one model is trained on all four with
mixed-target batches, exactly as ``cerberus train`` does. Split 1 of every dataset is held out; the final
validation on it gives nuclei / gland / lumen PQ, type F1 and tissue accuracy, plus samples per second. Then, as
the demo does, 8 fresh tiles with every label go through ``infer_tiles`` and ``evaluate`` (PQ per task and the
dense tissue map's pixel accuracy), and 180 fresh tissue patches through the patch head (patch accuracy): the
dense map should come within 0.05 of the patch head.

The default model is the original six-head layout with the documented narrow ``small`` encoder (two convs
per stage, 16-128 channels, ~1 M parameters), the standard stride-2 stem and 32-channel head blocks at
256-px patches: ResNet-34 at 448 px takes ~10 s per batch-4 step on 2 CPU cores, too slow to learn anything
in 20 minutes.

    python benchmarks/train_synthetic.py                 # 1400 steps, about 17 minutes on 2 idle cores
    python benchmarks/train_synthetic.py --steps 150     # a shorter look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from cerberus_histo.data.patches import extract_patches
from cerberus_histo.data.synthetic import write_patches, write_tiles
from cerberus_histo.train.config import TrainConfig
from cerberus_histo.train.datamodule import Source
from cerberus_histo.train.run import train

TARGETS = {"nuclei-inst/pq": 0.6, "gland-inst/pq": 0.6, "lumen-inst/pq": 0.6, "tissue-class/accuracy": 0.9}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the data worker is joined when training ends)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_data(root: Path, tiles: int, size: int, per_class: int) -> dict[str, Path]:
    out = {}
    for i, task in enumerate(("gland", "lumen", "nuclei")):
        spec = write_tiles(root / task, tiles, size, seed=100 + i, tasks=(task,), name=f"synth-{task}")
        extract_patches(spec.root, root / "patches", size, size // 2, "mirror")
        out[task] = root / "patches" / spec.name
    spec = write_patches(root / "tissue", per_class, 144, seed=103)
    extract_patches(spec.root, root / "patches")
    out["pclass"] = root / "patches" / spec.name
    return out


def score_held_out(work: Path, model_dir: Path, precision: str) -> dict:
    """Fresh tiles through ``infer_tiles`` + ``evaluate`` (what the demo reports) and fresh patches through the patch
    head."""

    from cerberus_histo import Cerberus
    from cerberus_histo.infer.tiles import classify_patch_set, infer_tiles
    from cerberus_histo.metrics.evaluate import evaluate

    test = write_tiles(work / "data" / "test", 8, 448, seed=200, num_splits=1, name="synth-test", progress=False)
    infer_tiles(model_dir, test.root / "images", work / "tiles", precision=precision, progress=False)
    out = {f"{t}_pq": evaluate(t, work / "tiles", test.root)["summary"]["pq_mean"] for t in ("nuclei", "gland", "lumen")}
    tissue = evaluate("tissue", work / "tiles", test.root)["summary"]
    out.update(tissue_pixel_accuracy=tissue["accuracy"], tissue_balanced_accuracy=tissue["balanced_accuracy"])
    patches = write_patches(work / "data" / "test-patches", 20, 144, seed=201, num_splits=1, progress=False)
    pred, truth = classify_patch_set(Cerberus.load(model_dir), patches)
    out["patch_accuracy"] = float((pred == truth).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1400,
                    help="optimiser steps (cosine schedule to 0); 1400 take about 17 minutes on 2 idle CPU cores")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time cap of the training")
    ap.add_argument("--encoder", default="small")
    ap.add_argument("--stem-stride", type=int, default=2)
    ap.add_argument("--patch", type=int, default=256, help="segmentation patch side")
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--class-batch-size", type=int, default=45,
                    help="tissue patches per classification batch (144-px patches are cheap: more samples per second; "
                         "a multiple of 9 fills the 3 x 3 mosaics)")
    ap.add_argument("--p-seg", type=float, default=0.6, help="share of segmentation batches")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tiles", type=int, default=24, help="tiles per segmentation dataset")
    ap.add_argument("--tile-size", type=int, default=448)
    ap.add_argument("--per-class", type=int, default=40, help="tissue patches per class")
    ap.add_argument("--precision", default="bf16-mixed", help="32 or bf16-mixed (x1.6 on CPUs with AVX512-BF16)")
    ap.add_argument("--workers", type=int, default=1, help="data-loading processes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 + one data worker keeps both cores busy without OpenMP contention)")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and the run (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="cerberus-train-bench-"))
    t0 = time.perf_counter()
    data = make_data(work / "data", args.tiles, args.tile_size, args.per_class)
    t_data = time.perf_counter() - t0
    cfg = TrainConfig(batch_size=args.batch_size, class_batch_size=args.class_batch_size, p_seg=args.p_seg,
                      max_steps=args.steps, max_minutes=args.minutes, val_every=args.steps, val_fraction=1.0,
                      val_max_samples=10**6, optimizer={"lr": args.lr}, scheduler={"name": "cosine"}, seed=5,
                      precision=args.precision, num_workers=args.workers,
                      model={"encoder": args.encoder, "stem_stride": args.stem_stride, "head_channels": 32,
                             "patch_shape": args.patch})
    sources = [Source(data["gland"], ("gland-inst", "gland-type")), Source(data["lumen"], ("lumen-inst",)),
               Source(data["nuclei"], ("nuclei-inst", "nuclei-type")), Source(data["pclass"], ("tissue-class",))]
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    summary = train(sources, work / "run", cfg, fold=1, mix=True, progress=True)
    cpu_min, wall_min = (_cpu_seconds() - cpu0) / 60, (time.perf_counter() - wall0) / 60
    val = summary["validation"]
    held_out = score_held_out(work, work / "run" / "model", "bf16" if args.precision == "bf16-mixed" else "fp32")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "encoder": args.encoder, "stem_stride": args.stem_stride, "patch": args.patch,
              "batch_size": args.batch_size, "class_batch_size": args.class_batch_size,
              "p_seg": args.p_seg, "precision": args.precision, "threads": args.threads,
              "train_wall_minutes": round(wall_min, 1), "train_cpu_minutes": round(cpu_min, 1),
              "load_average_at_end": os.getloadavg()[0], "data_seconds": round(t_data, 1),
              "steps": summary["steps"], "samples_per_second": summary["samples_per_second"], "validation": val,
              "held_out_tiles": held_out,
              "targets_met": {k: val.get(k, 0) >= v for k, v in TARGETS.items()}, "run": str(work / "run")}
    print(json.dumps(result, indent=2))
    print(f"\n{'metric':<24}{'held-out':>10}{'target':>9}")
    for key in ("nuclei-inst/pq", "nuclei-type/f1", "gland-inst/pq", "gland-type/f1", "lumen-inst/pq",
                "tissue-class/accuracy"):
        target = f"{TARGETS[key]:.2f}" if key in TARGETS else ""
        print(f"{key:<24}{val.get(key, float('nan')):>10.3f}{target:>9}")
    print(f"\nheld-out tiles (8, infer_tiles + evaluate): nuclei PQ {held_out['nuclei_pq']:.3f}, gland PQ "
          f"{held_out['gland_pq']:.3f}, lumen PQ {held_out['lumen_pq']:.3f}; tissue: dense map pixel accuracy "
          f"{held_out['tissue_pixel_accuracy']:.3f} (balanced {held_out['tissue_balanced_accuracy']:.3f}), patch head "
          f"on 180 held-out patches {held_out['patch_accuracy']:.3f}, difference "
          f"{held_out['patch_accuracy'] - held_out['tissue_pixel_accuracy']:+.3f} (target: within 0.05)")
    print(f"{summary['steps']} steps in {wall_min:.1f} wall minutes ({cpu_min:.1f} CPU minutes of this process and its"
          f" data worker, validation included), {summary['samples_per_second']:.1f} samples/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
