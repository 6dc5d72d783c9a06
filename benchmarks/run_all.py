"""Run every benchmark in benchmarks/ and put their printed results, with the machine they ran on, into
docs/benchmarks.md.

Each benchmark runs in its own process (with a timeout); its output (progress bars removed) goes into a block of a
generated section of the page, delimited by HTML comments, so the hand-written part of docs/benchmarks.md is never
touched and ``--only`` rewrites just the blocks of the benchmarks it ran. Profiles:

* ``cpu`` (default): the scripts' own defaults (about 55 minutes on 2 cores, 30 of them training);
  ``--quick`` passes smaller settings (about 6 minutes).
* ``gpu``: what ``benchmarks/gpu.sh`` runs on a CUDA machine (at most ~8 minutes): model throughput in bf16 and the
  other precisions, tile and whole-slide throughput, with the GPU's utilisation sampled by ``nvidia-smi``.

    python benchmarks/run_all.py                         # everything, CPU, rewrites docs/benchmarks.md
    python benchmarks/run_all.py --quick --only model_speed --only tile_speed
    python benchmarks/run_all.py --list                  # names and the arguments each would get
    python benchmarks/run_all.py --profile gpu --doc "$OUT/benchmarks-gpu.md"     # what gpu.sh does
    python benchmarks/run_all.py --merge benchmarks-gpu.md                        # bring a GPU section home
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
MAX_LINES = 80  # of each benchmark's output kept in the page
NOISE = re.compile(r"^(💡 Tip|GPU available|TPU available|HPU available|Using bfloat16 Automatic|Using 16bit|"
                   r"LOCAL_RANK|.*(Deprecation|Future)Warning|.*is deprecated, use)")


@dataclass(frozen=True)
class Bench:
    name: str
    about: str
    cpu: tuple[str, ...] | None       # arguments of the full CPU run (None: not run on CPU)
    quick: tuple[str, ...] | None     # arguments with --quick
    gpu: tuple[tuple[str, ...], ...] = ()   # GPU runs (each one invocation)
    needs: str | None = None          # a module that must import, else the benchmark is skipped
    data: Path | None = None          # a folder that must exist (../shared), else the benchmark is skipped
    timeout: int = 3600               # seconds per CPU run
    gpu_timeout: int = 120            # seconds per GPU run (gpu.sh has ~8 minutes in all)


BENCHES = (
    Bench("model_speed", "model size and forward throughput of the original preset (ResNet-34, six heads), "
          "fp32 / bf16 / channels_last, with the probability differences to fp32",
          (), ("--size", "256", "--repeats", "1", "--warmup", "0"),
          gpu=(("--device", "cuda", "--batch-size", "1", "--repeats", "20", "--warmup", "5"),
               ("--device", "cuda", "--batch-size", "16", "--repeats", "10", "--warmup", "3"))),
    Bench("tile_speed", "tile inference end to end: the original's geometry as it ran (448/144, every patch twice) "
          "against the default (1024/720), same model and engine",
          (), ("--size", "256"),
          gpu=(("--device", "cuda", "--size", "2048", "--precision", "bf16", "--batch-size", "16"),)),
    Bench("postproc_speed", "post-processing megapixels per second, vectorised against per-instance loops",
          (), ("--size", "1024", "--loop-size", "512", "--gland-loop-size", "1024")),
    Bench("synth_slide", "synthetic slide writing: time and peak memory for growing slides",
          (), ("--sizes", "2048", "4096")),
    Bench("wsi_scale", "whole-slide inference at growing slide sizes: wall time, s/mm² of tissue, peak memory, "
          "end-to-end over forward-only time, device utilisation",
          (), ("--sizes", "4000"),
          gpu=(("--original", "--sizes", "20000", "--tissue-fraction", "1"),), gpu_timeout=330),
    Bench("store_geojson", "a slide store of one million nuclei written as GeoJSON and HoVer-Net JSON, each writer "
          "in a fresh process: peak RSS (target < 1 GB for GeoJSON), seconds, file size",
          (), ("--quick",), timeout=1800),
    Bench("train_synthetic", "the six-head model trained on synthetic data for a fixed budget, held-out PQ / F1 / "
          "accuracy and samples per second",
          (), ("--steps", "60", "--tiles", "6", "--per-class", "10"), timeout=3 * 3600),
    Bench("train_load", "training steps per minute with the default threads alone and beside one busy process "
          "per core, against torch's default threads, in one run",
          (), ("--seconds", "20"), timeout=1800),
    Bench("train_real", "a nuclei model trained on 10 real MoNuSeg images at 0.5 um/px for at most 20 CPU minutes "
          "with the cerberus commands, scored on 3 held-out images (PQ, AJI, Dice, F1)",
          (), ("--minutes", "1", "--steps", "40"), timeout=3600,
          data=ROOT.parent / "shared" / "data" / "real" / "monuseg"),
    Bench("tissue_map", "one trained model's dense tissue map against its patch head: padding, pooling, BatchNorm, "
          "per-patch and the original's per-block maps, accuracy by distance to tile edges and region boundaries",
          ("--model", str(ROOT / "demo-output" / "train" / "model")),
          ("--model", str(ROOT / "demo-output" / "train" / "model"), "--tiles", "4"), timeout=1800,
          data=ROOT / "demo-output" / "train" / "model"),
    Bench("tissue_real", "the tissue head on real H&E: Kather 2016 tiles classified by a model trained on them, the "
          "CMU slide's tissue map against the automatic tissue mask",
          (), ("--steps", "40"), timeout=3600, data=ROOT.parent / "shared" / "data" / "real" / "kather2016"),
    Bench("precision_accuracy", "bf16 against fp32 on the demo's trained model (held-out tiles and patches): PQ and "
          "accuracies must move by <= 0.01 for bf16 to be a default",
          ("--demo", str(ROOT / "demo-output")), ("--demo", str(ROOT / "demo-output")), timeout=1800,
          data=ROOT / "demo-output" / "train" / "model"),
    Bench("torchvision_parity", "torchvision's ResNet weights load into our encoders and give identical features",
          (), (), gpu=((),), needs="torchvision", timeout=600),
)
BY_NAME = {b.name: b for b in BENCHES}


# ---- the machine -----------------------------------------------------------------------------------------
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> str:
    try:
        import torch

        tv = torch.__version__
        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    except ImportError:
        tv, cuda = "not installed", ""
    flags = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in info)
    load = ""
    with contextlib.suppress(OSError):
        load = f"; load average at start {os.getloadavg()[0]:.1f}"
    gpus = gpu_names()
    text = (f"{cpu_name()} ({os.cpu_count()} cores{', ' + flags if flags else ''}), torch {tv}{cuda}, "
            f"Python {platform.python_version()}{load}")
    return text + (f"; GPU: {'; '.join(gpus)}" if gpus else "")


# ---- running ---------------------------------------------------------------------------------------------
class GPUSampler:
    """Samples the GPU's utilisation and memory with nvidia-smi while a benchmark runs."""

    def __init__(self):
        self.proc = None
        self.samples: list[tuple[float, float]] = []
        self._thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "250"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                util, mem = (float(v) for v in line.split(",")[:2])
                self.samples.append((util, mem))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self._thread.join(2)

    def summary(self) -> str:
        if not self.samples:
            return ""
        util = [u for u, _ in self.samples]
        busy = [u for u in util if u > 0]
        return (f"GPU utilisation (nvidia-smi, every 0.25 s): mean {sum(util) / len(util):.0f}% over the run, "
                f"{sum(busy) / max(len(busy), 1):.0f}% while busy, {len(busy) / len(util):.0%} of samples busy; "
                f"peak memory {max(m for _, m in self.samples) / 1024:.1f} GiB")


