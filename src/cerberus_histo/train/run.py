"""``cerberus train``: one multi-task model from several partly-labelled datasets, with Lightning.

:func:`train` builds the model (new, from ImageNet encoder weights, or from a model folder), the data
module, loggers and checkpoints, runs :class:`lightning.Trainer` (CPU, GPUs, several nodes with DDP; mixed
precision) and writes the run folder::

    LOG_DIR/
      train.yaml                 # the TrainConfig of the run (with the threads and data workers used: machine)
      checkpoints/               # last.ckpt, the last periodic step checkpoints, best.ckpt (by val/score)
      csv/metrics.csv            # every logged value (CSVLogger)
      tensorboard/               # the same for TensorBoard
      model/                     # the final model: model.yaml + weights.pt (+ train.yaml); Cerberus.load(...)
      model-best/                # the best validated model, when there was validation
      summary.json               # steps, samples per second, last validation metrics, ranks agreement
      patches/                   # patches extracted from dataset folders given as data (a cache)

A folder that holds an earlier run (any of :data:`RUN_FILES`) is only continued (``resume``) or replaced
(``overwrite``: the earlier run's files and its patch cache are removed first, nothing else); a run that fails
before training starts leaves no folder it created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

from ..config import IMAGENET_NORM, ModelConfig
from ..errors import CerberusError, ConfigError, Stopped
from ..infer.runtime import cpu_cores, cpu_has_native_bf16
from ..io.files import write_json
from ..progress import show_progress
from ..tasks import TASKS, get_task
from .config import TrainConfig
from .datamodule import Source

TASK_ORDER = ("gland", "lumen", "nuclei", "tissue")
#: what a training run writes into its folder, besides ``patches/`` (:data:`PATCH_CACHE`)
RUN_FILES = ("train.yaml", "summary.json", "checkpoints", "csv", "tensorboard", "model", "model-best")
PATCH_CACHE = "patches"  # the patches of dataset folders given as data, extracted into the run folder
LIGHTNING_NOISE = (  # warnings silenced while training, each matched exactly: every other warning shows
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch >= 2.10 about Lightning's own pytree code
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",  # Lightning's all_gather, under DDP
    r"It is recommended to use `self\.log\('val/",  # sync_dist: every rank validates the same samples (module.py)
    # a resume: the folder is ours (a foreign run is refused before), and the batch sampler's position is restored
    # with the checkpoint, so the run continues exactly (tests/test_train.py::test_resume_continues_exactly)
    r"Checkpoint directory .* exists and is not empty",
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
)


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
    named = sorted(set(train_config.heads) - known) + sorted(set(train_config.class_weights) - {t.name for t in config.tasks})
    builtin = {h for t in TASKS.values() for h in t.head_names} | set(TASKS)
    typos = [n for n in named if n not in builtin]
    if typos:
        raise ConfigError(f"params: no head or task {', '.join(typos)}; heads of this model: {', '.join(sorted(known))}")
    if named:  # one params.yaml serves runs of several head sets (docs/training.md)
        warnings.warn(f"params: {', '.join(named)} not in this run's model; ignored", stacklevel=3)
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
        # the heads the folder had trained stay trained (saved with this run's in the model's trained_heads)
        model.provenance = {"trained_heads": [h for h in base.trusted_heads if h not in new]}
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


def check_hardware(train_config: TrainConfig, accelerator: str, devices) -> TrainConfig:
    """Check ``accelerator`` and ``devices`` against this machine before anything is built: a GPU or MPS that is not
    here, or bad ``devices``, is a one-line error; CPU processes started where GPUs may have been meant, or more
    of them than cores, are announced (a warning). Returns ``train_config``, with ``16-mixed`` replaced on a CPU
    (slow there) by ``bf16-mixed`` where the CPU has native bf16, else ``32``, with a warning."""
    import torch

    if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices > 0)):
        raise CerberusError(f"--devices must be a positive integer or auto, got {devices!r}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if accelerator in ("gpu", "cuda") and not (cuda or (mps and accelerator == "gpu")):
        raise CerberusError(f"--accelerator {accelerator}: no GPU found (torch {torch.__version__} sees no CUDA "
                            "device); use --accelerator cpu or auto")
    if accelerator == "mps" and not mps:
        raise CerberusError("--accelerator mps: Apple MPS is not available here; use --accelerator cpu or auto")
    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise CerberusError(f"--accelerator {accelerator!r} is unknown; use auto, cpu, gpu or mps")
    on_cuda = cuda and (accelerator in ("gpu", "cuda") or (accelerator == "auto" and not mps))
    if on_cuda and isinstance(devices, int) and devices > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise CerberusError(f"--devices {devices}: {n} GPU{'s' * (n != 1)} found; use --devices {n} or fewer")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not cuda and not mps)
    first = _first_process()  # DDP starts this again in each process: warn once
    if on_cpu and isinstance(devices, int) and devices > 1 and first:
        cores = cpu_cores()
        if accelerator == "auto" or devices > cores:
            msg = f"--devices {devices} starts {devices} CPU processes (DDP) on {cores} core{'s' * (cores != 1)}"
            if accelerator == "auto":
                msg = f"no GPU found: {msg}"
            if devices > cores:
                msg += f"; more processes than cores slow each other down: use --devices {cores} or fewer"
            warnings.warn(msg, stacklevel=3)
    if on_cpu and train_config.precision == "16-mixed":
        native = cpu_has_native_bf16()
        used = "bf16-mixed" if native else "32"
        if first:
            warnings.warn(f"precision 16-mixed on a CPU is slow (no fp16 arithmetic there): training with {used} "
                          f"instead ({'native bf16 on this CPU' if native else 'no native bf16 on this CPU'})",
                          stacklevel=3)
        train_config = train_config.replace(precision=used)
    return train_config


GPU_DATA_WORKERS = 8  # data-loading processes per GPU at most, when chosen


def training_device(accelerator: str) -> str:
    """``cpu``, ``cuda`` or ``mps``: where Lightning trains with ``accelerator`` on this machine (after
    :func:`check_hardware`)."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if accelerator == "cpu" or not (cuda or mps):
        return "cpu"
    return "mps" if accelerator == "mps" or not cuda else "cuda"


