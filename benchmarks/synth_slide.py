"""Synthetic slide writing: time and peak memory (RSS) for growing slide sizes, each in a fresh process.

The ratio of peak memory between the largest and smallest slide shows that memory does not grow with size.

    python benchmarks/synth_slide.py --sizes 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
sys.path.insert(0, {src!r})
from cerberus_histo.data.slide import write_synthetic_slide
t = time.perf_counter()
p = write_synthetic_slide({out!r}, {side}, {side}, seed=0, progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, p.stat().st_size)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    args = ap.parse_args(argv)
    src = str(Path(__file__).resolve().parents[1] / "src")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            code = CHILD.format(src=src, out=f"{tmp}/s{side}.tif", side=side)
            secs, rss_kb, size = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True).stdout.split()
            rows.append({"side": side, "seconds": float(secs), "peak_rss_mb": int(rss_kb) / 1024,
                         "file_mb": int(size) / 1e6})
            r = rows[-1]
            print(f"{side:>6} x {side:<6} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"file {r['file_mb']:8.1f} MB  {side * side / r['seconds'] / 1e6:6.1f} Mpx/s")
    print(f"peak memory, largest / smallest slide ({(args.sizes[-1] / args.sizes[0]) ** 2:.0f}x the pixels): "
          f"x{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
