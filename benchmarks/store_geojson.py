"""Writing a large slide's GeoJSON and HoVer-Net JSON from its store (issue 30): peak memory, time, file size.

Builds (once, cached in ``--work``) a slide store (:class:`~cerberus_histo.outputs.store.AnnotationStore`, a
SQLite file in TIAToolbox's schema) of ``--n`` nucleus polygons (12-20 vertices, ~6 um across at 0.25 um/px,
typed, with ``area_um2`` and ``type_prob``) spread over a 60000² px slide, plus one gland polygon (96 vertices,
75-200 um across) per 300 nuclei, appended in batches of 50,000 through the store's own ``append`` as a slide run
appends its chunks (glands then nuclei per batch). Fixed seed.

Then each writer runs in a **fresh child process** (so its peak is its own), exactly as ``write_slide_outputs``
calls it on a finished slide: ``write_geojson(path, store.records(config))`` and ``write_hovernet_json(path,
{task: store.records(config, task=task)}, mag=...)``, the records streamed from the store batch by batch. Printed
per child: peak RSS (``VmHWM``), wall time and the file's size, beside a child that only imports the writers and
opens the store; then PASS / FAIL of the GeoJSON peak against 1 GB.

    python benchmarks/store_geojson.py                      # 1,000,000 nuclei, store cached in /tmp/cerberus-bench
    python benchmarks/store_geojson.py --quick              # 50,000 nuclei
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

SLIDE, MPP, BATCH, LIMIT_MB = 60000, 0.25, 50000, 1000.0


def polygons(rng, centres: np.ndarray, radius: np.ndarray, vertices: np.ndarray, jitter: float) -> np.ndarray:
    """Star-shaped, elongated, rotated polygons with integer vertices (boundary pixels, as a slide run writes);
    the few that rounding made invalid become their convex hulls."""
    import shapely

    out = np.empty(len(centres), object)
    for k in np.unique(vertices):
        sel = np.flatnonzero(vertices == k)
        m = len(sel)
        ang = (np.arange(k) + rng.uniform(-0.3, 0.3, (m, k))) * (2 * np.pi / k)
        r = radius[sel, None] * (1 + jitter * rng.standard_normal((m, k))).clip(0.6, 1.4)
        elong, rot = rng.uniform(0.7, 1.0, (m, 1)), rng.uniform(0, np.pi, (m, 1))
        x, y = r * np.cos(ang), r * elong * np.sin(ang)
        xy = np.stack([x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)], -1)
        out[sel] = shapely.polygons(np.round(xy + centres[sel, None, :]))
    bad = ~shapely.is_valid(out) | (shapely.area(out) <= 0)
    out[bad] = shapely.convex_hull(out[bad])
    return out


def build(work: Path, n: int, seed: int = 0) -> Path:
    """The store of ``n`` nuclei and ``n // 300`` glands, built once (kept complete in ``work``)."""
    import shapely

    from cerberus_histo import ModelConfig
    from cerberus_histo.outputs.records import AnnotationRecords
    from cerberus_histo.outputs.store import AnnotationStore

    db = work / f"slide{n}.db"
    if db.is_file():
        return db
    work.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.preset("original", encoder="tiny", mpp=MPP)
    rng = np.random.default_rng(seed)
    tmp = db.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    t0, steps = time.perf_counter(), -(-n // BATCH)
    n_gland, done_n, done_g = n // 300, 0, 0
    meta = {"mpp": MPP, "level0_dimensions": [SLIDE, SLIDE], "model": config.to_dict(),
            "trusted_heads": list(config.head_names)}
    with AnnotationStore(tmp, meta) as store:
        for step in range(steps):
            recs = {}
            for task, count, first, size, verts in (
                    ("gland", n_gland * (step + 1) // steps - done_g, done_g, (300, 800), 96),
                    ("nuclei", min(BATCH, n - done_n), done_n, (10, 14), None)):
                spec = config.task(task)
                c = rng.uniform(size[1], SLIDE - size[1], (count, 2))
                k = np.full(count, verts) if verts else rng.integers(12, 21, count)
                geoms = polygons(rng, c, rng.uniform(*size, count) / 2 if verts else rng.normal(12, 1.5, count)
                                 .clip(*size), k, 0.05 if verts else 0.08)
                cls = rng.choice(np.arange(1, len(spec.class_names)), count)
                meas = {"area_um2": shapely.area(geoms) * MPP ** 2, "type_prob": rng.uniform(0.4, 1.0, count)}
                recs[task] = AnnotationRecords.from_geometries(spec, np.arange(first + 1, first + count + 1), cls,
                                                               geoms, meas)
            done_g += len(recs["gland"])
            done_n += len(recs["nuclei"])
            store.append(recs, complete=step == steps - 1)
            print(f"\rbuilding the store: {done_n:,} / {n:,} nuclei, {done_g:,} glands, "
                  f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    os.replace(tmp, db)
    print(f"store of {done_n:,} nuclei and {done_g:,} glands built in {time.perf_counter() - t0:.0f} s "
          f"({db.stat().st_size / 1e6:.0f} MB; peak RSS of the build "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)", flush=True)
    return db


def child(kind: str, db: Path, out: Path) -> None:
    """One measurement, in its own process: prints ``{"peak_mb", "seconds", "file_mb", "objects"}``."""
    from cerberus_histo import ModelConfig
    from cerberus_histo.outputs.geojson import write_geojson, write_hovernet_json
    from cerberus_histo.outputs.records import INSTANCE_TASKS, known_heads
    from cerberus_histo.outputs.store import AnnotationStore

    t0 = time.perf_counter()
    size, objects = 0, 0
    with AnnotationStore(db, readonly=True) as store:
        meta = store.metadata
        config = ModelConfig.from_dict(meta["model"])
        objects = store.count()
        # as write_slide_outputs calls them
        if kind == "geojson":
            write_geojson(out, store.records(config), centroids_only=False)
        elif kind == "hovernet":
            tasks = [t for t in INSTANCE_TASKS if f"{t}-inst" in known_heads(config, meta.get("trusted_heads"))]
            write_hovernet_json(out, {t: store.records(config, task=t) for t in tasks},
                                mag=round(10.0 / float(meta["mpp"]), 2))
    seconds = time.perf_counter() - t0
    if out.is_file():
        size = out.stat().st_size
        out.unlink()
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:")))
    print(json.dumps({"peak_mb": peak_kb / 1024, "seconds": seconds, "file_mb": size / 1e6, "objects": objects}))


def measure(kind: str, db: Path, work: Path) -> dict:
    out = work / {"baseline": "none", "geojson": "slide.geojson", "hovernet": "slide.json"}[kind]
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--store", str(db), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="nuclei in the store (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="50,000 nuclei")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cerberus-bench" / "store_geojson",
                    help="folder of the cached store and the files written (deleted after measuring)")
    ap.add_argument("--child", choices=["baseline", "geojson", "hovernet"], help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.store, args.out)
        return 0
    n = 50_000 if args.quick else args.n
    load0 = os.getloadavg()[0]
    db = build(args.work, n)
    rows = {kind: measure(kind, db, args.work) for kind in ("baseline", "geojson", "hovernet")}
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; the writers run in "
          f"one thread (no torch); load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"store: {rows['baseline']['objects']:,} records ({n:,} nuclei, {n // 300:,} glands), "
          f"{db.stat().st_size / 1e6:.0f} MB")
    print(f"{'child':<28} {'records':>10} {'peak RSS':>10} {'seconds':>8} {'file':>9}")
    for kind, label in (("baseline", "import + open the store"), ("geojson", "GeoJSON (write_geojson)"),
                        ("hovernet", "HoVer-Net JSON")):
        r = rows[kind]
        print(f"{label:<28} {r['objects']:>10,} {r['peak_mb']:>7.0f} MB {r['seconds']:>8.1f} "
              f"{r['file_mb']:>6.0f} MB")
    peak = rows["geojson"]["peak_mb"]
    ok = peak < LIMIT_MB
    print(f"GeoJSON peak RSS < {LIMIT_MB:.0f} MB: {'PASS' if ok else 'FAIL'} ({peak:.0f} MB; HoVer-Net JSON "
          f"{rows['hovernet']['peak_mb']:.0f} MB)")
    print(json.dumps({k: {m: round(v, 1) for m, v in r.items()} for k, r in rows.items()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
