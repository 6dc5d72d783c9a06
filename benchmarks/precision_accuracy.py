"""Does bf16 autocast cost a trained model accuracy? The same held-out data through inference in fp32 and in bf16.

For each model given, the held-out images go through ``infer_tiles`` twice, ``precision="fp32"`` and ``"bf16"``
(the same model, engine, batch size, device and everything else), and are scored with ``evaluate`` exactly as the
demo and ``train_real.py`` score them. Each metric is printed in both precisions with the difference; the
acceptance rule is that bf16 may only be a default where every |bf16 - fp32| <= 0.01. Each pass is timed (the
engine's forward seconds, summed over the images, and the whole pass with post-processing and writing) and the
fp32 / bf16 ratio printed.

- ``--demo DIR``, a ``cerberus demo`` output folder: the model DIR/train/model; the held-out tiles of DIR/data/test
  (nuclei, gland and lumen PQ, the dense tissue map's pixel accuracy) and the held-out tissue patches of
  DIR/data/test-patches through the patch head (``classify_patch_set``; it has no precision argument, so the bf16
  pass runs it under ``torch.autocast`` and reports the head's logit dtype to show that autocast took effect);
- ``--monuseg DIR``, a ``train_real.py`` work folder: the model DIR/run/model; the split-1 images of DIR/monuseg,
  each at its own mpp, scored as ``cerberus evaluate --task nuclei --split 1`` (PQ, AJI, Dice, detection F1).

Only the ``npz`` maps are written (what ``evaluate`` reads), so the whole-pass time is mostly network and
post-processing. fp32 runs first, then bf16.

    python benchmarks/precision_accuracy.py --demo /tmp/demo5 --monuseg /tmp/tr05     # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import machine  # noqa: E402

from cerberus_histo import Cerberus  # noqa: E402
from cerberus_histo.data.dataset import load_dataset  # noqa: E402
from cerberus_histo.infer.tiles import classify_patch_set, infer_tiles  # noqa: E402
from cerberus_histo.metrics.evaluate import evaluate  # noqa: E402

TOLERANCE = 0.01
PRECISIONS = ("fp32", "bf16")


def run_tiles(model_dir: Path, inputs: list[tuple[Path, float | None]], out: Path, precision: str) -> dict:
    """``infer_tiles`` on each ``(image file or folder, mpp)`` into a fresh ``out``: forward and whole-pass seconds."""
    shutil.rmtree(out, ignore_errors=True)
    forward, t0 = 0.0, time.perf_counter()
    for path, mpp in inputs:
        summary = infer_tiles(model_dir, path, out, mpp=mpp, precision=precision, formats=("npz",), progress=False)
        if summary.failed:
            sys.exit(f"infer_tiles failed ({precision}): {summary.failed}")
        forward += summary.timings.get("forward", 0.0)
    return {"forward_s": forward, "pass_s": time.perf_counter() - t0}


def score_demo(root: Path, work: Path, precision: str) -> dict:
    """Nuclei / gland / lumen PQ and the tissue map's pixel accuracy on the held-out tiles; the patch head's
    accuracy on the held-out patches."""
    model_dir, test = root / "train" / "model", root / "data" / "test"
    out = work / f"demo-tiles-{precision}"
    timings = run_tiles(model_dir, [(test / "images", None)], out, precision)
    scores = {f"{t}_pq": evaluate(t, out, test)["summary"]["pq_mean"] for t in ("nuclei", "gland", "lumen")}
    scores["tissue_pixel_accuracy"] = evaluate("tissue", out, test)["summary"]["accuracy"]

    model = Cerberus.load(model_dir)
    dtypes = []
    hook = model.heads["tissue-class"].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred, truth = classify_patch_set(model, load_dataset(root / "data" / "test-patches"))
    timings["patch_head_s"] = time.perf_counter() - t0
    hook.remove()
    scores["patch_accuracy"] = float((pred == truth).mean())
    return {"scores": scores, "timings": timings, "tiles": len(load_dataset(test).names()), "patches": len(truth),
            "patch_logit_dtype": str(dtypes[0]).replace("torch.", ""), "patch_pred": pred.tolist()}


def score_monuseg(root: Path, work: Path, precision: str) -> dict:
    """Nuclei PQ, AJI, Dice and detection F1 on the split-1 images, each inferred at its own mpp."""
    data = root / "monuseg"
    spec = load_dataset(data)
    names = spec.names(1)
    out = work / f"monuseg-{precision}"
    timings = run_tiles(root / "run" / "model", [(spec.image_path(n), spec.image_mpp(n)) for n in names], out,
                        precision)
    s = evaluate("nuclei", out, data, split=1)["summary"]
    scores = {"nuclei_pq": s["pq_mean"], "nuclei_aji": s["aji_mean"], "nuclei_dice": s["dice_mean"],
              "nuclei_detection_f1": s["detection_f1"]}
    return {"scores": scores, "timings": timings, "images": names}


def compare(name: str, runs: dict[str, dict]) -> dict:
    """Print one model's fp32 / bf16 table, the acceptance verdict and the timings; the comparison as a dict."""
    fp32, bf16 = runs["fp32"], runs["bf16"]
    diff = {k: bf16["scores"][k] - v for k, v in fp32["scores"].items()}
    worst = max(diff, key=lambda k: abs(diff[k]))
    ok = all(abs(d) <= TOLERANCE for d in diff.values())
    print(f"\n{'metric':<26}{'fp32':>9}{'bf16':>9}{'bf16-fp32':>11}")
    for k, d in diff.items():
        flag = "" if abs(d) <= TOLERANCE else "  > 0.01"
        print(f"{k:<26}{fp32['scores'][k]:>9.4f}{bf16['scores'][k]:>9.4f}{d:>+11.4f}{flag}")
    print(f"every |difference| <= {TOLERANCE}: {'YES' if ok else 'NO'} (largest {diff[worst]:+.4f}, {worst})")
    speed = {}
    for key, label in (("forward_s", "network forward"), ("pass_s", "whole infer_tiles pass"),
                       ("patch_head_s", "patch head")):
        if key in fp32["timings"]:
            a, b = fp32["timings"][key], bf16["timings"][key]
            speed[key] = a / b
            print(f"{label:<26}{a:>8.1f}s{b:>8.1f}s   fp32/bf16 x{a / b:.2f}")
    result = {"model": name, "fp32": fp32, "bf16": bf16, "difference": diff, "largest": worst,
              "within_tolerance": ok, "speed_ratio_fp32_over_bf16": speed}
    if "patch_pred" in fp32:
        changed = sum(a != b for a, b in zip(fp32.pop("patch_pred"), bf16.pop("patch_pred"), strict=True))
        print(f"patch head logits: {fp32['patch_logit_dtype']} (fp32 pass), {bf16['patch_logit_dtype']} (bf16 pass, "
              f"autocast {'took effect' if bf16['patch_logit_dtype'] == 'bfloat16' else 'DID NOT take effect'}); "
              f"{changed} of {fp32['patches']} patch classes changed")
        result["patch_classes_changed"] = changed
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=None, help="a `cerberus demo` output folder")
    ap.add_argument("--monuseg", type=Path, default=None, help="a benchmarks/train_real.py work folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--work", type=Path, default=None, help="folder for the predictions (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args()
    if args.demo is None and args.monuseg is None:
        ap.error("give --demo DIR and/or --monuseg DIR")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="cerberus-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine("cpu"), "torch_threads": torch.get_num_threads(),
              "load_average_at_start": os.getloadavg(), "tolerance": TOLERANCE, "models": {}}
    print(f"{result['machine']}\ntorch threads {torch.get_num_threads()}, load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, work {work}")
    jobs = [(args.demo, "demo", score_demo), (args.monuseg, "monuseg", score_monuseg)]
    for root, kind, score in jobs:
        if root is None:
            continue
        runs = {p: score(root, work, p) for p in PRECISIONS}
        what = (f"{runs['fp32']['tiles']} held-out tiles, {runs['fp32']['patches']} held-out patches"
                if kind == "demo" else f"split-1 images {', '.join(runs['fp32']['images'])}")
        print(f"\n== {kind}: {root} ({what})", end="")
        result["models"][kind] = compare(str(root), runs)
    result["load_average_at_end"] = os.getloadavg()
    result["all_within_tolerance"] = all(m["within_tolerance"] for m in result["models"].values())
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; bf16 within {TOLERANCE} on every "
          f"metric of every model: {'YES' if result['all_within_tolerance'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
