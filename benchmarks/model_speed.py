"""Model size and forward throughput of the original preset (ResNet-34, six heads) at N x 3 x 448 x 448.

Every variant is timed in the same run, so the printed ratios (relative to fp32) hold on a noisy machine:
fp32, bf16 autocast, channels_last, and channels_last + bf16 (on CUDA also fp16 autocast and TF32). Each variant's
softmax probabilities are compared with fp32's (worst head: mean |probability difference| and the
fraction of pixels whose argmax agrees), on random weights with calibrated BatchNorm statistics and random
input, to show what the lower precision changes.

    python benchmarks/model_speed.py                      # CPU, batch 1
    python benchmarks/model_speed.py --device cuda --batch-size 16 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cerberus_histo import Cerberus, ModelConfig  # noqa: E402

ORIGINAL_PARAMS = 28_377_284  # the original resnet34 model, including its unused ImageNet classifier
ORIGINAL_FC = 512 * 1000 + 1000


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def time_variant(model, x, device, dtype, channels_last, repeats, warmup):
    """Median seconds per forward, and the variant's softmax probabilities of the first image."""
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    # fp32 means fp32: cuDNN's default TF32 convolutions are timed as their own variant
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    dtype = None if dtype == "tf32" else dtype
    times = []
    with torch.inference_mode(), torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        probs = {k: v[:1].float().softmax(1).cpu() for k, v in model(x).items()}
        for i in range(warmup + repeats):
            if kind == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if kind == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), probs


def calibrated(model, device):
    """Random weights with BatchNorm statistics measured on random images, so activations and logits have
    a realistic scale (with default statistics they grow layer after layer and saturate the softmax)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (4, 3, 160, 160), device=device).float())
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = calibrated(Cerberus(ModelConfig.preset("original")).to(args.device), args.device)
    n_params = model.num_parameters()
    x = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), device=args.device).float()
    variants = [("fp32", None, False), ("bf16 autocast", torch.bfloat16, False), ("channels_last", None, True),
                ("channels_last + bf16", torch.bfloat16, True)]
    if args.device.startswith("cuda"):
        variants += [("fp16 autocast", torch.float16, False), ("tf32", "tf32", False), ("channels_last + tf32", "tf32", True)]
    results = {"machine": machine(args.device), "device": args.device, "batch_size": args.batch_size,
               "input": f"{args.batch_size}x3x{args.size}x{args.size}", "parameters": n_params,
               "original_parameters": ORIGINAL_PARAMS, "variants": {}}
    print(f"machine     {results['machine']}")
    print(f"parameters  {n_params:,} (original {ORIGINAL_PARAMS:,} = ours + {ORIGINAL_FC:,} in its unused "
          f"ImageNet fc: {'match' if n_params + ORIGINAL_FC == ORIGINAL_PARAMS else 'MISMATCH'})")
    base = ref = None
    for name, dtype, cl in variants:
        t, probs = time_variant(model, x, args.device, dtype, cl, args.repeats, args.warmup)
        base, ref = base or t, ref or probs
        diff = max(float((probs[k] - ref[k]).abs().mean()) for k in ref)
        agree = min(float((probs[k].argmax(1) == ref[k].argmax(1)).float().mean()) for k in ref)
        ips = args.batch_size / t
        results["variants"][name] = {"seconds_per_batch": t, "images_per_s": ips, "speedup_vs_fp32": base / t,
                                     "mean_prob_diff_vs_fp32": diff, "argmax_agreement_vs_fp32": agree}
        print(f"{name:<22} {t * 1000:9.1f} ms/batch  {ips:8.2f} img/s  x{base / t:.2f} vs fp32  "
              f"mean |dprob| {diff:.4f}  argmax agrees {agree:.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
