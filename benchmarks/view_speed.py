"""Viewer speed (issue 16): image and overlay tiles of ``cerberus view`` on a large slide, timed on the server side.

Builds (once, then reused from ``--cache``) a synthetic slide of ``--size``² px at 0.5 um/px
(``write_synthetic_slide``) and a finished result for it whose store holds the slide's **true** objects (from
``SlideTruth``: nuclei, glands, lumina, tissue-class regions of 16-px cells; no network runs), with
``X_metadata.json``, ``X_summary.json`` and the marker ``done/X.json`` as ``infer-wsi`` writes them. Then, through
Starlette's ``TestClient`` (requests one after another; the server's own work, no browser, no network), it times:

* opening the result, its info, the first view's overlay tiles (the whole slide in ~2000 px) while the item's
  caches build (nuclei centroids, outline and tissue rasters), and the time until they are all built;
* a browse: ``--per-level`` random tiles over tissue at every Deep Zoom level, image tile then overlay tile;
* a pan at the highest zoom and the one below it: a 1920 x 1080 viewport moved by 256 px steps across the
  tissue, each tile the viewport newly shows requested once (as OpenSeadragon does);
* object look-ups at random nuclei.

Printed: p50 / p95 / max per kind (and per zoom band), the counts, the machine, threads and load, and whether the
targets hold (overlay p95 <= 150 ms, image tile p95 <= 50 ms). Each tile address is asked once, so the tile LRU
never answers; the browse and the pan start once the caches are built, as they are a moment after a slide opens.

    python benchmarks/view_speed.py                        # 32768² px, cache in ~/.cache/cerberus-bench/view
    python benchmarks/view_speed.py --size 16384 --per-level 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TARGETS = {"image": 50.0, "overlay": 150.0}  # p95, ms


def build(cache: Path, size: int, seed: int) -> Path:
    """The result folder (built once): slide, store of the true objects, metadata, summary, marker."""
    from cerberus_histo import ModelConfig
    from cerberus_histo.data.slide import SlideTruth, write_synthetic_slide
    from cerberus_histo.io.files import write_json
    from cerberus_histo.outputs.records import annotation_records
    from cerberus_histo.outputs.store import AnnotationStore
    from cerberus_histo.outputs.summary import summarize, write_summary
    from cerberus_histo.postproc import TaskResult
    from cerberus_histo.postproc.records import measure

    stem = f"view{size}"
    out = cache / "results"
    if (out / "done" / f"{stem}.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    slide = cache / f"{stem}.tif"
    t0 = time.perf_counter()
    if not slide.is_file():
        write_synthetic_slide(slide, size, size, mpp=0.5, seed=seed, field=1024, offset=384, tile=512, progress=False)
    print(f"slide written in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    truth = SlideTruth(slide)
    lay = truth.layout
    config = ModelConfig.preset("original", encoder="tiny", mpp=0.5)
    meta = {"slide": slide.name, "mpp": 0.5, "processing_mpp": 0.5, "scale": 1.0, "offset": [0.0, 0.0],
            "level0_dimensions": [size, size], "model": config.to_dict(), "trusted_heads": list(config.head_names)}
    db = out / f"{stem}.db"
    db.unlink(missing_ok=True)
    cell = 16
    with AnnotationStore(db, meta) as store:
        for r in range(lay.nrows):
            for c in range(lay.ncols):
                if lay.cells[r][c] < 0:
                    continue
                x0, y0 = max(c * lay.field - lay.offset, 0), max(r * lay.field - lay.offset, 0)
                x1, y1 = min((c + 1) * lay.field - lay.offset, size), min((r + 1) * lay.field - lay.offset, size)
                if x1 <= x0 or y1 <= y0:
                    continue
                w, h = x1 - x0, y1 - y0
                results, ids = {}, {}
                for task, n_cls in (("gland", 3), ("nuclei", 7), ("lumen", None)):
                    inst, classes = truth.read_region(task, x0, y0, w, h)
                    gids, small = np.unique(inst, return_inverse=True)
                    if gids[0] != 0:
                        gids, small = np.concatenate([[0], gids]), small + 1
                    small = small.reshape(inst.shape).astype(np.int32)
                    ids[task] = gids
                    if task == "lumen":
                        parents = {k: int(np.searchsorted(ids["gland"], classes[g])) for k, g in enumerate(gids) if k}
                        results[task] = TaskResult(small, measure(small, None, None, parents))
                    else:
                        lut = np.array([0] + [classes[g] for g in gids[1:]], np.int32)
                        type_map = lut[small]
                        results[task] = TaskResult(small, measure(small, type_map, n_cls), type_map)
                cmap = truth.tissue(x0, y0, -(-w // cell) * cell, -(-h // cell) * cell)[cell // 2::cell, cell // 2::cell]
                results["tissue"] = TaskResult(class_map=cmap.astype(np.uint8),
                                               class_prob=np.ones(cmap.shape, np.float32))
                store.append(annotation_records(results, config, 0.5, 1.0, (x0, y0), shape=(h, w), cell=cell))
        n = store.count()
        summary = summarize(store.records(config), config, analysed_area_um2=float(size) ** 2 * 0.25)
    print(f"store of {n} objects built in {time.perf_counter() - t0:.1f} s", flush=True)
    write_summary(out / f"{stem}_summary.json", out / f"{stem}_summary.csv", summary)
    write_json(out / f"{stem}_metadata.json", {**meta, "slide": str(slide.resolve()), "stem": stem})
    write_json(out / "done" / f"{stem}.json", {"slide": str(slide.resolve()), "counts": summary["counts"],
                                               "summary": summary})
    return out


def stats(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"n {len(a):4d}  p50 {np.percentile(a, 50):6.1f} ms  p95 {np.percentile(a, 95):6.1f} ms  max {a.max():7.1f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32768, help="slide side in level-0 px (default 32768)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cerberus-bench" / "view")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-level", type=int, default=24, help="random tiles over tissue per Deep Zoom level")
    ap.add_argument("--pan-steps", type=int, default=40, help="viewport moves per pan")
    args = ap.parse_args(argv)

    import cv2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette 1.x prefers httpx2 (Python >= 3.11) to httpx
        from starlette.testclient import TestClient

    from cerberus_histo.data.slide import SlideTruth
    from cerberus_histo.view import make_app

    folder = build(args.cache / str(args.size), args.size, args.seed)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    app = make_app(folder)
    t_open = time.perf_counter() - t0
    viewer = app.state.viewer
    item = viewer.items[0]
    client = TestClient(app)
    dz = item.deepzoom
    top = dz.level_count - 1
    t0 = time.perf_counter()
    info = client.get("/api/items/0").json()  # starts building the item's caches in the background
    t_info = time.perf_counter() - t0
    # the first view (the whole slide in a ~2000 px viewport) while the caches build
    home = max(lv for lv in range(dz.level_count) if max(dz.level_dimensions[lv]) <= 2048)
    first = []
    for col in range(dz.level_tiles[home][0]):
        for row in range(dz.level_tiles[home][1]):
            t = time.perf_counter()
            assert client.get(f"/api/items/0/overlay_files/{home}/{col}_{row}.png").status_code == 200
            first.append((time.perf_counter() - t) * 1e3)
    viewer.overlays[0].preload()  # waits for what the info request started
    t_cache = time.perf_counter() - t0
    counts = {t["task"]: sum(c["count"] for c in t["classes"]) for t in info["tasks"]}
    rng = np.random.default_rng(args.seed)
    truth = SlideTruth(item.image_path)
    lay = truth.layout
    tissue_cells = [(r, c) for r in range(lay.nrows) for c in range(lay.ncols) if lay.cells[r][c] >= 0]

    def tissue_point():
        r, c = tissue_cells[rng.integers(len(tissue_cells))]
        return ((c + rng.random()) * lay.field - lay.offset, (r + rng.random()) * lay.field - lay.offset)

    times: dict[tuple[str, str], list[float]] = {}
    seen: set = set()

    def fetch(level: int, col: int, row: int, band: str) -> None:
        if (level, col, row) in seen:
            return
        seen.add((level, col, row))
        for kind, url in (("image", f"/api/items/0/image_files/{level}/{col}_{row}.jpeg"),
                          ("overlay", f"/api/items/0/overlay_files/{level}/{col}_{row}.png")):
            t = time.perf_counter()
            r = client.get(url)
            times.setdefault((kind, band), []).append((time.perf_counter() - t) * 1e3)
            assert r.status_code == 200, (url, r.status_code)

    def band_of(level: int) -> str:
        f = 2 ** (top - level)
        return "high zoom (1-4 px/px)" if f <= 4 else "mid zoom (8-64)" if f <= 64 else "low zoom (>= 128)"

    # ---- a browse: random tiles over tissue at every level ------------------------------------------------------
    for level in range(dz.level_count):
        cols, rows = dz.level_tiles[level]
        f = 2 ** (top - level)
        for _ in range(min(args.per_level, cols * rows)):
            x, y = tissue_point()
            fetch(level, min(int(x / f) // 254, cols - 1), min(int(y / f) // 254, rows - 1), band_of(level))
    # ---- a pan at high zoom ---------------------------------------------------------------------------------------
    for level in (top, top - 1):
        f = 2 ** (top - level)
        cols, rows = dz.level_tiles[level]
        x, y = tissue_point()
        vx, vy = x / f, y / f
        for step in range(args.pan_steps):
            vx += 256 * (1 if (step // 10) % 2 == 0 else 0)
            vy += 256 * (1 if (step // 10) % 2 == 1 else 0)
            for col in range(int(vx) // 254, min(int(vx + 1920) // 254 + 1, cols)):
                for row in range(int(vy) // 254, min(int(vy + 1080) // 254 + 1, rows)):
                    fetch(level, col, row, "pan " + band_of(level).split(" (")[0])
    # ---- object look-ups --------------------------------------------------------------------------------------
    x, y, _ = viewer.overlays[0].centroids()
    picks = []
    for k in rng.choice(len(x), size=min(50, len(x)), replace=False):
        t = time.perf_counter()
        obj = client.get(f"/api/items/0/object?x={x[k]}&y={y[k]}").json()["object"]
        picks.append((time.perf_counter() - t) * 1e3)
        assert obj is not None
    # ---- report ---------------------------------------------------------------------------------------------------
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; OpenCV threads "
          f"{cv2.getNumThreads()}; requests one at a time (TestClient); load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"slide: {item.width} x {item.height} px at {item.mpp} um/px, {dz.level_count} Deep Zoom levels, "
          f"{sum(c * r for c, r in dz.level_tiles)} tiles of 254 px")
    print("objects: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    print(f"open the result (checks): {t_open * 1e3:.0f} ms; its info: {t_info * 1e3:.0f} ms; the first view "
          f"({len(first)} overlay tiles of level {home}, while the caches build): {sum(first) / 1e3:.2f} s; all "
          f"caches built {t_cache:.2f} s after the info request")
    for kind in ("image", "overlay"):
        every = [v for (k, _), vs in times.items() if k == kind for v in vs]
        print(f"{kind:7s} all           {stats(every)}")
        for (k, band), vs in sorted(times.items()):
            if k == kind:
                print(f"        {band:24s} {stats(vs)}")
    print(f"object  look-up       {stats(picks)}")
    ok = True
    for kind, target in TARGETS.items():
        p95 = float(np.percentile([v for (k, _), vs in times.items() if k == kind for v in vs], 95))
        met = p95 <= target
        ok &= met
        print(f"target {kind} p95 <= {target:.0f} ms: {'met' if met else 'MISSED'} ({p95:.1f} ms)")
    print(json.dumps({"p95_ms": {k: round(float(np.percentile([v for (kk, _), vs in times.items() if kk == k
                                                                for v in vs], 95)), 1) for k in TARGETS}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