def plan_training_cores(train_config: TrainConfig, accelerator: str, devices) -> tuple[TrainConfig, str]:
    """This process's torch threads and data workers, chosen as inference chooses them
    (:func:`~cerberus_histo.cores.plan_cores`: the usable cores, others' load, ``threads``; the processes of a
    DDP run share the cores) and set in torch. Data workers, unless ``num_workers`` is given: beside a GPU the
    usable cores but two, at most :data:`GPU_DATA_WORKERS`; on a CPU the usable cores the chosen threads leave,
    none when the threads are given (``threads``, ``OMP_NUM_THREADS``) or DDP's processes share the CPU. Returns ``train_config`` with the choice recorded
    in ``machine`` (``train.yaml``) and the settings line that starts the run."""
    import torch

    from ..cores import plan_cores

    device = training_device(accelerator)
    processes = devices if isinstance(devices, int) else torch.cuda.device_count() if device == "cuda" else 1
    cores = plan_cores(train_config.threads, gpu=device != "cpu", workers=train_config.num_workers,
                       processes=processes, measure_load=_first_process())
    why = "num_workers"
    if train_config.num_workers is None:
        if device != "cpu":
            workers, why = min(cores.workers, GPU_DATA_WORKERS), f"{cores.usable} cores, 2 kept for feeding the device"
        elif cores.asked is not None or processes > 1:  # threads given, or DDP's processes share the CPU
            workers, why = 0, f"{cores.asked_by or 'DDP'}: data loading in the training process"
        else:
            workers, why = cores.workers, f"{cores.usable} cores, the network uses {cores.threads}"
        cores = dataclasses.replace(cores, workers=workers)
    torch.set_num_threads(cores.threads)
    if processes > 1 and device == "cpu":  # DDP starts the other processes with this environment: same threads
        os.environ["OMP_NUM_THREADS"] = str(cores.threads)
    machine = {"device": device, "threads": cores.threads, "data_workers": cores.workers, "cores": cores.why()}
    line = (f"device {device}, precision {train_config.precision}, {cores.threads} torch "
            f"thread{'s' * (cores.threads != 1)} ({cores.why()}), {cores.workers} data "
            f"worker{'s' * (cores.workers != 1)} ({why})" + (f", per process of {processes}" if processes > 1 else ""))
    return train_config.replace(machine=machine), line


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def _quiet_lightning():
    """While training: Lightning's tips (litlogger, litmodels) and the :data:`LIGHTNING_NOISE` warnings silenced;
    Lightning's other info lines (on stderr) and every other warning show as before. Nothing global is changed
    outside the block."""
    import lightning_utilities.core.rank_zero as rank_zero

    loggers = {logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero",
                                                    "lightning.fabric.utilities.rank_zero")} | {rank_zero.log}
    tips = _NoTips()
    for logger in loggers:
        logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for pattern in LIGHTNING_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


