"""The ``cerberus`` command line. Thin: each command parses options and calls the Python API.

Heavy modules (torch) are imported inside the commands so that ``cerberus --help`` is instant. A
:class:`~cerberus_histo.errors.CerberusError` is printed as one line ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from ._version import __version__
from .data.formats import FORMATS
from .errors import CerberusError


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx):
        warnings.showwarning = _show_warning  # one line a warning, without source lines
        try:
            return super().invoke(ctx)
        except CerberusError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a full disk that no writer named: still one line, not a traceback
            from .io.files import no_space_error

            if (full := no_space_error(exc)) is None:
                raise
            click.echo(f"error: {full}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="cerberus")
def main():
    """Cerberus: glands, lumina, nuclei and tissue types in H&E images with one multi-task network."""


def _aligned(rows) -> str:
    """``(key, value)`` rows as ``key  value`` lines, the values in one column at least two spaces after the longest
    key."""
    rows = [(str(k), str(v)) for k, v in rows]
    width = max((len(k) for k, _ in rows), default=0) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def _describe(model, *more) -> str:
    """The ``cerberus info`` lines of ``model`` (and the ``(key, value)`` rows ``more``), aligned."""
    cfg = model.config
    lines = [("encoder", f"{cfg.encoder} (stem stride {cfg.stem_stride}, input / {cfg.norm.divisor:g})"),
             ("resolution", f"{cfg.mpp} um/px, patch {cfg.patch_shape} px, class patch {cfg.class_patch_shape} px"),
             ("parameters", f"{model.num_parameters():,}")]
    trusted = model.trusted_heads  # the provenance's trained_heads; every head without one
    for task in cfg.tasks:
        heads = ", ".join(f"{k} ({task.num_outputs(k)}{'' if f'{task.name}-{k}' in trusted else ', never trained'})"
                          for k in task.kinds)
        named = len(task.class_names) == 2 or any(f"{task.name}-{k}" in trusted for k in ("type", "class"))
        classes = (", ".join(task.class_names) if named else "none (its class head was never trained)"
                   if "class" in task.kinds else "none (no trained type head: instances are untyped)")
        lines.append((f"task {task.name}", f"{heads}; classes: {classes}"))
    untrained = [h for h in model.head_names if h not in trusted]
    lines.append(("trusted", f"{', '.join(trusted) or 'no head'}"
                  + (f"; never trained, so not run and nothing written: {', '.join(untrained)}" if untrained
                     else " (every head)")))
    lines += list(model.provenance.items()) + list(more)
    return _aligned(lines)


@main.command("import-original")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace DST if it already holds a model.")
def import_original_cmd(src: Path, dst: Path, force: bool):
    """Convert an original Cerberus model folder SRC (settings.yml + weights.tar) into a model folder DST.

    The converted model gives the same logits as the original network on the same input.
    """
    from .models.checkpoint import CONFIG_FILE, import_original, save_model

    if (dst / CONFIG_FILE).exists() and not force:
        raise CerberusError(f"{dst} already holds a model; pass --force to replace it or choose another folder")
    model = import_original(src)
    save_model(model, dst)
    click.echo(_describe(model, ("saved", dst)))


@main.command("info")
@click.argument("model_dir", type=click.Path(path_type=Path))
def info_cmd(model_dir: Path):
    """Describe a model folder (a Cerberus model or an original release): encoder, tasks, heads, classes, and which
    heads are trusted (trained; inference runs and writes only these)."""
    from .models.checkpoint import load_model

    click.echo(_describe(load_model(model_dir)))


_IMPORT_DATASET_HELP = (
    "Convert a public dataset (FORMAT) at SRC into the common layout at DST, with splits and dataset.yaml.\n\n"
    "\b\nFORMAT is one of:\n" + "\n".join(f"  {name:<8} {text}" for name, (_, _, text) in FORMATS.items()))


@main.command("import-dataset", help=_IMPORT_DATASET_HELP)
@click.argument("fmt", metavar="FORMAT", type=click.Choice(list(FORMATS)))
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="Override the dataset's resolution (microns per pixel); "
              "qupath: the resolution to write (default 0.5) and that of tiles without one in their metadata.")
@click.option("--map", "maps", multiple=True, metavar="NAME=TASK:CLASS|FILE.yaml",
              help="qupath: read QuPath class NAME as TASK:CLASS (TASK alone: untyped; 'skip': leave out; "
                   "empty NAME: unclassified objects); repeatable, or a YAML file of them.")
@click.option("--roi-class", default=None, help="qupath: class (glob) of the annotations marking the labelled "
              "regions (default 'Region*').")
@click.option("--whole-image", is_flag=True,
              help="qupath: label the whole image where a file has no region annotation (slides: the box around "
                   "their objects).")
@click.option("--tile-size", type=int, default=None, help="qupath: largest tile side cut from slides (px at --mpp; "
              "default 2048).")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="qupath: model folder whose class names are the defaults (default: the original model's).")
def import_dataset_cmd(fmt: str, src: Path, dst: Path, mpp: float | None, **options):
    """Convert a public dataset (FORMAT) at SRC into the common layout at DST, with splits and dataset.yaml
    (``--help`` lists the formats, from :data:`~cerberus_histo.data.formats.FORMATS`)."""
    from .data.formats import import_dataset

    spec = import_dataset(fmt, src, dst, mpp=mpp, **options)
    names = spec.names()
    mpps = sorted({spec.image_mpp(n) for n in names})
    where = f"{mpps[0]:g} um/px" if len(mpps) == 1 else f"{mpps[0]:g}-{mpps[-1]:g} um/px (per image: {spec.mpp_csv})"
    click.echo(f"imported {len(names)} images ({', '.join(spec.tasks)}) at {where} into {spec.root / 'dataset.yaml'}")
    if fmt == "qupath":
        from .data.formats.qupath import read_report

        click.echo(read_report(dst).text())


@main.command("extract-patches")
@click.option("--config", type=click.Path(path_type=Path), required=True, help="dataset.yaml (or its folder).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for the patches.")
@click.option("--win-size", type=int, default=996, show_default=True, help="Window side (twice the input).")
@click.option("--step-size", type=int, default=448, show_default=True, help="Step between windows (224 for nuclei).")
@click.option("--mode", type=click.Choice(["valid", "mirror"]), default="valid", show_default=True)
@click.option("--mpp", type=float, default=0.5, show_default=True,
              help="Resolution (um/px) to bring every image to before cutting: the model's (params model.mpp).")
def extract_patches_cmd(config: Path, out_dir: Path, win_size: int, step_size: int, mode: str, mpp: float):
    """Cut a dataset's images and labels into training patches (.npz) at the model's resolution, one folder per
    split; re-runs skip finished images."""
    from .data.patches import extract_patches

    r = extract_patches(config, out_dir, win_size, step_size, mode, mpp=mpp)
    click.echo(f"{r.patches} patches at {r.mpp:g} um/px from {r.images} images ({r.skipped_images} already done, "
               f"{r.empty_windows} windows without tissue"
               + (f" and {r.unlabelled_windows} outside the labelled regions" if r.unlabelled_windows else "")
               + f" skipped) in {out_dir}")


@main.command("evaluate")
@click.option("--task", type=click.Choice(["nuclei", "gland", "lumen", "tissue"]), required=True)
@click.option("--pred", "pred_dir", type=click.Path(path_type=Path), required=True,
              help="An infer-tile output folder as it is, or a folder of predicted label files.")
@click.option("--true", "true_dir", type=click.Path(path_type=Path), required=True,
              help="True label files, or a dataset folder (dataset.yaml).")
@click.option("--split", type=int, default=None, help="Score only this split of the --true dataset's images.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON (default: PRED/evaluation_TASK.json).")
@click.option("--mpp", type=float, default=None,
              help="Resolution of the truth (um/px), for the detection radius. Default: the dataset's, else 0.5.")
@click.option("--radius-um", type=float, default=3.0, show_default=True, help="Centroid pairing radius (nuclei).")
@click.option("--num-classes", type=int, default=None, help="Classes of the type labels (default: the task's).")
def evaluate_cmd(task, pred_dir, true_dir, split, json_path, mpp, radius_um, num_classes):
    """Score predictions against truth, matching files by name: PQ, AJI, Dice, mPQ+, F1, GlaS metrics or
    tissue accuracy; prints a table and writes JSON."""
    from .metrics.evaluate import evaluate, table, write_json

    out = json_path or Path(pred_dir) / f"evaluation_{task}.json"
    if out.is_dir():  # refused before scoring, not after
        raise CerberusError(f"--json {out} is a folder; give a file path (e.g. {out / f'evaluation_{task}.json'})")
    result = evaluate(task, pred_dir, true_dir, mpp=mpp, radius_um=radius_um, num_classes=num_classes, split=split)
    write_json(result, out)
    click.echo(table(result))
    click.echo(f"written {out}")


@main.group("synth")
def synth_group():
    """Synthetic H&E data with exact labels (0.5 um/px), for training and testing without downloads."""


@synth_group.command("tiles")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Dataset folder to write.")
@click.option("--n", "n", type=int, default=100, show_default=True, help="Number of tiles.")
@click.option("--size", type=int, default=448, show_default=True, help="Tile side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--splits", "num_splits", type=int, default=3, show_default=True, help="Number of splits (folds).")
@click.option("--tasks", default="gland,lumen,nuclei,tissue", show_default=True,
              help="Labels to write (comma list); a subset makes a partly-labelled dataset.")
def synth_tiles_cmd(out_dir: Path, n: int, size: int, seed: int, num_splits: int, tasks: str):
    """Tiles with gland, lumen and nuclei instances and classes and the tissue-class map, as a dataset folder."""
    from .data.synthetic import write_tiles

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    spec = write_tiles(out_dir, n, size, seed, num_splits, tasks=names,
                       name="synthetic-tiles" if len(names) == 4 else f"synthetic-{'-'.join(names)}")
    click.echo(f"wrote {n} tiles of {size} px and {spec.root / 'dataset.yaml'}")


@synth_group.command("patches")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Dataset folder to write.")
@click.option("--n-per-class", type=int, default=50, show_default=True, help="Patches per tissue class.")
@click.option("--size", type=int, default=144, show_default=True, help="Patch side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--splits", "num_splits", type=int, default=3, show_default=True, help="Number of splits (folds).")
def synth_patches_cmd(out_dir: Path, n_per_class: int, size: int, seed: int, num_splits: int):
    """Patches of the nine tissue classes for the patch-classification head, as a dataset folder."""
    from .data.synthetic import write_patches

    spec = write_patches(out_dir, n_per_class, size, seed, num_splits)
    click.echo(f"wrote {9 * n_per_class} patches of {size} px and {spec.root / 'dataset.yaml'}")


@synth_group.command("slide")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True, help="Slide file (.tif).")
@click.option("--width", type=int, required=True, help="Level-0 width in pixels.")
@click.option("--height", type=int, required=True, help="Level-0 height in pixels.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Microns per pixel at level 0.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--field", type=int, default=1024, show_default=True, help="Side of the synthetic fields (px).")
@click.option("--fields", "n_fields", type=int, default=8, show_default=True, help="Distinct fields to tile.")
@click.option("--compression", type=click.Choice(["jpeg", "deflate"]), default="jpeg", show_default=True)
def synth_slide_cmd(out_path: Path, width: int, height: int, mpp: float, seed: int, field: int, n_fields: int,
                    compression: str):
    """A pyramidal tiled BigTIFF slide (tissue islands on white) and its ground truth (X.truth.json/.npz),
    written in bounded memory."""
    from .data.slide import write_synthetic_slide

    write_synthetic_slide(out_path, width, height, mpp, seed, field=field, offset=3 * field // 8 // 128 * 128,
                          n_fields=n_fields, compression=compression)
    click.echo(f"wrote {out_path} ({width} x {height} px at {mpp} um/px) and its ground truth")


def _task_options(f):
    """--TASK / --TASK-dir (and --TASK-type) options of `cerberus train`, defined once."""
    for task, help_ in reversed((("gland", "gland instances"),
                                 ("lumen", "lumen instances"), ("nuclei", "nucleus instances"),
                                 ("pclass", "tissue-type patch classification"))):
        if task in ("gland", "nuclei"):
            f = click.option(f"--{task}-type", is_flag=True, help=f"Also train the {task} type head.")(f)
        f = click.option(f"--{task}-dir", type=click.Path(path_type=Path), default=None,
                         help=f"Patch folder (extract-patches output) or dataset folder for {task}.")(f)
        f = click.option(f"--{task}", is_flag=True, help=f"Train {help_}.")(f)
    return f


@main.command("train")
@_task_options
@click.option("--mix-target-in-batch", "mix", is_flag=True,
              help="Mixed-target batches (samples of every segmentation dataset in each batch).")
@click.option("--fold", type=int, default=1, show_default=True,
              help="Validate on split FOLD, train on the other splits; 0 trains on all without validation.")
@click.option("--log-dir", type=click.Path(path_type=Path), required=True, help="Run folder (checkpoints, logs, model).")
@click.option("--config", "params", type=click.Path(path_type=Path), default=None, help="params.yaml (TrainConfig).")
@click.option("--pretrained", default="random", show_default=True,
              help="'random', an ImageNet weights file (torchvision format) or a model folder.")
@click.option("--subtype", type=click.Choice(["gland", "nuclei"]), default=None,
              help="Stage 2: train only this task's type head, starting from the --pretrained model folder.")
@click.option("--max-steps", type=int, default=None, help="Override max_steps of the params.")
@click.option("--threads", type=int, default=None,
              help="Torch threads per process (default: the usable cores other processes leave free; the settings "
                   "line says what was chosen and why).")
@click.option("--precision", type=click.Choice(["32", "bf16-mixed", "16-mixed"]), default=None,
              help="Override precision of the params.")
@click.option("--accelerator", type=click.Choice(["auto", "cpu", "gpu", "mps"]), default="auto", show_default=True)
@click.option("--devices", default="auto", show_default=True, help="Devices per node (an integer or 'auto').")
@click.option("--num-nodes", type=int, default=1, show_default=True)
@click.option("--resume", default=None, is_flag=False, flag_value="last",
              help="Continue from a checkpoint (default: LOG_DIR/checkpoints/last.ckpt).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --log-dir (its checkpoints, logs, models and extracted patches).")
def train_cmd(mix, fold, log_dir, params, pretrained, subtype, max_steps, threads, precision, accelerator, devices,
              num_nodes, resume, overwrite, **tasks):
    """Train one multi-task model from separately labelled datasets (see docs/training.md)."""
    from .train.config import TrainConfig
    from .train.datamodule import Source
    from .train.run import train

    heads_of = {"gland": "gland-inst", "lumen": "lumen-inst", "nuclei": "nuclei-inst", "pclass": "tissue-class"}
    sources = []
    for task, head in heads_of.items():
        folder, on = tasks[f"{task}_dir"], tasks[task]
        typed = tasks.get(f"{task}_type", False)
        if (on or typed) and folder is None:
            raise CerberusError(f"--{task}{'-type' if typed and not on else ''} needs its data: add --{task}-dir FOLDER")
        if folder is None:
            continue
        heads = (head, f"{task}-type") if typed else (head,)
        if subtype == task:
            heads = (f"{task}-type",)
        elif subtype:
            continue  # stage 2 trains one type head only
        sources.append(Source(folder, heads))
    cfg = TrainConfig.from_yaml(params) if params else TrainConfig()
    if max_steps is not None:
        cfg = cfg.replace(max_steps=max_steps)
    if precision is not None:
        cfg = cfg.replace(precision=precision)
    if threads is not None:
        cfg = cfg.replace(threads=threads)
    dev = int(devices) if str(devices).isdigit() else devices
    summary = train(sources, log_dir, cfg, fold=fold, mix=mix, pretrained=pretrained, subtype=subtype,
                    accelerator=accelerator, devices=dev, num_nodes=num_nodes, resume=resume, overwrite=overwrite)
    if summary is not None:
        val = ", ".join(f"{k} {v:.3f}" for k, v in summary["validation"].items() if not k.endswith("/dice"))
        start, steps = summary["resumed_from_step"], summary["steps"]
        ran = steps - start  # this run's steps; a resumed run's earlier ones are in the checkpoint
        click.echo(f"trained {ran} step{'s' * (ran != 1)}"
                   + (f" ({steps} in all, resumed from step {start})" if start else "")
                   + f" in {summary['seconds']:.0f} s ({summary['samples_per_second']:.1f} samples/s); "
                   f"validation: {val or 'none'}")
        click.echo(f"model: {log_dir / 'model'}")


@main.command("demo")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="Folder for the demo's outputs (index.html / index.md show them).")
@click.option("--quick", is_flag=True,
              help="Fewer tiles, about 1 minute of training and a smaller slide: under 3 minutes on 2 CPU cores.")
@click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU if present), cpu, cuda, cuda:N or mps.")
@click.option("--fresh", is_flag=True, help="Redo every stage (default: skip stages finished with the same settings).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(out_dir: Path, quick: bool, device: str, fresh: bool, seed: int):
    """Run the whole pipeline on synthetic data: synthesise datasets, train a multi-task model for a few
    minutes, evaluate it on held-out tiles, run tile and whole-slide inference, and write an index page.

    About 11 minutes on 2 CPU cores (--quick: under 3). Re-running skips finished stages.
    """
    from .demo import run_demo

    run_demo(out_dir, quick=quick, seed=seed, device=device, fresh=fresh)


_RUN_HELP = {
    "tile": {"input": "An image (PNG, JPEG, TIFF, BMP) or a folder of images.",
             "mpp": "Resolution of the images (um/px); they are resampled to the model's. Default: the model's.",
             "input_shape": "Network window side, used as given (default: 1024, shrunk for small images; "
                            "original: 448).",
             "output_shape": "Central part of each window kept (default: input shape - 304; original: 144).",
             "postproc_workers": "Post-processing processes, overlapped with inference (0: in this process; default: "
                                 "the cores the network leaves free)."},
    "wsi": {"input": "A slide, a folder of slides or a quoted glob pattern ('slides/*.svs'); repeat for more.",
            "mpp": "Level-0 resolution (um/px) when the slides' metadata lacks it.",
            "input_shape": "Network window side (default 1024).",
            "output_shape": "Central part of each window kept (default: input shape - 304; a multiple of 16).",
            "postproc_workers": "Post-processing processes per slide, overlapped with inference (0: in the same "
                                "process; default: the cores the network leaves free)."},
}


def _run_options(kind: str):
    """The options both inference commands share, defined once: --model, --input, --output, --mpp, --device,
    --precision, --batch-size, --threads, --postproc-workers, --tta, --centroids-only, --input-shape,
    --output-shape (see docs/inference.md, "Defaults chosen for the machine"). ``kind``: ``tile`` or ``wsi`` (help
    texts; ``wsi`` takes --input several times)."""
    text = _RUN_HELP[kind]
    options = [
        click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Model folder."),
        click.option("--input", "inputs", multiple=True, required=True, help=text["input"]) if kind == "wsi" else
        click.option("--input", "input_path", type=click.Path(path_type=Path), required=True, help=text["input"]),
        click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the results."),
        click.option("--mpp", type=float, default=None, help=text["mpp"]),
        click.option("--device", default="auto", show_default=True,
                     help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Autocast precision: auto = bf16 where the hardware has it natively "
                     "(CUDA GPUs, CPUs with AVX512-BF16/AMX), else fp32."),
        click.option("--batch-size", type=int, default=None,
                     help="Network windows per forward pass (default: 1 on a CPU; on a GPU what fits its memory)."),
        click.option("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)."),
        click.option("--postproc-workers", type=int, default=None, help=text["postproc_workers"]),
        click.option("--tta", is_flag=True, help="Average the 4 flips of every window (4x the network time)."),
        click.option("--centroids-only", is_flag=True, help="GeoJSON nuclei as points (lighter in QuPath)."),
        click.option("--input-shape", type=int, default=None, help=text["input_shape"]),
        click.option("--output-shape", type=int, default=None, help=text["output_shape"]),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _run_settings(params: dict, **more):
    """A :class:`~cerberus_histo.infer.options.RunOptions` from the shared options in ``params`` and ``more``."""
    from .infer.options import RunOptions

    shared = ("mpp", "device", "precision", "batch_size", "threads", "postproc_workers", "tta", "centroids_only",
              "input_shape", "output_shape")
    return RunOptions(**{k: params[k] for k in shared}, **more)


@main.command("infer-tile")
@_run_options("tile")
@click.option("--formats", default="geojson,sqlite,npz,hovernet,overlay,csv", show_default=True,
              help="Comma-separated output formats.")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Mask image for every tile, or folder of masks named {tile stem}.png; every result is clipped "
                   "to the tile's mask. Default: none.")
@click.option("--workers", "old_workers", type=int, default=None, hidden=True,
              help="Deprecated: the old name of --postproc-workers.")
def infer_tile_cmd(model_dir, input_path, output, formats, mask, old_workers, **params):
    """Segment and classify glands, lumina, nuclei and tissue in image tiles; re-runs skip finished images."""
    from .infer.tiles import infer_tiles

    if old_workers is not None:  # its name until --workers came to mean Dask workers in infer-wsi; gone next release
        click.echo("warning: infer-tile --workers is now --postproc-workers; --workers will be removed", err=True)
        if params["postproc_workers"] is not None:
            raise CerberusError("pass --postproc-workers only (--workers is its old name)")
        params["postproc_workers"] = old_workers
    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    s = infer_tiles(model_dir, input_path, output, _run_settings(params, formats=fmts, mask=mask))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items())
    click.echo(f"{len(s.done)} images done, {len(s.skipped)} already done, {len(s.failed)} failed; results in "
               f"{s.output}" + (f"\ntime per stage: {stages}" if stages else ""))
    if s.failed:
        total = len(s.done) + len(s.skipped) + len(s.failed)
        why = f": {next(iter(s.failed.values()))}" if len(s.failed) == 1 else ""  # one failure: its reason here
        raise CerberusError(f"{len(s.failed)} of {total} images failed ({', '.join(s.failed)}){why}; "
                            "fix or remove them and run again (finished images are skipped)")


@main.command("infer-wsi")
@_run_options("wsi")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Tissue mask image (one slide) or folder of masks named {slide stem}.png; default: computed. "
                   "Every result is clipped to a given mask.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Start a local Dask cluster of N worker processes, one slide each (0: slides run here).")
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (tcp://host:8786).")
@click.option("--chunk-size", type=int, default=None,
              help="Chunk side in model pixels (rounded up to whole windows; default: the largest that fits "
                   "--memory-gb); memory grows with its square.")
@click.option("--memory-gb", type=float, default=None,
              help="Memory budget of a slide's process and its workers (default on a CPU: 3 GB, or half the "
                   "available memory if less; on a GPU machine half the available). More = larger chunks = faster.")
@click.option("--margin-um", type=float, default=256.0, show_default=True,
              help="Context around each chunk (um); must exceed the largest gland's reach from its centre.")
@click.option("--strict", is_flag=True,
              help="A region of a slide that stays unreadable after a retry fails the slide (default: the region is "
                   "filled white and recorded, the rest of the slide is done, and the exit code is 3).")
def infer_wsi_cmd(model_dir, inputs, output, mask, workers, scheduler, chunk_size, memory_gb, margin_um, strict,
                  **params):
    """Segment and classify glands, lumina, nuclei and tissue in whole slides, chunk by chunk; re-runs resume
    unfinished slides, skip those finished with the same settings and redo the others (see docs/wsi.md).

    Exit code: 0 when every slide is done, 2 when one failed, 3 when none failed but one completed with
    unreadable regions (docs/reliability.md)."""
    from .infer.cohort import infer_wsi

    opts = _run_settings(params, chunk_size=chunk_size, memory_gb=memory_gb, margin_um=margin_um, mask=mask,
                         workers=workers, scheduler=scheduler, strict=strict)
    s = infer_wsi(model_dir, inputs, output, opts)
    click.echo(s.table())
    done = sum(r.status == "done" for r in s.rows)
    skipped = sum(r.status == "skipped" for r in s.rows)
    partly = f"{len(s.unreadable)} completed with unreadable regions, " if s.unreadable else ""
    click.echo(f"{done} slides done, {skipped} already done, {partly}{len(s.failed)} failed; results in {s.output}")
    if s.failed:
        names = ", ".join(r.slide for r in s.failed[:5]) + (", ..." if len(s.failed) > 5 else "")
        why = f": {s.failed[0].reason}" if len(s.failed) == 1 else ""  # one failure: its reason on this line too
        raise CerberusError(f"{len(s.failed)} of {len(s.rows)} slides failed ({names}){why}; see the table above, fix "
                            "them and run again (finished slides are skipped)")
    if s.unreadable:
        names = ", ".join(r.slide for r in s.unreadable[:5]) + (", ..." if len(s.unreadable) > 5 else "")
        click.echo(f"error: {len(s.unreadable)} of {len(s.rows)} slides completed with unreadable regions ({names}); "
                   "their level-0 boxes are in each slide's metadata and summary; copy the slides again", err=True)
        sys.exit(3)


@main.command("view")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--slide", type=click.Path(path_type=Path), default=None,
              help="The slide (or image) of a single result whose recorded path no longer holds it.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port to listen on (0: any free port; the address is printed).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 127.0.0.1 keeps the viewer to this machine (0.0.0.0 opens it to the network).")
@click.option("--open", "open_browser", is_flag=True, help="Open the viewer in the default web browser.")
def view_cmd(results: Path, slide: Path | None, port: int, host: str, open_browser: bool):
    """Look at results in a web browser: the slide or tiles with tissue regions, glands, lumina and nuclei on top.

    RESULTS is a result folder of infer-wsi or infer-tile (a cohort folder lists its slides) or one of its .db
    stores. Read-only; Ctrl-C stops the server.
    """
    from .view import serve

    serve(results, slide=slide, host=host, port=port, open_browser=open_browser)


if __name__ == "__main__":  # pragma: no cover
    main()
