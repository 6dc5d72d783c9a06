"""Training settings (the original ``paramset.yml``, typed): read from ``--config params.yaml``, saved as
``train.yaml`` beside the trained weights. No torch import.

Example ``params.yaml`` (every key optional; unknown keys and wrong types are one-line errors)::

    batch_size: 12            # segmentation samples per batch and device
    class_batch_size: 27      # tissue patches per classification batch (>= 2; a multiple of 9 fills 3 x 3 mosaics)
    p_seg: 0.7                # probability that a batch is a segmentation batch
    max_steps: 150000
    optimizer: {name: adam, lr: 1.0e-3, betas: [0.9, 0.999], weight_decay: 0.0}
    scheduler: {name: step, step_size: 75000, gamma: 0.1}     # stepped every step, as the original
    precision: 32             # 32, bf16-mixed or 16-mixed (16-mixed needs a GPU)
    val_every: 2000           # steps between validations; checkpoints at the same interval by default
    model: {encoder: resnet34, patch_shape: 448}               # ModelConfig fields for a new model
    heads: {gland-inst: {loss_weight: 1.4}, nuclei-type: {loss_weight: 1.0, dice_weight: 1.0}}
    class_weights: {nuclei: [0, 12, 1, 2, 6, 12, 2]}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..io.files import read_yaml_mapping
from ..tasks import from_dict

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
PRECISION_ALIASES = {"fp32": "32", "32-true": "32", "bf16": "bf16-mixed", "fp16": "16-mixed", "16": "16-mixed"}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("step", "cosine", "none")


def _number(where: str, value, low: float = 0.0, integer: bool = False, strict: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < low or (strict and value == low):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind} {'>' if strict else '>='} {low:g}, got {value!r}")
    return value if integer else float(value)


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with lr 1e-3, betas (0.9, 0.999), no weight decay: the original's optimiser."""

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        object.__setattr__(self, "lr", _number("optimizer.lr", self.lr, strict=True))
        object.__setattr__(self, "weight_decay", _number("optimizer.weight_decay", self.weight_decay))
        object.__setattr__(self, "momentum", _number("optimizer.momentum", self.momentum))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(_number("optimizer.betas", b) for b in self.betas))


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule, stepped every training step: ``step`` multiplies the rate by ``gamma`` every
    ``step_size`` steps (the original: 75000, 0.1); ``cosine`` decays to 0 at ``max_steps``."""

    name: str = "step"
    step_size: int = 75000
    gamma: float = 0.1

    def __post_init__(self):
        if self.name not in SCHEDULERS:
            raise ConfigError(f"scheduler.name must be one of {', '.join(SCHEDULERS)}, got {self.name!r}")
        _number("scheduler.step_size", self.step_size, 1, integer=True)
        object.__setattr__(self, "gamma", _number("scheduler.gamma", self.gamma, strict=True))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data and the model architecture.

    Attributes:
        batch_size: segmentation samples per batch and device (the original: 12).
        class_batch_size: tissue patches per classification batch; default ``batch_size``; at least 2.
        p_seg: probability of a segmentation batch (the rest are classification batches).
        max_steps: optimiser steps of the run.
        max_minutes: stop after this much wall time even if ``max_steps`` is not reached (then validate).
        optimizer, scheduler: see :class:`OptimizerConfig`, :class:`SchedulerConfig`.
        precision: ``32``, ``bf16-mixed`` (CPU or GPU) or ``16-mixed`` (GPU).
        val_every: steps between validations (also at the end of the run).
        checkpoint_every: steps between checkpoints (default ``val_every``); the best by validation score
            and the last are kept as well.
        val_fraction: share of each validation dataset used, drawn once with ``seed`` (the original: 1/4).
        val_max_samples: at most this many validation samples per dataset.
        seed: seeds the model initialisation, batch draws and augmentation.
        threads: torch threads per process; None: chosen for the machine as inference chooses them
            (:func:`~cerberus_histo.cores.plan_cores`: the usable cores other processes leave free).
        num_workers: data-loading processes per device; None: the usable cores the chosen threads leave (none on an
            idle CPU whose cores all train; fewer threads and one worker when other processes keep cores busy;
            none when ``threads`` or ``OMP_NUM_THREADS`` gives the threads); beside a GPU all but two, at most 8.
        stain_jitter: add stain (HED) jitter to the colour augmentation.
        class_mosaic: tissue patches are trained as ``n x n`` mosaics (default 3: nine 144-px patches side by
            side, each 16/32-px cell of the mosaic labelled with the class of the patch under its centre), with the
            head applied densely as inference applies it, so it learns each cell's class in context and next to
            other classes; 1 trains single patches with one label each (the original).
        bn_calibration_batches: before each validation and at the end, the batch-norm statistics are measured
            afresh on this many segmentation batches (tissue mosaics when there are no segmentation data), every
            head run densely as inference runs it; 0 keeps the running averages of training, which end as
            whatever the last few dozen batches were (tissue-patch batches among them) and cost the demo's model
            up to 0.44 patch accuracy and 0.2 lumen PQ.
        model: fields of :class:`~cerberus_histo.config.ModelConfig` for a new model (encoder, patch_shape ...).
        heads: per head name, ``loss_weight``/``ce_weight``/``dice_weight`` overriding the task's defaults.
        class_weights: per task name, one type-loss weight per class (index 0, background, ignored).
        sources: written by the run, read by nobody: each data source's folder, heads, the resolution its
            patches reached the model at (``mpp``), the range of its images' own (``dataset_mpp``, [min, max])
            and whether it was validated.
        machine: written by the run, read by nobody: the device, the torch threads and data workers it used, and
            why (the cores it saw).
    """

    batch_size: int = 12
    class_batch_size: int | None = None
    p_seg: float = 0.7
    max_steps: int = 150000
    max_minutes: float | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: str = "32"
    val_every: int = 2000
    checkpoint_every: int | None = None
    val_fraction: float = 0.25
    val_max_samples: int = 200
    seed: int = 5
    threads: int | None = None
    num_workers: int | None = None
    stain_jitter: bool = False
    class_mosaic: int = 3
    bn_calibration_batches: int = 24
    model: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    class_weights: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, low in (("batch_size", 1), ("max_steps", 1), ("val_every", 1), ("val_max_samples", 1),
                         ("seed", 0), ("class_mosaic", 1), ("bn_calibration_batches", 0)):
            _number(key, getattr(self, key), low, integer=True)
        for key, low in (("threads", 1), ("num_workers", 0)):
            if getattr(self, key) is not None:
                _number(key, getattr(self, key), low, integer=True)
        if self.class_batch_size is not None:
            _number("class_batch_size", self.class_batch_size, 2, integer=True)
        elif self.batch_size < 2:
            raise ConfigError("batch_size 1 needs class_batch_size >= 2 (the tissue head has BatchNorm)")
        if self.max_minutes is not None:
            object.__setattr__(self, "max_minutes", _number("max_minutes", self.max_minutes, strict=True))
        if self.checkpoint_every is not None:
            _number("checkpoint_every", self.checkpoint_every, 1, integer=True)
        p = _number("p_seg", self.p_seg)
        if p > 1:
            raise ConfigError(f"p_seg must be in [0, 1], got {p}")
        object.__setattr__(self, "p_seg", p)
        frac = _number("val_fraction", self.val_fraction, strict=True)
        if frac > 1:
            raise ConfigError(f"val_fraction must be in (0, 1], got {frac}")
        object.__setattr__(self, "val_fraction", frac)
        object.__setattr__(self, "precision", PRECISION_ALIASES.get(str(self.precision), str(self.precision)))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.stain_jitter, bool):
            raise ConfigError(f"stain_jitter must be true or false, got {self.stain_jitter!r}")
        for key, cls in (("optimizer", OptimizerConfig), ("scheduler", SchedulerConfig)):
            value = getattr(self, key)
            if not isinstance(value, cls):
                object.__setattr__(self, key, from_dict(cls, value, f"params {key}"))
        for key in ("model", "heads", "class_weights", "machine"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key} must be a mapping, got {getattr(self, key)!r}")
        if not isinstance(self.sources, (list, tuple)):
            raise ConfigError(f"sources must be a list (it is written by the run), got {self.sources!r}")
        for name, value in self.heads.items():
            if not isinstance(value, dict):
                raise ConfigError(f"heads.{name} must be a mapping of loss_weight/ce_weight/dice_weight")

    @property
    def class_batch(self) -> int:
        return self.class_batch_size or self.batch_size

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.val_every

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ---- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(self.optimizer.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_dict(cls, data, "params")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            return cls.from_dict(read_yaml_mapping(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        from ..io.files import atomic_write_bytes

        atomic_write_bytes(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False).encode())
