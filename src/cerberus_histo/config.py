"""Model configuration: typed, validated, saved beside the weights so a model folder alone rebuilds the model.

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError
from .tasks import TASKS, TaskSpec, from_dict, get_task


@dataclass(frozen=True)
class InputNorm:
    """Input normalisation applied inside the network: ``(pixel / divisor - mean) / std`` per RGB channel.

    The original Cerberus only divides by 255 (mean 0, std 1), also with ImageNet weights.
    """

    divisor: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if float(self.divisor) <= 0 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError("norm: divisor must be > 0, mean and std need 3 values each with std > 0")
        object.__setattr__(self, "divisor", float(self.divisor))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def is_plain_scale(self) -> bool:
        return self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0)


IMAGENET_NORM = InputNorm(255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a Cerberus network.

    Attributes:
        tasks: the tasks and their heads; only these decoders are built.
        encoder: a registered encoder name (``resnet18``, ``resnet34``, ``resnet50``, ``tiny``).
        stem_stride: stride of the encoder's first conv. 1 is the original Cerberus variant (overall
            stride 16, output at full input resolution); 2 is the standard ResNet stem (stride 32).
        norm: input normalisation, see :class:`InputNorm`.
        mpp: the resolution (microns per pixel) the model works at.
        head_channels: channels of the 1x1 block before each dense output conv (96 in the original).
        class_hidden, class_dropout: width and dropout of the patch-class head (256 and 0.3).
        class_pool_cells: the patch-class head pools the centre ``n x n`` cells of the deepest feature map
            (9 = a 144-px patch at stride 16, as in the original); ``None`` pools the whole map.
        patch_shape, class_patch_shape: training/inference input sizes of dense and patch-class samples.
    """

    tasks: tuple[TaskSpec, ...]
    encoder: str = "resnet34"
    stem_stride: int = 1
    norm: InputNorm = field(default_factory=InputNorm)
    mpp: float = 0.5
    head_channels: int = 96
    class_hidden: int = 256
    class_dropout: float = 0.3
    class_pool_cells: int | None = 9
    patch_shape: int = 448
    class_patch_shape: int = 144

    def __post_init__(self):
        tasks = tuple(t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in self.tasks)
        if not tasks:
            raise ConfigError("model config: tasks is empty; name at least one of " + ", ".join(TASKS))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"model config: task names must be unique, got {names}")
        object.__setattr__(self, "tasks", tasks)
        if not isinstance(self.norm, InputNorm):
            object.__setattr__(self, "norm", from_dict(InputNorm, self.norm, "model config: norm"))
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError("model config: encoder must be a registered encoder name")
        if self.stem_stride not in (1, 2):
            raise ConfigError(f"model config: stem_stride must be 1 (original) or 2 (standard), got {self.stem_stride}")
        if not (isinstance(self.mpp, (int, float)) and 0.05 <= self.mpp <= 50):
            raise ConfigError(f"model config: mpp must be microns per pixel (e.g. 0.5), got {self.mpp!r}")
        for key in ("head_channels", "class_hidden", "patch_shape", "class_patch_shape"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"model config: class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.class_pool_cells is not None and (not isinstance(self.class_pool_cells, int) or self.class_pool_cells < 1):
            raise ConfigError("model config: class_pool_cells must be a positive integer or null")

    # ---- heads -------------------------------------------------------------------------------------
    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(name for t in self.tasks for name in t.head_names)

    def head(self, name: str):
        """``(task, head_spec)`` of a head name such as ``"nuclei-type"``."""
        task_name, _, kind = name.rpartition("-")
        for t in self.tasks:
            if t.name == task_name and kind in t.kinds:
                return t, t.head(kind)
        raise ConfigError(f"no head {name!r} in this model; heads: {', '.join(self.head_names)}")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"no task {name!r} in this model; tasks: {', '.join(t.name for t in self.tasks)}")

    # ---- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tasks"] = [t.to_dict() for t in self.tasks]
        d["norm"] = {"divisor": self.norm.divisor, "mean": list(self.norm.mean), "std": list(self.norm.std)}
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return from_dict(cls, data, "model config")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (see :data:`PRESETS`) with optional field overrides, e.g. ``encoder="tiny"``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        _, task_names = PRESETS[name]
        return cls(tasks=tuple(get_task(t) for t in task_names), **overrides)


#: name -> (description, tasks). Every preset builds with any registered encoder.
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "original": ("the six heads of the paper: gland inst+type, lumen inst, nuclei inst+type, tissue class",
                 ("gland", "lumen", "nuclei", "tissue")),
    "glands": ("gland inst+type and lumen inst", ("gland", "lumen")),
    "nuclei": ("nuclei inst+type", ("nuclei",)),
    "tissue": ("tissue-type patch classification", ("tissue",)),
}


def trusted_heads(config: ModelConfig, provenance: dict | None = None) -> tuple[str, ...]:
    """The heads of ``config`` whose outputs are written: those named by the provenance's ``trained_heads`` (a
    model folder's ``model.yaml``; a comma-separated string or a list), in the config's order. A model without
    ``trained_heads`` (an original release, a freshly built model) trusts every head. A head that was never trained
    has random weights: its outputs are never written (docs/outputs.md)."""
    named = (provenance or {}).get("trained_heads")
    if named is None:
        return config.head_names
    names = {s.strip() for s in (named.split(",") if isinstance(named, str) else named) if str(s).strip()}
    return tuple(h for h in config.head_names if h in names)
