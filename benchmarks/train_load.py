"""Training steps per minute with the default threads, alone and beside one busy process per core, in one run.

The same ``cerberus train`` command (synthetic nuclei patches, the ``small`` encoder, the defaults of the machine)
runs for a fixed wall time four times: with the defaults and with ``--threads`` set to every core (torch's own
default, what training used before it chose its threads), each on the idle machine and beside one busy process
per core that the run does not own (a CPU loop that stops by itself). It prints the steps per minute of each and
the share of its idle speed each keeps under load, with the load average, and the settings line of each run.

    python benchmarks/train_load.py                  # 4 runs of 75 s, about 7 minutes on 2 cores
    python benchmarks/train_load.py --seconds 30     # a shorter look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def make_data(root: Path) -> Path:
    from cerberus_histo.data.patches import extract_patches
    from cerberus_histo.data.synthetic import write_tiles

    spec = write_tiles(root / "nuclei", 12, 256, seed=3, tasks=("nuclei",), name="synth-nuclei", progress=False)
    extract_patches(spec.root, root / "patches", 256, 128, "mirror", progress=False)
    return root / "patches" / "synth-nuclei"


def run(data: Path, work: Path, seconds: float, threads: int | None, busy: int) -> dict:
    """One training run of ``seconds`` (training only; start-up excluded) beside ``busy`` CPU loops."""
    params = work / "params.yaml"
    params.write_text(f"batch_size: 4\nmax_steps: 1000000\nmax_minutes: {seconds / 60:.4f}\nval_every: 1000000\n"
                      "precision: 32\nmodel:\n  encoder: small\n  patch_shape: 128\n")
    log_dir = Path(tempfile.mkdtemp(dir=work))
    loops = [subprocess.Popen([sys.executable, "-c", BUSY.format(limit=seconds * 4 + 120)]) for _ in range(busy)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the defaults, as a user has them
    try:
        time.sleep(1.0 if busy else 0.0)  # the loops are running when the run looks at the machine
        load0 = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "cerberus_histo", "train", "--nuclei-dir", str(data), "--fold", "0",
               "--config", str(params), "--log-dir", str(log_dir), *(["--threads", str(threads)] if threads else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds * 6 + 600)
        load1 = os.getloadavg()[0]
    finally:
        for p in loops:
            p.kill()
            p.wait()
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((log_dir / "summary.json").read_text())
    settings = next((line for line in proc.stderr.splitlines() if line.startswith("device ")), "")
    return {"steps": summary["steps"], "seconds": summary["seconds"],
            "steps_per_minute": round(summary["steps"] / summary["seconds"] * 60, 1),
            "load": [round(load0, 2), round(load1, 2)], "settings": settings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=75.0, help="training time of each run")
    ap.add_argument("--work", type=Path, default=None, help="folder for the data and runs (default: a temp dir)")
    args = ap.parse_args()
    from cerberus_histo.cores import affinity

    cores = len(affinity())
    work = args.work or Path(tempfile.mkdtemp(prefix="cerberus-train-load-"))
    data = make_data(work)
    print(f"{cores} cores, load average at start {os.getloadavg()[0]:.2f}; {args.seconds:g} s of training a run, "
          f"busy: one CPU loop per core", flush=True)
    rows = {}
    modes = (("defaults", None), (f"--threads {cores} (torch's default)", cores))
    for label, threads in modes:
        for busy in (0, cores):
            r = run(data, work, args.seconds, threads, busy)
            rows[(label, busy)] = r
            print(f"{label:<30} {'busy' if busy else 'idle':<5} {r['steps']:>5} steps in {r['seconds']:6.1f} s = "
                  f"{r['steps_per_minute']:7.1f} steps/min (load {r['load'][0]:.2f} -> {r['load'][1]:.2f})\n"
                  f"    {r['settings']}", flush=True)
    print()
    for label, _ in modes:
        idle, busy = rows[(label, 0)], rows[(label, cores)]
        print(f"{label:<30} keeps {busy['steps_per_minute'] / idle['steps_per_minute']:.0%} of its idle steps per "
              f"minute beside {cores} busy processes")
    new, old = rows[(modes[0][0], 0)], rows[(modes[1][0], 0)]
    print(f"idle: defaults / torch's default = {new['steps_per_minute'] / old['steps_per_minute']:.2f}")


if __name__ == "__main__":
    main()