def _progress_bar():
    """Lightning's tqdm progress bar, written to stderr: Lightning's own writes to stdout, where results go."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    class StderrProgressBar(TQDMProgressBar):
        def _bar(self, desc: str, position: int, leave: bool, **kwargs) -> Tqdm:
            return Tqdm(desc=desc, position=position, disable=self.is_disabled, leave=leave, dynamic_ncols=True,
                        file=sys.stderr, bar_format=self.BAR_FORMAT, **kwargs)

        def init_sanity_tqdm(self) -> Tqdm:
            return self._bar(self.sanity_check_description, 2 * self.process_position, False)

        def init_train_tqdm(self) -> Tqdm:
            return self._bar(self.train_description, 2 * self.process_position, True, smoothing=0)

        def init_predict_tqdm(self) -> Tqdm:
            return self._bar(self.predict_description, 2 * self.process_position, True, smoothing=0)

        def init_validation_tqdm(self) -> Tqdm:
            has_main_bar = self.trainer.state.fn != "validate"  # as Lightning's: below the training bar
            return self._bar(self.validation_description, 2 * self.process_position + has_main_bar,
                             not has_main_bar)

        def init_test_tqdm(self) -> Tqdm:
            return self._bar("Testing", 2 * self.process_position, True)

    return StderrProgressBar()


def train(sources: list[Source], log_dir: str | Path, train_config: TrainConfig | None = None, *,
          fold: int = 1, mix: bool = True, pretrained: str | None = None, subtype: str | None = None,
          accelerator: str = "auto", devices="auto", num_nodes: int = 1, resume: str | None = None,
          progress: bool = True, overwrite: bool = False) -> dict | None:
    """Train on ``sources`` and write the run folder ``log_dir`` (see the module docstring); returns the
    summary (``None`` on ranks other than 0). ``subtype`` (``"gland"``/``"nuclei"``) is stage 2: only that task's type head trains, the rest
    of the network (batch-norm statistics included) stays as in the ``pretrained`` model folder.

    ``accelerator`` and ``devices`` are checked first (:func:`check_hardware`: a GPU that is not here is a one-line
    error, ``16-mixed`` on a CPU becomes ``bf16-mixed`` or ``32`` with a warning); once the data are found, the
    torch threads and data workers are chosen (:func:`plan_training_cores`) and the settings line is printed on
    stderr, as inference's is. ``progress``: Lightning's bars,
    on stderr and only when it is a terminal; its tips and the deprecation notes of its dependencies are silenced
    (:data:`LIGHTNING_NOISE`). The summary's ``steps`` is the global step at the end (with a resumed run's earlier
    steps; ``resumed_from_step`` says where this run began).

    A ``log_dir`` holding an earlier run is an error unless ``resume`` continues it or ``overwrite`` replaces it
    (its :data:`RUN_FILES` and patch cache are removed once the data and ``pretrained`` are found, before any
    patch is extracted); an empty folder, or one holding none of a run's files, is used as it is."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.utilities.exceptions import SIGTERMException

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
    _check_log_dir(log_dir, resume, overwrite)
    cfg = check_hardware(cfg, accelerator, devices)
    ckpt = _resume_path(resume, log_dir)
    missing = [s.folder for s in sources if not Path(s.folder).is_dir()]
    if missing:  # before any source is extracted into the run folder
        raise CerberusError(f"{missing[0]}: data folder not found")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, origin = build_model(heads, cfg, pretrained)
    cfg = cfg.replace(val_every=min(cfg.val_every, cfg.max_steps))
    if overwrite and _first_process():
        _remove_run(log_dir, sources)
    with _no_new_folder_on_error(log_dir):  # extraction writes into the run folder; a failure here leaves none
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
    cfg, settings = plan_training_cores(cfg, accelerator, devices)  # the inputs are sound: the run starts
    if _first_process():
        print(settings, file=sys.stderr, flush=True)
    data = CerberusData(resolved, model.config, cfg.replace(num_workers=cfg.machine["data_workers"]), mix=mix)
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
    bars = show_progress(progress)
    with _quiet_lightning():
        trainer = L.Trainer(
            **_trainer_kwargs(cfg, accelerator, devices, num_nodes), max_steps=cfg.max_steps,
            max_time=None if cfg.max_minutes is None else timedelta(minutes=cfg.max_minutes),
            logger=[CSVLogger(log_dir, name="csv", version=csv_version),
                    TensorBoardLogger(log_dir, name="tensorboard", version="")],
            callbacks=callbacks + [_save_on_sigterm(log_dir / LAST)] + ([_progress_bar()] if bars else []),
            plugins=[_atomic_checkpoints()],
            val_check_interval=cfg.val_every if validate else None,
            check_val_every_n_epoch=None, limit_val_batches=None if validate else 0, num_sanity_val_steps=0,
            use_distributed_sampler=False, enable_progress_bar=bars, enable_model_summary=False,
            log_every_n_steps=min(50, cfg.val_every), default_root_dir=log_dir, deterministic=False)
        if trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(log_dir / "train.yaml")
        t0 = time.perf_counter()
        try:
            with _no_space_stops(log_dir):
                trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
        except SIGTERMException:  # the job is being stopped: _SaveOnSigterm saved where it was
            message = (f"stopped by SIGTERM at step {trainer.global_step}: checkpoint {log_dir / LAST}; run the same "
                       "command with --resume to continue (Python: train(..., resume='last'))")
            if trainer.is_global_zero:
                print(f"error: {message}", file=sys.stderr, flush=True)
            raise Stopped(message) from None
        seconds = time.perf_counter() - t0
        if validate and module.validated_at != trainer.global_step:  # the end of the run is always validated
            trainer.validate(module, datamodule=data, verbose=False)
    summary = {"steps": trainer.global_step, "resumed_from_step": start_step, "seconds": round(seconds, 1),
               "samples_per_second": round(module.samples_seen * trainer.world_size / max(seconds, 1e-9), 2),
               "world_size": trainer.world_size, "weights_identical_across_ranks": module.ranks_agree,
               "initialisation": origin, "trained_heads": list(trainable or heads), "fold": fold,
               "validation": {k: round(v, 4) for k, v in module.last_validation.items()}}
    if trainer.is_global_zero:
        with _no_space_stops(log_dir):
            _write_models(log_dir, model, cfg, best, summary)
            write_json(log_dir / "summary.json", summary)  # strict JSON: a NaN metric is null
    return summary if trainer.is_global_zero else None


