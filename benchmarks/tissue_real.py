"""The tissue head on real H&E: Kather 2016 tiles classified by a model trained on them, and the real CMU slide's
tissue map against the automatic tissue mask, for a model trained on synthetic data.

1. **Kather 2016** (``../shared/data/real/kather2016``: 3 tiles of each of 8 classes, 150 px at 0.495 um/px):
   ``cerberus import-dataset kather`` (round-robin splits), ``cerberus train --pclass --fold 1`` (the tissue head
   alone, 3 x 3 mosaics of the 16 training tiles), then the 8 held-out tiles of split 1 (one per class) through the
   patch head (``Cerberus.classify_patches``, at the model's mpp) and through ``cerberus infer-tile`` + ``cerberus
   evaluate --task tissue --split 1`` (the dense map's majority). Eight tiles: a smoke figure, not an accuracy.
2. **CMU-1-Small-Region** (``../shared/data``, 2220 x 2967 px at 0.499 um/px): the dense tissue map of the whole
   slide (``predict_wsi`` with a mask that covers everything, so no window is skipped) from a model trained only
   on synthetic data (``--model``, e.g. ``demo-output/train/model``; without it a tissue-only model is trained on
   synthetic patches first), compared cell by cell with the automatic tissue mask (``io.tissue.tissue_mask``):
   the IoU of "not background" with "tissue".

    python benchmarks/tissue_real.py                                   # about 6 minutes on 2 CPU cores
    python benchmarks/tissue_real.py --model demo-output/train/model   # the demo's model for the slide
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from train_real import cerberus  # the same subprocess runner (benchmarks/ is on sys.path when run as a script)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KATHER = SHARED / "real" / "kather2016" / "Kather_texture_2016_image_tiles_5000"
CMU = SHARED / "CMU-1-Small-Region.svs"
MODEL = {"encoder": "small", "stem_stride": 2, "head_channels": 32, "patch_shape": 256}


def train_tissue(data: Path, run: Path, steps: int, work: Path, env: dict) -> Path:
    params = {"batch_size": 6, "class_batch_size": 18, "max_steps": steps, "val_every": steps, "val_fraction": 1.0,
              "optimizer": {"lr": 2e-3}, "scheduler": {"name": "cosine"}, "precision": "bf16-mixed", "num_workers": 1,
              "seed": 5, "model": MODEL}
    (work / f"{run.name}.yaml").write_text(yaml.safe_dump(params))
    cerberus("train", "--pclass", "--pclass-dir", data, "--fold", "1", "--config", work / f"{run.name}.yaml",
             "--log-dir", run, env=env)
    return run / "model"


def kather(work: Path, steps: int, env: dict) -> dict:
    from cerberus_histo import Cerberus
    from cerberus_histo.data.dataset import load_dataset
    from cerberus_histo.infer.tiles import classify_patch_set

    data, pred_dir = work / "kather", work / "kather-pred"
    print(cerberus("import-dataset", "kather", KATHER, data, env=env).strip())
    t0 = time.perf_counter()
    model_dir = train_tissue(data, work / "kather-run", steps, work, env)
    t_train = time.perf_counter() - t0
    spec = load_dataset(data)
    names = spec.names(split=1)
    model = Cerberus.load(model_dir)
    pred, truth = classify_patch_set(model, spec, names)
    for n in names:
        cerberus("infer-tile", "--model", model_dir, "--input", spec.image_path(n), "--output", pred_dir,
                 "--mpp", spec.image_mpp(n), "--formats", "npz", env=env)
    cerberus("evaluate", "--task", "tissue", "--pred", pred_dir, "--true", data, "--split", "1", env=env)
    dense = json.loads((pred_dir / "evaluation_tissue.json").read_text())["summary"]
    names_of = list(model.config.task("tissue").class_names)
    return {"train_tiles": len(spec.names()) - len(names), "held_out_tiles": len(names), "steps": steps,
            "train_seconds": round(t_train, 1), "patch_head_accuracy": float((pred == truth).mean()),
            "dense_map_accuracy": dense["accuracy"], "chance": 1 / len(set(spec.image_classes("tissue").values())),
            "held_out": {n: {"truth": names_of[t], "patch_head": names_of[p]}
                         for n, t, p in zip(names, truth, pred, strict=True)}}


def cmu(work: Path, model_dir: Path | None, steps: int, env: dict) -> dict:
    import cv2

    from cerberus_histo import Cerberus
    from cerberus_histo.data.synthetic import write_patches
    from cerberus_histo.io.files import write_png
    from cerberus_histo.io.slides import open_slide
    from cerberus_histo.io.tissue import tissue_mask

    trained = model_dir is None
    if trained:
        spec = write_patches(work / "synthetic-patches", 40, 144, seed=103, progress=False)
        model_dir = train_tissue(spec.root, work / "synthetic-run", steps, work, env)
    model = Cerberus.load(model_dir)
    with open_slide(CMU) as reader:
        mask, _ = tissue_mask(reader)
        width, height = reader.dimensions
    everything = work / "all-tissue.png"  # a mask covering the whole slide: every window runs
    write_png(everything, np.full((max(1, height // 32), max(1, width // 32)), 255, np.uint8))
    t0 = time.perf_counter()
    res = model.predict_wsi(CMU, work / "cmu", mask=everything, progress=False)
    seconds = time.perf_counter() - t0
    cells = cv2.imread(str(res.paths["tissue"]), cv2.IMREAD_UNCHANGED)
    auto = cv2.resize(mask.astype(np.uint8), cells.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    tissue = cells > 0
    iou = float((tissue & auto).sum() / max((tissue | auto).sum(), 1))
    names = model.config.task("tissue").class_names
    share = np.bincount(cells.ravel(), minlength=len(names)) / cells.size
    return {"model": str(model_dir), "trained_here_on_synthetic_patches": trained, "cells": list(cells.shape),
            "iou_tissue_vs_mask": iou, "mask_tissue_share": float(auto.mean()), "map_tissue_share": float(tissue.mean()),
            "agreement": float((tissue == auto).mean()), "seconds": round(seconds, 1),
            "class_share": {names[c]: round(float(v), 3) for c, v in enumerate(share) if v > 0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of each tissue-only model")
    ap.add_argument("--model", type=Path, default=None,
                    help="a model trained on synthetic data for the slide (default: train one on synthetic patches)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (plus one data worker)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args()
    for path in (KATHER, CMU):
        if not path.exists():
            sys.exit(f"{path}: not found (../shared/data beside the project)")
    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = args.work or Path(tempfile.mkdtemp(prefix="cerberus-tissue-real-"))
    work.mkdir(parents=True, exist_ok=True)
    k = kather(work, args.steps, env)
    c = cmu(work, args.model, args.steps, env)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "threads": args.threads, "load_average_at_end": os.getloadavg()[0], "kather2016": k, "cmu_slide": c,
              "work": str(work)}
    print(json.dumps(result, indent=2))
    print(f"\nKather 2016, {k['held_out_tiles']} held-out tiles (one per class; trained on {k['train_tiles']}, "
          f"{k['steps']} steps, {k['train_seconds']:.0f} s): patch head {k['patch_head_accuracy']:.3f}, dense map "
          f"{k['dense_map_accuracy']:.3f} (chance {k['chance']:.3f}) - a smoke figure")
    print(f"CMU-1-Small-Region, model trained on synthetic data: tissue map (not background) vs automatic tissue "
          f"mask IoU {c['iou_tissue_vs_mask']:.3f} (cells agree {c['agreement']:.3f}; tissue share map "
          f"{c['map_tissue_share']:.3f}, mask {c['mask_tissue_share']:.3f}), {c['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
