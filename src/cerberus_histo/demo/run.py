"""``cerberus demo``: the whole pipeline on synthetic data, end to end, on a laptop CPU.

:func:`run_demo` runs the stages of :mod:`.stages` (synthesise data, extract patches, train, synthesise test tiles,
infer tiles, evaluate, synthesise slide, infer slide), each timed, into one folder (``demo-output/`` by default),
with the settings and the machine of :mod:`.machine`.

Then ``index.md`` and ``index.html`` (:mod:`.report`) show the pictures and link every file, and ``demo.json``
holds the settings, the machine, the stage timings and every result.

Re-running is safe: each finished stage leaves a marker (``done/STAGE.json``, :func:`~cerberus_histo.io.files.write_marker`)
with the settings it ran with; a
re-run skips stages whose marker matches and whose inputs did not change, and redoes (after deleting its old
outputs) any other. ``--fresh`` redoes everything. A folder that holds something else is never written into.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .._version import __version__
from ..errors import CerberusError
from ..io.files import MARKER_DIR, marker_path, read_marker, write_marker
from .machine import DemoSettings, choose_device, choose_threads, machine
from .stages import STAGES, _Context

LEGACY_MARKERS = ".demo"  # where earlier versions kept their markers: such stages are redone


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CerberusError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_DIR).is_dir() and \
            not (out / LEGACY_MARKERS).is_dir() and not (out / "demo.json").is_file():
        raise CerberusError(f"--out {out} already holds files that are not a demo's; choose an empty or new folder")
    try:
        (out / MARKER_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CerberusError(f"--out {out}: cannot write there ({exc.strerror}); choose another folder") from None


def _fingerprint(settings: DemoSettings, seed: int, device: str, precision: str) -> dict:
    return {"settings": asdict(settings), "seed": seed, "device": device, "precision": precision,
            "version": __version__}


def _fmt_seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 90 else f"{t / 60:.1f} min"


def run_demo(out_dir: str | Path = "demo-output", quick: bool = False, seed: int = 0, *,
             settings: DemoSettings | None = None, device: str = "auto", fresh: bool = False,
             progress: bool = True, only: tuple[str, ...] | None = None) -> dict:
    """Run the demo into ``out_dir`` (see the module docstring) and return what ``demo.json`` holds.

    ``settings`` replaces the quick/full preset; ``only`` runs just these stages (and what they need).
    """
    import torch

    from .report import print_results, write_index

    out = Path(out_dir)
    s = settings or DemoSettings.preset(quick)
    dev, precision = choose_device(device)
    _check_out(out)
    threads = choose_threads(s.workers) if dev == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)
    if fresh:
        for stage in STAGES:
            for rel in stage.outputs:
                shutil.rmtree(out / rel, ignore_errors=True)
            marker_path(out, stage.key).unlink(missing_ok=True)
    fp = _fingerprint(s, seed, dev, precision)
    ctx = _Context(out, s, seed, dev, precision, progress)
    wanted = _closure(only) if only else {st.key for st in STAGES}
    stages = [st for st in STAGES if st.key in wanted]
    rerun: set[str] = set()
    rows = []
    t_all = time.perf_counter()
    mode = "quick" if settings is None and quick else ("full" if settings is None else "custom")
    print(f"Cerberus demo ({mode}) -> {out}/  [{dev}, {precision}; torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads]", flush=True)
    for i, stage in enumerate(stages, 1):
        marker = marker_path(out, stage.key)
        done = read_marker(out, stage.key)
        if done is not None and done.get("fingerprint") == fp and not rerun & set(stage.needs):
            ctx.results[stage.key] = done["result"]
            rows.append({"stage": stage.title, "seconds": done["seconds"], "skipped": True})
            print(f"[{i}/{len(stages)}] {stage.title}: done before ({_fmt_seconds(done['seconds'])}), skipped",
                  flush=True)
            continue
        marker.unlink(missing_ok=True)
        for rel in stage.outputs:
            shutil.rmtree(out / rel, ignore_errors=True)
        print(f"[{i}/{len(stages)}] {stage.title} ...", flush=True)
        t0 = time.perf_counter()
        result = stage.run(ctx)
        seconds = round(time.perf_counter() - t0, 2)
        ctx.results[stage.key] = result
        rerun.add(stage.key)
        write_marker(out, stage.key, {"fingerprint": fp, "seconds": seconds, "result": result})
        rows.append({"stage": stage.title, "seconds": seconds, "skipped": False})
        print(f"[{i}/{len(stages)}] {stage.title}: {_fmt_seconds(seconds)}", flush=True)
    total = round(time.perf_counter() - t_all, 2)
    report = {"mode": mode, "out": str(out), "seed": seed, "settings": asdict(s), "precision": precision, "machine": machine(dev),
              "stages": rows, "total_seconds": total,
              "total_seconds_if_run_now": round(sum(r["seconds"] for r in rows), 2), "results": ctx.results}
    _write_json(out / "demo.json", report)
    write_index(out, report)
    print_results(report)
    print(f"open {out / 'index.html'} (or index.md) to see the pictures and every output file", flush=True)
    if "wsi" in ctx.results:
        print(f"look at the slide and its objects in your web browser: cerberus view {out / 'wsi'}", flush=True)
    return report


def _closure(only: tuple[str, ...]) -> set[str]:
    by_key = {st.key: st for st in STAGES}
    unknown = [k for k in only if k not in by_key]
    if unknown:
        raise CerberusError(f"unknown demo stage(s) {', '.join(unknown)}; stages: {', '.join(by_key)}")
    todo, seen = list(only), set()
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo.extend(by_key[k].needs)
    return seen


def _write_json(path: Path, data: dict) -> None:
    from ..io.files import write_json

    write_json(path, data)  # strict JSON: NaN -> null, numpy scalars and paths as JSON values


if __name__ == "__main__":  # pragma: no cover
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-output", quick="--quick" in sys.argv)
