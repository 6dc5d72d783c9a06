"""Post-processing speed: megapixels per second for nuclei and glands (instances + types + records), and the
ratio to the straightforward per-instance-loop versions of the same algorithms (tests/postproc_reference.py),
measured in one run on the same maps.

The maps are probabilities made from a synthetic truth (about 1.2 nuclei per 1000 px, i.e. ~20,000 nuclei at
4096 x 4096), blurred and noised. The loop versions work on full-size masks per instance, so they are timed on a
smaller map (``--loop-size``) and both versions are timed there for the ratio.

    python benchmarks/postproc_speed.py --size 4096 --loop-size 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from postproc_reference import gland_loop, nuclei_loop, records_loop, types_loop  # noqa: E402

from cerberus_histo.data.targets import instance_target  # noqa: E402
from cerberus_histo.postproc import gland_instances, instance_types, measure, nuclei_instances  # noqa: E402


def truth(size: int, rng, kind: str) -> np.ndarray:
    inst = np.zeros((size, size), np.int32)
    if kind == "nuclei":
        n, axes = int(size * size * 1.2e-3), (4, 9)
    else:
        n, axes = int(size * size * 1.8e-5), (30, 70)
    centres = rng.uniform(0, size, (n, 2))
    for i, (y, x) in enumerate(centres, start=1):
        a, b = rng.uniform(*axes, 2)
        cv2.ellipse(inst, (int(x), int(y)), (int(a), int(b)), float(rng.uniform(0, 180)), 0, 360, i, -1)
    return inst


def probs(inst: np.ndarray, k: int, rng) -> np.ndarray:
    label = instance_target(inst, k)
    p = np.stack([(label == c).astype(np.float32) for c in range(3)])
    p = ndi.gaussian_filter(p, (0, 1, 1)) + rng.normal(0, 0.05, p.shape).astype(np.float32)
    p = np.clip(p, 1e-3, None)
    return p / p.sum(0, keepdims=True)


def run_fast(kind, p, type_map):
    inst = nuclei_instances(p[1], p[2]) if kind == "nuclei" else gland_instances(p[1], p[2])
    instance_types(inst, type_map, 7)
    return inst, measure(inst)


def run_loop(kind, p, type_map):
    inst = nuclei_loop(p[1], p[2]) if kind == "nuclei" else gland_loop(p[1], p[2])
    types_loop(inst, type_map)
    return inst, records_loop(inst)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--loop-size", type=int, default=1024, help="nuclei map side for the loop comparison")
    ap.add_argument("--gland-loop-size", type=int, default=4096, help="gland map side for the loop comparison")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    for kind, k in (("nuclei", 3), ("glands", 11)):
        big = truth(args.size, rng, kind)
        p = probs(big, k, rng)
        types = rng.integers(0, 7, big.shape)
        secs, (inst, recs) = timed(run_fast, kind, p, types)
        mpx = args.size ** 2 / 1e6
        print(f"{kind:<7} {args.size}^2: {len(recs):6d} instances, {secs:6.2f} s, {mpx / secs:6.1f} Mpx/s (vectorised)")
        side = args.loop_size if kind == "nuclei" else args.gland_loop_size
        small = big if side == args.size else truth(side, rng, kind)
        if small is not big:
            p = probs(small, k, rng)
            types = rng.integers(0, 7, small.shape)
        fast, (inst_f, recs_f) = timed(run_fast, kind, p, types)
        loop, (inst_l, recs_l) = timed(run_loop, kind, p, types)
        same = np.array_equal(inst_f, inst_l) and len(recs_f) == len(recs_l)
        print(f"{kind:<7} {side}^2: {len(recs_f):6d} instances, vectorised {fast:6.2f} s, "
              f"per-instance loops {loop:7.2f} s: x{loop / fast:.1f} faster, same result: {same}")


if __name__ == "__main__":
    main()
