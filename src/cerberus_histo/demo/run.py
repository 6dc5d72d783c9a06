"""``cerberus demo``: the whole pipeline on synthetic data, end to end, on a laptop CPU.

Stages (each timed; outputs under one folder, ``demo-output/`` by default):

1. **synthesise data**: three partly labelled tile datasets (glands with their classes, lumina, nuclei with their
   types) and a set of tissue-class patches, as separate sources are in real life.
2. **extract patches**: cut them into training patches (``extract_patches``).
3. **train**: one multi-task model on all four sources with mixed-target batches (``train``), for a fixed budget
   of minutes; a narrow encoder (``small``) so that a CPU learns something in minutes.
4. **synthesise test tiles**: fresh tiles (other seeds) with every label, never seen in training.
5. **infer tiles**: ``infer_tiles`` on them: GeoJSON (QuPath), SQLite (TIAToolbox), label maps, HoVer-Net JSON,
   overlays and summaries.
6. **evaluate**: the predicted label maps against the truth with ``cerberus_histo.metrics.evaluate`` (what
   ``cerberus evaluate`` runs): PQ, Dice, type F1, mPQ+, GlaS object metrics, tissue accuracy; and pictures of
   truth next to prediction.
7. **synthesise slide**: a pyramidal BigTIFF slide with ground truth (``write_synthetic_slide``).
8. **infer slide**: whole-slide inference (``Cerberus.predict_wsi``), then nuclei detection F1 against the
   slide's ground truth.

Then ``index.md`` and ``index.html`` show the pictures and link every file, and ``demo.json`` holds the
settings, the machine, the stage timings and every result.

Re-running is safe: each finished stage leaves a marker (``done/STAGE.json``, :func:`~cerberus_histo.io.files.write_marker`)
with the settings it ran with; a
re-run skips stages whose marker matches and whose inputs did not change, and redoes (after deleting its old
outputs) any other. ``--fresh`` redoes everything. A folder that holds something else is never written into.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .._version import __version__
from ..errors import CerberusError
from ..io.files import MARKER_DIR, marker_path, read_marker, write_marker

LEGACY_MARKERS = ".demo"  # where earlier versions kept their markers: such stages are redone
CLASS_PATCH = 144


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo run. :meth:`preset` gives the quick and the full settings."""

    tiles: int = 20                # tiles per partly labelled dataset (three datasets)
    tile_size: int = 448
    per_class: int = 40            # tissue patches per class (nine classes)
    train_minutes: float = 7.0
    max_steps: int = 1_000_000     # the minutes stop training first, unless this is small
    batch_size: int = 6
    class_batch_size: int = 45     # 144-px tissue patches are cheap: more of them per batch (five 3 x 3 mosaics)
    p_seg: float = 0.6             # share of segmentation batches
    lr: float = 2e-3
    encoder: str = "small"
    stem_stride: int = 2
    head_channels: int = 32
    patch: int = 256
    test_tiles: int = 16
    test_patches: int = 20         # held-out tissue patches per class
    slide_width: int = 4096
    slide_height: int = 3072
    slide_field: int = 512
    slide_fields: int = 6
    chunk: int = 2048              # whole-slide chunk side (model px)
    workers: int = 1               # data-loading and post-processing processes

    def __post_init__(self):
        for name in ("tiles", "per_class", "max_steps", "batch_size", "test_tiles", "test_patches", "slide_fields"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CerberusError(f"demo setting {name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not 0 < self.p_seg <= 1:
            raise CerberusError(f"demo setting p_seg must be in (0, 1], got {self.p_seg}")
        if self.train_minutes <= 0:
            raise CerberusError(f"demo setting train_minutes must be > 0, got {self.train_minutes}")

    @classmethod
    def preset(cls, quick: bool) -> DemoSettings:
        if not quick:
            return cls()
        return cls(tiles=6, per_class=10, train_minutes=1.0, test_tiles=3, test_patches=5, slide_width=2560,
                   slide_height=2048, slide_fields=3)


@dataclass
class _Context:
    out: Path
    settings: DemoSettings
    seed: int
    device: str
    precision: str        # inference autocast: fp32 / bf16
    progress: bool
    results: dict = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.out / "train" / "model"

    @property
    def slide_path(self) -> Path:
        return self.out / "slide" / "synthetic-slide.tif"


@dataclass(frozen=True)
class _Stage:
    key: str
    title: str
    run: Callable[[_Context], dict]
    outputs: tuple[str, ...]   # folders (relative to the demo folder) the stage writes and owns
    needs: tuple[str, ...] = ()


# ---- the machine -----------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_device(device: str) -> tuple[str, str]:
    """``(device, inference precision)`` for ``device`` ``auto``/``cpu``/``cuda[:N]``/``mps``: the runtime's
    choice, except fp16 (not fp32) on CUDA cards without bf16, which the demo also trains with."""
    import torch

    from ..infer.runtime import auto_precision, resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return str(dev), "fp16"
    return str(dev), auto_precision(dev)[0]


def _idle_cores(interval: float = 0.5) -> float | None:
    """Cores left idle by the other processes, measured over ``interval`` seconds (Linux ``/proc/stat``)."""

    def sample():
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        v = [int(x) for x in fields]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)


def choose_threads(workers: int) -> int | None:
    """Torch threads for a CPU run: the idle cores less the ``workers`` processes beside the network (data
    loading, post-processing), at least 1. OpenMP threads that share cores with busy processes spin and wait: on
    2 cores with two other busy processes, one thread trained 3.5x faster than two. ``None``: leave torch's choice
    (``OMP_NUM_THREADS`` set, or not measurable here)."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return None
    idle = _idle_cores()
    if idle is None:
        return None
    return max(1, min(torch.get_num_threads(), int(idle + 0.5) - workers))


def machine(device: str) -> dict:
    import torch

    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cerberus_histo": __version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return out


# ---- stages ----------------------------------------------------------------------------------------------
SEG_TASKS = ("gland", "lumen", "nuclei")


def _data(ctx: _Context) -> dict:
    from ..data.synthetic import write_patches, write_tiles

    s, root = ctx.settings, ctx.out / "data"
    for i, task in enumerate(SEG_TASKS):
        write_tiles(root / task, s.tiles, s.tile_size, seed=ctx.seed + 100 + i, tasks=(task,),
                    name=f"synthetic-{task}", progress=ctx.progress)
    write_patches(root / "tissue", s.per_class, CLASS_PATCH, seed=ctx.seed + 103, progress=ctx.progress)
    return {"datasets": {t: f"data/{t}" for t in (*SEG_TASKS, "tissue")}, "tiles_per_dataset": s.tiles,
            "tile_size": s.tile_size, "tissue_patches": 9 * s.per_class}


def _patches(ctx: _Context) -> dict:
    from ..data.patches import extract_patches

    s, root = ctx.settings, ctx.out / "data"
    counts = {}
    for task in SEG_TASKS:
        r = extract_patches(root / task, root / "patches", s.tile_size, s.tile_size // 2, "mirror",
                            progress=ctx.progress)
        counts[task] = r.patches
    counts["tissue"] = extract_patches(root / "tissue", root / "patches", progress=ctx.progress).patches
    return {"patches": counts}


def _train(ctx: _Context) -> dict:
    import logging

    from ..train.config import TrainConfig
    from ..train.datamodule import Source
    from ..train.run import train

    s, patches = ctx.settings, ctx.out / "data" / "patches"
    gpu = ctx.device.startswith("cuda")
    precision = "bf16-mixed" if ctx.precision == "bf16" else ("16-mixed" if ctx.precision == "fp16" else "32")
    cfg = TrainConfig(batch_size=s.batch_size, class_batch_size=s.class_batch_size, p_seg=s.p_seg, max_steps=s.max_steps,
                      max_minutes=s.train_minutes, val_every=10**6, optimizer={"lr": s.lr},
                      scheduler={"name": "none"}, seed=5 + ctx.seed, precision=precision, num_workers=s.workers,
                      model={"encoder": s.encoder, "stem_stride": s.stem_stride, "head_channels": s.head_channels,
                             "patch_shape": s.patch})
    sources = [Source(patches / "synthetic-gland", ("gland-inst", "gland-type")),
               Source(patches / "synthetic-lumen", ("lumen-inst",)),
               Source(patches / "synthetic-nuclei", ("nuclei-inst", "nuclei-type")),
               Source(patches / "synthetic-patches", ("tissue-class",))]
    quiet = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    stop = threading.Event()
    clock = threading.Thread(target=_train_clock, args=(s.train_minutes * 60, stop, ctx.progress), daemon=True)
    clock.start()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            # fold 1: split 1 of each source is validated on at the end (the real test is the evaluation stage's
            # fresh tiles); the other splits train
            summary = train(sources, ctx.out / "train", cfg, fold=1, mix=True, accelerator="gpu" if gpu else "cpu",
                            devices=1, progress=False)
    finally:
        stop.set()
        clock.join()
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    from ..models.checkpoint import load_model

    model = load_model(ctx.model_dir)
    return {"steps": summary["steps"], "seconds": summary["seconds"],
            "samples_per_second": summary["samples_per_second"], "precision": precision,
            "validation": summary.get("validation", {}),
            "encoder": s.encoder, "parameters": model.num_parameters(), "heads": list(model.head_names),
            "cell": int(model.encoder.strides[-1]), "model": "train/model"}


def _train_clock(seconds: float, stop: threading.Event, progress: bool) -> None:
    """A progress bar over the training budget (Lightning's own bar counts steps towards a limit that the
    time budget, not the step count, ends)."""
    from ..progress import progress_bar

    total = max(1, round(seconds))
    t0 = time.perf_counter()
    with progress_bar(total=total, desc="train", unit="s", progress=progress,
                      bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s of training{postfix}") as bar:
        while not stop.wait(1.0):
            elapsed = time.perf_counter() - t0
            bar.n = min(total, int(elapsed))
            if elapsed > seconds:
                bar.set_postfix_str("validating and saving the model", refresh=False)
            bar.refresh()


def _test_tiles(ctx: _Context) -> dict:
    from ..data.synthetic import write_patches, write_tiles

    s = ctx.settings
    spec = write_tiles(ctx.out / "data" / "test", s.test_tiles, s.tile_size, seed=ctx.seed + 200, num_splits=1,
                       name="synthetic-test", progress=ctx.progress)
    # held-out tissue patches: the patch head's accuracy, to set the dense map's beside
    write_patches(ctx.out / "data" / "test-patches", s.test_patches, CLASS_PATCH, seed=ctx.seed + 201, num_splits=1,
                  progress=ctx.progress)
    return {"dataset": "data/test", "tiles": s.test_tiles, "images": sorted(spec.names()),
            "patches": "data/test-patches", "patches_per_class": s.test_patches}


def _infer_tiles(ctx: _Context) -> dict:
    from ..infer.tiles import infer_tiles

    t0 = time.perf_counter()
    summary = infer_tiles(ctx.model_dir, ctx.out / "data" / "test" / "images", ctx.out / "tiles",
                          device=ctx.device, postproc_workers=ctx.settings.workers, precision=ctx.precision,
                          progress=ctx.progress)
    if summary.failed:
        raise CerberusError("tile inference failed on " + "; ".join(f"{k}: {v}" for k, v in summary.failed.items()))
    seconds = time.perf_counter() - t0
    mpx = ctx.settings.test_tiles * ctx.settings.tile_size ** 2 / 1e6
    return {"output": "tiles", "images": len(summary.done) + len(summary.skipped),
            "timings_s": {k: round(v, 2) for k, v in summary.timings.items()},
            "seconds_per_megapixel": round(seconds / mpx, 2),
            "command": f"cerberus infer-tile --model {ctx.model_dir} --input {ctx.out / 'data/test/images'} "
                       f"--output {ctx.out / 'tiles'} --precision {ctx.precision}"}


def _evaluate(ctx: _Context) -> dict:
    import numpy as np

    from ..data.dataset import load_dataset
    from ..infer.tiles import classify_patch_set
    from ..models.checkpoint import load_model
    from .report import evaluate_tiles

    result = evaluate_tiles(ctx.out)
    # the patch head on held-out 144-px patches, as trained: the dense map's pixel accuracy should come close; and
    # the same weighted by the tiles' class mix (each class's patch recall x its share of the tiles' pixels)
    model = load_model(ctx.model_dir)
    if "tissue-class" not in model.trusted_heads:  # never trained: not scored (the page says so)
        return result
    pred, truth = classify_patch_set(model, load_dataset(ctx.out / "data" / "test-patches"))
    right = pred == truth
    test = load_dataset(ctx.out / "data" / "test")
    n_cls = len(model.config.task("tissue").class_names)
    pixels = sum(np.bincount(test.read_annotation(n, "tissue").class_map.ravel(), minlength=n_cls)
                 for n in test.names())
    recall = np.array([right[truth == c].mean() if (truth == c).any() else 0.0 for c in range(n_cls)])
    result["metrics"]["tissue"]["patch_accuracy"] = float(right.mean())
    result["metrics"]["tissue"]["patch_accuracy_tile_mix"] = float(recall @ (pixels / pixels.sum()))
    result["patch_images"] = len(truth)
    return result


def _slide(ctx: _Context) -> dict:
    from ..data.slide import write_synthetic_slide

    s = ctx.settings
    offset = 3 * s.slide_field // 8 // 128 * 128
    write_synthetic_slide(ctx.slide_path, s.slide_width, s.slide_height, 0.5, seed=ctx.seed + 300,
                          field=s.slide_field, offset=offset, n_fields=s.slide_fields, progress=ctx.progress)
    return {"slide": "slide/synthetic-slide.tif", "width": s.slide_width, "height": s.slide_height, "mpp": 0.5,
            "megabytes": round(ctx.slide_path.stat().st_size / 1e6, 1)}


def _wsi(ctx: _Context) -> dict:
    from ..api import Cerberus
    from .report import evaluate_slide

    model = Cerberus.load(ctx.model_dir)
    cell = int(model.encoder.strides[-1])
    # 1024-px windows; whole slides need an output side that is a multiple of the encoder's stride (32 for the
    # small encoder with a stride-2 stem), so 704 rather than the default 720
    output_shape = (1024 - 304) // cell * cell
    t0 = time.perf_counter()
    res = model.predict_wsi(ctx.slide_path, ctx.out / "wsi", chunk_size=ctx.settings.chunk, device=ctx.device,
                            precision=ctx.precision, postproc_workers=ctx.settings.workers, progress=ctx.progress,
                            input_shape=1024, output_shape=output_shape)
    seconds = time.perf_counter() - t0
    out = {"output": "wsi", "counts": dict(res.counts), "seconds": round(seconds, 1),
           "timings_s": {k: round(float(v), 2) for k, v in res.timings.items()},
           "files": {k: str(Path(p).relative_to(ctx.out)) for k, p in res.paths.items()},
           "window": f"1024/{output_shape}"}
    tissue = out["files"].get("tissue")  # none without a trained tissue head
    out["evaluation"] = evaluate_slide(ctx.slide_path, ctx.out / out["files"]["store"], model.config,
                                       tissue and ctx.out / tissue, cell, model.trusted_heads)
    return out


STAGES = (
    _Stage("data", "synthesise data", _data, ("data/gland", "data/lumen", "data/nuclei", "data/tissue")),
    _Stage("patches", "extract patches", _patches, ("data/patches",), ("data",)),
    _Stage("train", "train", _train, ("train",), ("patches",)),
    _Stage("test", "synthesise test tiles", _test_tiles, ("data/test", "data/test-patches")),
    _Stage("tiles", "infer tiles", _infer_tiles, ("tiles",), ("train", "test")),
    _Stage("evaluate", "evaluate", _evaluate, ("evaluation",), ("tiles", "test", "train")),
    _Stage("slide", "synthesise slide", _slide, ("slide",)),
    _Stage("wsi", "infer slide", _wsi, ("wsi",), ("slide", "train")),
)


# ---- running ---------------------------------------------------------------------------------------------
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


def quick_settings(**changes) -> DemoSettings:
    """The quick preset with some fields changed (tests use a tiny budget)."""
    return replace(DemoSettings.preset(True), **changes)


if __name__ == "__main__":  # pragma: no cover
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-output", quick="--quick" in sys.argv)