def clean_output(text: str) -> str:
    """Drop progress-bar redraws (keep the last state of a \\r-updated line), ANSI codes and blank runs."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    lines = []
    for line in text.splitlines():
        line = line.split("\r")[-1].rstrip()
        if re.search(r"\d+/\d+ \[\d\d:\d\d|it/s\]|s/it\]", line) or NOISE.match(line):  # bars, library chatter
            continue
        if line or (lines and lines[-1]):
            lines.append(line)
    if len(lines) > MAX_LINES:
        lines = [f"... ({len(lines) - MAX_LINES} earlier lines left out)"] + lines[-MAX_LINES:]
    return "\n".join(lines).strip("\n")


def run_one(bench: Bench, args: tuple[str, ...], timeout: int, gpu: bool) -> dict:
    cmd = [sys.executable, str(HERE / f"{bench.name}.py"), *args]
    shown = "python benchmarks/" + f"{bench.name}.py" + ("" if not args else " " + " ".join(args))
    print(f"\n=== {shown}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    chunks: list[str] = []
    with GPUSampler() if gpu else contextlib.nullcontext() as sampler:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:  # echo as it comes, keep for the page
                sys.stdout.write(line)
                chunks.append(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    seconds = time.perf_counter() - t0
    status = "ok" if rc == 0 else (f"killed after {timeout} s" if rc in (-9, 137) else f"exit code {rc}")
    return {"name": bench.name, "command": shown, "seconds": seconds, "status": status,
            "output": clean_output("".join(chunks)),
            "gpu": sampler.summary() if sampler is not None else ""}


def skip_reason(bench: Bench) -> str | None:
    if bench.data is not None and not bench.data.is_dir():
        return f"skipped: {bench.data} not found (the real dataset samples beside the project)"
    if bench.needs:
        import importlib.util

        if importlib.util.find_spec(bench.needs) is None:
            return f"skipped: `{bench.needs}` is not installed here"
    return None


# ---- the page --------------------------------------------------------------------------------------------
def markers(profile: str) -> tuple[str, str]:
    return (f"<!-- BEGIN generated:{profile} (benchmarks/run_all.py rewrites this section; edit outside it) -->",
            f"<!-- END generated:{profile} -->")


def block_markers(profile: str, name: str) -> tuple[str, str]:
    return f"<!-- bench:{profile}:{name} -->", f"<!-- /bench:{profile}:{name} -->"


TITLES = {"cpu": "Measured on CPU by `benchmarks/run_all.py`", "gpu": "Measured on a GPU by `benchmarks/gpu.sh`"}


def render_block(profile: str, runs: list[dict], when: str, where: str) -> str:
    name = runs[0]["name"]
    start, end = block_markers(profile, name)
    out = [start, f"### `{name}`", "", f"{BY_NAME[name].about}. Run {when} on {where}.", ""]
    for r in runs:
        if r["status"].startswith("skipped"):
            out += [f"`{r['command']}`: {r['status']}.", ""]
            continue
        out.append(f"`{r['command']}`: {r['status']}, {r['seconds']:.0f} s.")
        if r.get("gpu"):
            out.append(r["gpu"] + ".")
        out += ["", "```", r["output"] or "(no output)", "```", ""]
    out.append(end)
    return "\n".join(out)


def update_section(text: str, profile: str, blocks: dict[str, str]) -> str:
    """``text`` with the generated section of ``profile`` holding ``blocks`` (name -> block text), other blocks
    of that section kept, benchmark order as in BENCHES."""
    begin, end = markers(profile)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = text.rstrip() + "\n\n", "\n"
    old = extract_section(text, profile)
    old.update(blocks)
    body = "\n\n".join(old[b.name] for b in BENCHES if b.name in old)
    intro = (f"## {TITLES[profile]}\n\nThe printed output of each benchmark as it ran; each names its machine and "
             "date. Figures within one run are comparable; across runs the machine's load differs.\n")
    return f"{head}{begin}\n{intro}\n{body}\n{end}{tail}"


def extract_section(text: str, profile: str) -> dict[str, str]:
    begin, end = markers(profile)
    if begin not in text or end not in text:
        return {}
    section = text.split(begin, 1)[1].split(end, 1)[0]
    blocks = {}
    for b in BENCHES:
        s, e = block_markers(profile, b.name)
        m = re.search(re.escape(s) + r".*?" + re.escape(e), section, re.S)
        if m:
            blocks[b.name] = m.group(0)
    return blocks


def write_doc(doc: Path, profile: str, blocks: dict[str, str]) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    new = update_section(text, profile, blocks)
    tmp = doc.with_name(f".{doc.name}.tmp")
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new)
    os.replace(tmp, doc)


# ---- main ------------------------------------------------------------------------------------------------
def invocations(bench: Bench, profile: str, quick: bool) -> list[tuple[str, ...]]:
    if profile == "gpu":
        return list(bench.gpu)
    args = bench.quick if quick else bench.cpu
    return [] if args is None else [args]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="smaller settings (CPU profile): minutes, not an hour")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", choices=list(BY_NAME),
                    help="run only this benchmark (repeatable)")
    ap.add_argument("--doc", type=Path, default=DOC, help="page to update (default: docs/benchmarks.md)")
    ap.add_argument("--no-doc", action="store_true", help="run and print, do not touch the page")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per benchmark run (default: each one's)")
    ap.add_argument("--list", action="store_true", help="print what would run and exit")
    ap.add_argument("--merge", type=Path, default=None,
                    help="copy the generated sections of this file (e.g. gpu.sh's output) into --doc and exit")
    args = ap.parse_args(argv)

    if args.merge:
        text = args.merge.read_text()
        found = 0
        for profile in ("cpu", "gpu"):
            blocks = extract_section(text, profile)
            if blocks:
                write_doc(args.doc, profile, blocks)
                found += len(blocks)
        print(f"merged {found} benchmark block(s) from {args.merge} into {args.doc}")
        return 0 if found else 1

    names = args.only or [b.name for b in BENCHES]
    plan = [(BY_NAME[n], invocations(BY_NAME[n], args.profile, args.quick)) for n in names]
    plan = [(b, inv) for b, inv in plan if inv]
    if args.list:
        for b, inv in plan:
            for a in inv:
                print(f"{b.name:<20} python benchmarks/{b.name}.py {' '.join(a)}".rstrip())
        return 0
    where = machine()
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    print(f"{len(plan)} benchmark(s), profile {args.profile}{' (quick)' if args.quick else ''}; {where}", flush=True)
    blocks, failed = {}, []
    for bench, inv in plan:
        reason = skip_reason(bench)
        if reason:
            print(f"\n=== {bench.name}: {reason}", flush=True)
            runs = [{"name": bench.name, "command": f"python benchmarks/{bench.name}.py", "seconds": 0.0,
                     "status": reason, "output": "", "gpu": ""}]
        else:
            limit = args.timeout or (bench.gpu_timeout if args.profile == "gpu" else bench.timeout)
            runs = [run_one(bench, a, limit, args.profile == "gpu") for a in inv]
            failed += [r["command"] for r in runs if r["status"] != "ok"]
        blocks[bench.name] = render_block(args.profile, runs, when, where)
        if not args.no_doc:  # after every benchmark, so an interrupted run keeps what it measured
            write_doc(args.doc, args.profile, {bench.name: blocks[bench.name]})
    if not args.no_doc:
        print(f"\nwrote {len(blocks)} block(s) into {args.doc}")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