LAST = Path("checkpoints") / "last.ckpt"  # where --resume starts


def _save_on_sigterm(path: Path):
    """A callback for a batch scheduler (SLURM, Kubernetes) that stops a job with SIGTERM, then SIGKILL seconds
    later: Lightning ends the loop at the batch's end, and this saves ``path`` (``last.ckpt``) at the step reached,
    so ``--resume`` continues from there."""
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class SaveOnSigterm(Callback):
        def on_exception(self, trainer, pl_module, exception) -> None:
            if isinstance(exception, SIGTERMException):
                trainer.save_checkpoint(path, weights_only=False)

    return SaveOnSigterm()


def _atomic_checkpoints():
    """Lightning's checkpoint files (``last.ckpt``, the step and best checkpoints) written as the model folders
    are (:func:`~cerberus_histo.models.checkpoint.save_atomic`): beside their final name, then renamed, so a full
    disk never leaves one truncated under that name (Lightning's own writer stages them in the system's temporary
    folder and copies them across when that is another disk), and its error names the checkpoint."""
    from lightning.pytorch.plugins import TorchCheckpointIO

    from ..models.checkpoint import save_atomic

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("storage_options are not used by cerberus' checkpoint writer")
            save_atomic(path, checkpoint)

    return AtomicCheckpointIO()


