"""``cerberus train``: one multi-task model from several partly-labelled datasets, with Lightning.

:func:`train` builds the model (new, from ImageNet encoder weights, or from a model folder), the data
module, loggers and checkpoints, runs :class:`lightning.Trainer` (CPU, GPUs, several nodes with DDP; mixed
precision) and writes the run folder::

    LOG_DIR/
      train.yaml                 # the TrainConfig of the run
      checkpoints/               # last.ckpt, the last periodic step checkpoints, best.ckpt (by val/score)
      csv/metrics.csv            # every logged value (CSVLogger)
      tensorboard/               # the same for TensorBoard
      model/                     # the final model: model.yaml + weights.pt (+ train.yaml); Cerberus.load(...)
      model-best/                # the best validated model, when there was validation
      summary.json               # steps, samples per second, last validation metrics, ranks agreement
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from datetime import timedelta
from pathlib import Path

from ..config import IMAGENET_NORM, ModelConfig
from ..errors import CerberusError, ConfigError
from ..io.files import atomic_write_bytes
from ..tasks import get_task
from .config import TrainConfig
from .datamodule import Source

TASK_ORDER = ("gland", "lumen", "nuclei", "tissue")


def _with_overrides(config: ModelConfig, train_config: TrainConfig) -> ModelConfig:
    """``config`` with the loss weights (``heads``) and class weights of ``train_config`` applied."""
    tasks = []
    for task in config.tasks:
        heads = []
        for head in task.heads:
            over = train_config.heads.get(f"{task.name}-{head.kind}", {})
            unknown = sorted(set(over) - {"loss_weight", "ce_weight", "dice_weight"})
            if unknown:
                raise ConfigError(f"params heads.{task.name}-{head.kind}: unknown key(s) {', '.join(unknown)}")
            heads.append(dataclasses.replace(head, **over))
        weights = train_config.class_weights.get(task.name, task.class_weights)
        tasks.append(dataclasses.replace(task, heads=tuple(heads), class_weights=weights))
    known = {h for t in config.tasks for h in t.head_names}
    unknown = sorted(set(train_config.heads) - known) + sorted(set(train_config.class_weights) - {t.name for t in config.tasks})
    if unknown:
        raise ConfigError(f"params: no head or task {', '.join(unknown)} in this model; heads: {', '.join(sorted(known))}")
    return dataclasses.replace(config, tasks=tuple(tasks))


def _add_heads(config: ModelConfig, heads: list[str]) -> ModelConfig:
    """``config`` plus the built-in heads among ``heads`` that it lacks (a stage-1 model gaining a type head)."""
    tasks = list(config.tasks)
    for name in heads:
        task_name, _, kind = name.rpartition("-")
        builtin = get_task(task_name)
        i = next((k for k, t in enumerate(tasks) if t.name == task_name), None)
        if i is None:
            tasks.append(builtin.with_heads(kind))
        elif kind not in tasks[i].kinds:
            new = tasks[i].heads + (builtin.head(kind),)
            order = {k: n for n, k in enumerate(builtin.kinds)}
            tasks[i] = dataclasses.replace(tasks[i], heads=tuple(sorted(new, key=lambda h: order[h.kind])))
    return dataclasses.replace(config, tasks=tuple(tasks))


def build_model(heads: list[str], train_config: TrainConfig, pretrained: str | None = None):
    """The model to train and a line saying where its weights came from.

    ``pretrained``: ``None``/``"random"``; a model folder (its architecture is kept; heads it lacks are
    added with fresh weights); or an ImageNet state dict in torchvision's format for the encoder.
    """
    import torch

    from ..models.checkpoint import load_encoder_weights, load_model
    from ..models.net import CerberusNet

    torch.manual_seed(train_config.seed)
    if pretrained and pretrained != "random" and Path(pretrained).is_dir():
        base = load_model(pretrained)
        if train_config.model:
            warnings.warn("params 'model' is ignored: the architecture comes from the --pretrained model folder",
                          stacklevel=2)
        config = _with_overrides(_add_heads(base.config, heads), train_config)
        model = CerberusNet(config)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        new = sorted({k.split(".")[1] for k in missing})
        if unexpected or any(not k.startswith("heads.") for k in missing):
            raise CerberusError(f"{pretrained}: its weights do not fit the model to train")
        source = f"model folder {pretrained}" + (f" (new heads: {', '.join(new)})" if new else "")
        return model, source
    tasks = []
    for name in TASK_ORDER:
        kinds = [h.rpartition("-")[2] for h in heads if h.rpartition("-")[0] == name]
        if kinds:
            builtin = get_task(name)
            tasks.append(builtin.with_heads(*[k for k in builtin.kinds if k in kinds]))
    fields = dict(train_config.model)
    if "tasks" in fields:
        raise ConfigError("params model.tasks: the tasks come from the data flags (--gland, --nuclei ...)")
    imagenet = bool(pretrained and pretrained != "random")
    if imagenet and "norm" not in fields:
        fields["norm"] = IMAGENET_NORM
    try:
        config = ModelConfig(tasks=tuple(tasks), **fields)
    except TypeError as exc:
        raise ConfigError(f"params model: {exc}") from None
    model = CerberusNet(_with_overrides(config, train_config))
    if imagenet:
        if not Path(pretrained).is_file():
            raise CerberusError(f"--pretrained {pretrained}: not a file or model folder; give an ImageNet weights "
                                "file, a model folder or 'random'")
        load_encoder_weights(model, pretrained)
        return model, f"ImageNet encoder weights {pretrained}"
    return model, "random initialisation"


def _trainer_kwargs(train_config: TrainConfig, accelerator: str, devices, num_nodes: int) -> dict:
    from lightning.pytorch.strategies import DDPStrategy

    n_devices = devices if isinstance(devices, int) else None
    distributed = num_nodes > 1 or (n_devices is not None and n_devices > 1)
    kwargs = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes,
              "precision": train_config.precision}
    if distributed:  # heads change between steps (segmentation / classification batches)
        kwargs["strategy"] = DDPStrategy(find_unused_parameters=True)
    return kwargs


def train(sources: list[Source], log_dir: str | Path, train_config: TrainConfig | None = None, *,
          fold: int = 1, mix: bool = True, pretrained: str | None = None, subtype: str | None = None,
          accelerator: str = "auto", devices="auto", num_nodes: int = 1, resume: str | None = None,
          progress: bool = True) -> dict | None:
    """Train on ``sources`` and write the run folder ``log_dir`` (see the module docstring); returns the
    summary (``None`` on ranks other than 0). ``subtype`` (``"gland"``/``"nuclei"``) is stage 2: only that task's type head trains, the rest
    of the network (batch-norm statistics included) stays as in the ``pretrained`` model folder."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .datamodule import CerberusData, fold_files, resolve_folder, splits_of
    from .module import CerberusModule

    cfg = train_config or TrainConfig()
    log_dir = Path(log_dir)
    if not sources:
        raise CerberusError("no data: give at least one of --gland-dir, --lumen-dir, --nuclei-dir, --pclass-dir")
    heads = [h for s in sources for h in s.heads]
    trainable = None
    if subtype:
        head = f"{subtype}-type"
        if not pretrained or not Path(pretrained).is_dir():
            raise CerberusError(f"--subtype {subtype} fine-tunes a stage-1 model: pass its folder with --pretrained")
        if head not in heads:
            raise CerberusError(f"--subtype {subtype} trains {head}: give --{subtype}-dir with --{subtype}-type")
        trainable = (head,)
    ckpt = _resume_path(resume, log_dir)
    if cfg.precision == "16-mixed" and not torch.cuda.is_available():
        raise ConfigError("precision 16-mixed needs a CUDA GPU; use bf16-mixed on CPU")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, origin = build_model(heads, cfg, pretrained)
    cfg = cfg.replace(val_every=min(cfg.val_every, cfg.max_steps))
    folders, records = zip(*[resolve_folder(s, model.config, log_dir, progress) for s in sources], strict=True)
    with_fold = [f for f in folders if fold in splits_of(f)]
    resolved = []
    for s, folder, record in zip(sources, folders, records, strict=True):
        files = fold_files(folder, fold, strict=not with_fold)  # every source lacking the fold is an error
        if fold and not files[1]:
            warnings.warn(f"{folder} has no split {fold}: all its patches train, none validate", stacklevel=2)
        record["validated"] = bool(files[1])
        resolved.append((Source(folder, s.heads), *files))
    cfg = cfg.replace(sources=list(records))
    data = CerberusData(resolved, model.config, cfg, mix=mix)
    module = CerberusModule(model, cfg, trainable)
    validate = bool(data.val_sets)
    callbacks = [ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="step-{step:06d}", monitor="step",
                                 mode="max", save_top_k=3, every_n_train_steps=cfg.checkpoint_interval,
                                 save_last=True, auto_insert_metric_name=False)]
    best = None
    if validate:
        best = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="best", monitor="val/score", mode="max",
                               save_top_k=1, auto_insert_metric_name=False)
        callbacks.append(best)
    start_step = _checkpoint_step(ckpt)
    csv_version = f"from-step-{start_step:06d}" if start_step else ""  # a resumed run keeps the earlier rows
    trainer = L.Trainer(
        **_trainer_kwargs(cfg, accelerator, devices, num_nodes), max_steps=cfg.max_steps,
        max_time=None if cfg.max_minutes is None else timedelta(minutes=cfg.max_minutes),
        logger=[CSVLogger(log_dir, name="csv", version=csv_version),
                TensorBoardLogger(log_dir, name="tensorboard", version="")],
        callbacks=callbacks, val_check_interval=cfg.val_every if validate else None,
        check_val_every_n_epoch=None, limit_val_batches=None if validate else 0, num_sanity_val_steps=0,
        use_distributed_sampler=False, enable_progress_bar=progress, enable_model_summary=False,
        log_every_n_steps=min(50, cfg.val_every), default_root_dir=log_dir, deterministic=False)
    if trainer.is_global_zero:
        log_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(log_dir / "train.yaml")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
    seconds = time.perf_counter() - t0
    if validate and module.validated_at != trainer.global_step:  # the end of the run is always validated
        trainer.validate(module, datamodule=data, verbose=False)
    summary = {"steps": trainer.global_step, "resumed_from_step": start_step, "seconds": round(seconds, 1),
               "samples_per_second": round(module.samples_seen * trainer.world_size / max(seconds, 1e-9), 2),
               "world_size": trainer.world_size, "weights_identical_across_ranks": module.ranks_agree,
               "initialisation": origin, "trained_heads": list(trainable or heads), "fold": fold,
               "validation": {k: round(v, 4) for k, v in module.last_validation.items()}}
    if trainer.is_global_zero:
        _write_models(log_dir, model, cfg, best, summary)
        atomic_write_bytes(log_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary if trainer.is_global_zero else None


def _resume_path(resume: str | None, log_dir: Path) -> str | None:
    if not resume:
        return None
    path = log_dir / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise CerberusError(f"--resume: no checkpoint {path}; was the run started with this --log-dir?")
    return str(path)


def _checkpoint_step(ckpt: str | None) -> int:
    if ckpt is None:
        return 0
    import torch

    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception as exc:  # noqa: BLE001
        raise CerberusError(f"{ckpt} is not a readable training checkpoint ({type(exc).__name__})") from None


def _write_models(log_dir: Path, model, cfg: TrainConfig, best, summary: dict) -> None:
    import torch

    from ..models.checkpoint import save_model
    from ..models.net import CerberusNet

    model.provenance = {"trained_with": "cerberus train", "steps": summary["steps"],
                        "initialisation": summary["initialisation"], "trained_heads": ", ".join(summary["trained_heads"])}
    save_model(model, log_dir / "model")
    cfg.save(log_dir / "model" / "train.yaml")
    if best is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        best_model = CerberusNet(model.config)
        best_model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        score = best.best_model_score
        best_model.provenance = dict(model.provenance, best_val_score=round(float(score), 4) if score is not None else None)
        save_model(best_model, log_dir / "model-best")
        cfg.save(log_dir / "model-best" / "train.yaml")
