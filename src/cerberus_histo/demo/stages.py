"""The demo's stages, each a function of a :class:`_Context` that returns what ``demo.json`` records of it.

:data:`STAGES`, in the order :func:`~cerberus_histo.demo.run.run_demo` runs them:

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

Each stage names the folders it writes and owns (``outputs``) and the stages whose outputs it reads (``needs``).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CerberusError
from .machine import DemoSettings

CLASS_PATCH = 144


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
    from .scores import evaluate_tiles

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
    from .scores import evaluate_slide

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