@contextlib.contextmanager
def _no_space_stops(log_dir: Path):
    """A write of the run that finds no room (a checkpoint, a log, the model) stops it with one line naming the
    file and how to go on: ``--resume`` from ``last.ckpt`` when one was saved, else ``--overwrite``."""
    from ..io.files import no_space_error

    try:
        yield
    except Exception as exc:
        last = log_dir / LAST
        then = (f"run the same command with --resume (not --overwrite): it continues from {last}" if last.is_file()
                else "run the same command with --overwrite: no checkpoint was saved yet")
        if (full := no_space_error(exc, then=then, default=log_dir)) is not None:
            raise full from None
        raise


def _first_process() -> bool:
    """Whether this process starts the run: not one that DDP starts again for another device (``LOCAL_RANK`` > 0),
    nor another rank or node of a launcher (``RANK``, ``NODE_RANK``, ``SLURM_PROCID``)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def run_files(log_dir: Path) -> list[Path]:
    """The files and folders of an earlier training run in ``log_dir`` (:data:`RUN_FILES`)."""
    return [Path(log_dir) / name for name in RUN_FILES if (Path(log_dir) / name).exists()]


def _check_log_dir(log_dir: Path, resume: str | None, overwrite: bool) -> None:
    """One-line errors for a ``log_dir`` that is a file, for ``resume`` with ``overwrite``, and for a folder holding
    an earlier run when neither is given (checked by the first process only: the others find this run's files)."""
    if log_dir.exists() and not log_dir.is_dir():
        raise CerberusError(f"--log-dir {log_dir} exists and is not a folder; choose a folder path")
    if resume and overwrite:
        raise CerberusError("pass --resume or --overwrite, not both: --resume continues the run in --log-dir, "
                            "--overwrite replaces it")
    if resume or overwrite or not _first_process():
        return
    found = run_files(log_dir)
    if found:
        raise CerberusError(f"--log-dir {log_dir} holds a training run ({', '.join(p.name for p in found)}); pass "
                            "--resume to continue it, --overwrite to replace it, or choose a new folder")


def _remove_run(log_dir: Path, sources: list[Source]) -> None:
    """``overwrite``: remove an earlier run's :data:`RUN_FILES` and patch cache from ``log_dir``, nothing else; a
    data folder inside them is an error first."""
    import shutil

    doomed = run_files(log_dir) + ([log_dir / PATCH_CACHE] if (log_dir / PATCH_CACHE).exists() else [])
    for s in sources:
        inside = [p for p in doomed if Path(s.folder).resolve().is_relative_to(p.resolve())]
        if inside:
            raise CerberusError(f"{s.folder} lies in {inside[0]}, which --overwrite removes; give the dataset folder, "
                                "or copy the patches out of --log-dir first")
    for p in doomed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def _no_new_folder_on_error(log_dir: Path):
    """If the block fails and ``log_dir`` did not exist before it, remove it (it holds no run yet: at most the
    patches extracted in the block)."""
    new = not log_dir.exists()
    try:
        yield
    except Exception:
        if new and _first_process() and not run_files(log_dir):
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)
        raise


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

    # trained_heads: this run's heads and those a --pretrained model folder had trained (config order); inference
    # writes the outputs of these heads only
    before = set(model.provenance.get("trained_heads") or ())
    trained = [h for h in model.config.head_names if h in before or h in summary["trained_heads"]]
    model.provenance = {"trained_with": "cerberus train", "steps": summary["steps"],
                        "initialisation": summary["initialisation"], "trained_heads": ", ".join(trained)}
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
