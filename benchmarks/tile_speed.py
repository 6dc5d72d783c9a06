"""Tile inference speed: the original's geometry run as the original ran it vs our default, same model, one run.

* **original as run**: 448-px windows keeping their central 144 px on a stride-144 grid, every patch run twice
  (the original's tile mode appends an identical copy of each patch and averages the two, spec §7.3).
* **ours**: the engine's default, 1024-px windows keeping 720 px (margin 152, as the original), shrunk to fit
  the tile, every window run once.

Both use the same engine, model, precision, batch size and post-processing, on one synthetic H&E tile, so the
printed ratios hold on a noisy machine. Reported per run: seconds per megapixel end to end (network, stitching,
post-processing), network windows and the share of time outside the forward pass. Also printed: how far the
two runs' results are apart away from the tile's borders (probabilities and nuclei/gland instances; PQ between
the two instance maps), and with ``--noise-floor`` the same for the original against itself with its window grid
shifted by 48 px (phase kept), which is how much the original's own arbitrary tiling moves its results.

    python benchmarks/tile_speed.py                        # CPU: resnet34, 512 px, bf16
    python benchmarks/tile_speed.py --device cuda --size 2048 --precision fp16 --batch-size 16 --noise-floor
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import calibrated, machine  # noqa: E402

from cerberus_histo import Cerberus, ModelConfig  # noqa: E402
from cerberus_histo.data.synthetic import synth_tile  # noqa: E402
from cerberus_histo.infer.engine import Predictor  # noqa: E402
from cerberus_histo.infer.tiles import postprocess_region  # noqa: E402
from cerberus_histo.infer.tiling import Geometry  # noqa: E402
from cerberus_histo.io.readers import ArrayReader  # noqa: E402
from cerberus_histo.metrics import pq  # noqa: E402


class OriginalAsRun(Predictor):
    """The original's tile mode: every patch of a batch is run twice and the two outputs averaged."""

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        n = batch.shape[0]
        out = self.model.forward_dense(torch.cat([batch, batch]), self.heads)
        return {k: (v[:n] + v[n:]) / 2 for k, v in out.items()}


def timed_run(predictor: Predictor, reader: ArrayReader, region=None) -> dict:
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pred = predictor.predict_region(reader, region)
    t1 = time.perf_counter()
    results = postprocess_region(pred)
    t2 = time.perf_counter()
    return {"pred": pred, "results": results, "network_s": t1 - t0, "postprocess_s": t2 - t1, "total_s": t2 - t0,
            "forward_s": pred.timings["forward"], "windows": pred.windows}


def agreement(a: dict, b: dict, border: int, crop=(0, 0)) -> dict:
    """Differences between two runs' probabilities (pixels >= ``border`` from the tile's edges) and instances."""
    oy, ox = crop
    out = {}
    for name, p in a["pred"].probs.items():
        q = b["pred"].probs[name]
        if name.endswith("-class"):  # cells of 16 px: compare cells wholly inside the interior
            c = -(-border // 16)
            p, q = p[:, c:-c or None, c:-c or None], q[:, c + oy // 16:, c + ox // 16:][:, :p.shape[1] - 2 * c, :p.shape[2] - 2 * c]
        else:
            q = q[:, oy:oy + p.shape[1], ox:ox + p.shape[2]]
            p, q = (x[:, border:-border or None, border:-border or None] for x in (p, q))
        d = np.abs(p.astype(np.float32) - q.astype(np.float32))
        out[name] = {"mean_abs_dprob": float(d.mean()), "max_abs_dprob": float(d.max()),
                     "argmax_agrees": float((p.argmax(0) == q.argmax(0)).mean())}
    for task in ("nuclei", "gland"):
        ia = a["results"][task].inst_map
        ib = b["results"][task].inst_map[oy:oy + ia.shape[0], ox:ox + ia.shape[1]]
        r = pq(ia, ib)
        out[f"{task} instances"] = {"count_a": int(len(np.unique(ia)) - 1), "count_b": int(len(np.unique(ib)) - 1),
                                    "pq": r.pq, "dq": r.dq, "sq": r.sq}
    return out


def print_agreement(title: str, agree: dict) -> None:
    print(title)
    for name, v in agree.items():
        if "pq" in v:
            print(f"  {name:<18} {v['count_a']:5d} vs {v['count_b']:5d}   PQ {v['pq']:.3f} (DQ {v['dq']:.3f}, "
                  f"SQ {v['sq']:.3f})")
        else:
            print(f"  {name:<18} mean |dprob| {v['mean_abs_dprob']:.4f}   max {v['max_abs_dprob']:.3f}   "
                  f"argmax agrees {v['argmax_agrees']:.2%}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="tile side in pixels (0.5 um/px)")
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--noise-floor", action="store_true", help="also run the original geometry with a shifted grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = calibrated(Cerberus(ModelConfig.preset("original", encoder=args.encoder)).to(args.device), args.device)
    image = synth_tile(args.size, seed=args.seed).image
    reader = ArrayReader(image, model.config.mpp)
    mpx = args.size * args.size / 1e6
    opts = {"batch_size": args.batch_size, "device": args.device, "precision": args.precision}
    runs = {"original as run (448/144, x2)": OriginalAsRun(model, Geometry.original(), **opts),
            "ours (default)": Predictor(model, **opts)}
    print(f"machine     {machine(args.device)}")
    print(f"model       original preset, {args.encoder}, random weights (calibrated BatchNorm), {args.precision}, "
          f"batch {args.batch_size}; tile {args.size} x {args.size} px ({mpx:.2f} Mpx)")
    timed_run(runs["ours (default)"], ArrayReader(image[:64, :64], model.config.mpp))  # warm-up
    res = {name: timed_run(p, reader) for name, p in runs.items()}
    results = {"machine": machine(args.device), "encoder": args.encoder, "precision": args.precision,
               "batch_size": args.batch_size, "size": args.size, "runs": {}}
    print(f"{'run':<30} {'windows':>8} {'network s':>10} {'post s':>8} {'s / Mpx':>9} {'outside forward':>16}")
    for name, r in res.items():
        outside = 1 - r["forward_s"] / r["total_s"]
        results["runs"][name] = {"windows": r["windows"], "network_s": r["network_s"], "forward_s": r["forward_s"],
                                 "postprocess_s": r["postprocess_s"], "total_s": r["total_s"],
                                 "s_per_mpx": r["total_s"] / mpx, "share_outside_forward": outside}
        print(f"{name:<30} {r['windows']:>8} {r['network_s']:>10.2f} {r['postprocess_s']:>8.2f} "
              f"{r['total_s'] / mpx:>9.2f} {outside:>15.1%}")
    a, b = res.values()
    results["speedup_end_to_end"] = a["total_s"] / b["total_s"]
    results["speedup_forward"] = a["forward_s"] / b["forward_s"]
    print(f"ours vs original as run: x{results['speedup_end_to_end']:.2f} end to end, "
          f"x{results['speedup_forward']:.2f} forward time")
    border = min(Geometry.original().margin, args.size // 4)
    results["agreement"] = agreement(a, b, border)
    print_agreement(f"original as run vs ours, pixels >= {border} px from the tile's edges:", results["agreement"])
    if args.noise_floor:
        shift = 48
        region = (-shift, -shift, args.size + shift, args.size + shift)
        c = timed_run(Predictor(model, Geometry.original(), **opts), reader, region)
        results["noise_floor"] = agreement(a, c, border, crop=(shift, shift))
        print_agreement(f"noise floor: original vs original with its grid shifted by {shift} px:",
                        results["noise_floor"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
