"""Task specifications: what each head of the network predicts, with class names, colours and loss weights.

A *task* is a thing a pathologist asks for (``gland``, ``lumen``, ``nuclei``, ``tissue``); a *head* is one
output of the network for that task, of one of three kinds:

``inst``
    3-class dense map (0 background, 1 eroded interior, 2 contour band) from which instances are
    separated; the contour band is made with an ``inst_kernel`` x ``inst_kernel`` ellipse (pixels at
    0.5 µm/px, the original's; a model at another mpp uses the same physical size, :meth:`TaskSpec.kernel_px`).
``type``
    dense per-pixel class map over ``class_names``; index 0 (``nolabel``) is background and never
    enters the type loss.
``class``
    one class per patch over ``class_names`` (tissue type).

Heads are named ``"{task}-{kind}"`` (``"nuclei-type"``); the network's ``forward`` returns logits under
these names. Defaults follow the original Cerberus ``paramset.yml`` and ``dataset.yml`` except where the
original was a bug (the nuclei type loss weight was 0 there; it is 1 here).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import ConfigError

HEAD_KINDS = ("inst", "type", "class")
INST_CHANNELS = 3  # background, eroded interior, contour band
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

RGB = tuple[int, int, int]


def from_dict(cls, data, where: str):
    """Build dataclass ``cls`` from a mapping, naming unknown keys in a clear error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a missing required key, a value of the wrong type
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class HeadSpec:
    """One output of the network for a task.

    ``loss_weight`` multiplies the head's whole loss; ``ce_weight`` and ``dice_weight`` weigh its
    cross-entropy and soft-Dice terms (Dice is used by ``type`` heads in the original).
    """

    kind: str
    loss_weight: float = 1.0
    ce_weight: float = 1.0
    dice_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"head kind {self.kind!r} is unknown; use one of {', '.join(HEAD_KINDS)}")
        for key in ("loss_weight", "ce_weight", "dice_weight"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"head {self.kind!r}: {key} must be a number >= 0, got {value!r}")
            object.__setattr__(self, key, float(value))


#: the resolution at which ``TaskSpec.inst_kernel`` is given in pixels (the original Cerberus worked at 20x)
KERNEL_MPP = 0.5


@dataclass(frozen=True)
class TaskSpec:
    """A task with its heads, class names and display colours (RGB, 0-255)."""

    name: str
    class_names: tuple[str, ...]
    class_colors: tuple[RGB, ...]
    heads: tuple[HeadSpec, ...]
    inst_kernel: int | None = None
    class_weights: tuple[float, ...] | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self):
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"task name {self.name!r} must be lower case letters, digits or '_'")
        heads = tuple(h if isinstance(h, HeadSpec) else from_dict(HeadSpec, h, f"{where} head") for h in self.heads)
        object.__setattr__(self, "heads", heads)
        kinds = [h.kind for h in heads]
        if not heads:
            raise ConfigError(f"{where}: needs at least one head ({', '.join(HEAD_KINDS)})")
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"{where}: head kinds must be unique, got {kinds}")
        if "class" in kinds and len(kinds) > 1:
            raise ConfigError(f"{where}: a 'class' (patch) head cannot share a task with dense heads")
        names = tuple(str(n) for n in self.class_names)
        object.__setattr__(self, "class_names", names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"{where}: class_names needs at least 2 unique names, got {list(names)}")
        colors = tuple(tuple(int(v) for v in c) for c in self.class_colors)
        if len(colors) != len(names) or any(len(c) != 3 or min(c) < 0 or max(c) > 255 for c in colors):
            raise ConfigError(f"{where}: class_colors needs one [r, g, b] (0-255) per class ({len(names)})")
        object.__setattr__(self, "class_colors", colors)
        if "inst" in kinds:
            k = self.inst_kernel
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ConfigError(f"{where}: inst_kernel must be an odd integer >= 1, got {k!r}")
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if len(weights) != len(names) or min(weights) < 0:
                raise ConfigError(f"{where}: class_weights needs one weight >= 0 per class ({len(names)})")
            object.__setattr__(self, "class_weights", weights)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(h.kind for h in self.heads)

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}-{k}" for k in self.kinds)

    def head(self, kind: str) -> HeadSpec:
        for h in self.heads:
            if h.kind == kind:
                return h
        raise KeyError(f"task {self.name!r} has no {kind!r} head")

    def kernel_px(self, mpp: float) -> int:
        """Side in pixels of the contour-band ellipse at ``mpp``: ``inst_kernel`` is given at 0.5 µm/px (the
        original's 3 px for nuclei, 11 for glands) and keeps its size in microns at other resolutions, rounded
        and made odd as post-processing's kernels are (7 px for nuclei at 0.25 µm/px)."""
        k = max(1, round(self.inst_kernel * KERNEL_MPP / mpp))
        return k + 1 if k % 2 == 0 else k

    def num_outputs(self, kind: str) -> int:
        """Channels of a head's logits: 3 for ``inst``, one per class otherwise."""
        return INST_CHANNELS if kind == "inst" else len(self.class_names)

    def with_heads(self, *kinds: str) -> TaskSpec:
        """The same task restricted to the given head kinds (for example ``gland`` without its type head)."""
        missing = [k for k in kinds if k not in self.kinds]
        if missing or not kinds:
            raise ConfigError(f"task {self.name!r} has heads {list(self.kinds)}; cannot keep {list(kinds)}")
        return dataclasses.replace(self, heads=tuple(h for h in self.heads if h.kind in kinds))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        d["class_colors"] = [list(c) for c in self.class_colors]
        d["class_weights"] = None if self.class_weights is None else list(self.class_weights)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        return from_dict(cls, data, f"task {data.get('name', '?')!r}" if isinstance(data, dict) else "task")


GLAND = TaskSpec(
    name="gland",
    class_names=("nolabel", "gland", "surface-epi"),
    class_colors=((0, 0, 0), (255, 255, 0), (177, 52, 235)),
    heads=(HeadSpec("inst", loss_weight=1.4), HeadSpec("type", loss_weight=1.0, dice_weight=1.0)),
    inst_kernel=11,
    class_weights=(0.0, 1.0, 1.0),
    description="gland instances and their class (gland, surface epithelium)",
)
LUMEN = TaskSpec(
    name="lumen",
    class_names=("nolabel", "lumen"),
    class_colors=((0, 0, 0), (131, 235, 52)),
    heads=(HeadSpec("inst", loss_weight=1.5),),
    inst_kernel=3,
    description="lumen instances, each inside a gland",
)
NUCLEI = TaskSpec(
    name="nuclei",
    class_names=("nolabel", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"),
    class_colors=(
        (0, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (176, 244, 230), (0, 191, 255), (255, 165, 0),
    ),
    heads=(HeadSpec("inst", loss_weight=1.0), HeadSpec("type", loss_weight=1.0, dice_weight=1.0)),
    inst_kernel=3,
    class_weights=(0.0, 12.0, 1.0, 2.0, 6.0, 12.0, 2.0),
    description="nucleus instances and their type (the six Lizard/CoNIC classes)",
)
TISSUE = TaskSpec(
    name="tissue",
    class_names=(
        "background", "abnormal_epi", "normal_epi", "inflammatory", "muscle", "stroma", "debris", "mucous",
        "adipose",
    ),
    class_colors=(
        (255, 255, 255), (220, 20, 60), (255, 160, 122), (65, 105, 225), (139, 69, 19), (255, 215, 0),
        (128, 128, 128), (0, 206, 209), (255, 250, 205),
    ),
    heads=(HeadSpec("class", loss_weight=0.4),),
    description="tissue type of each patch (nine classes)",
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in (GLAND, LUMEN, NUCLEI, TISSUE)}


def get_task(name: str) -> TaskSpec:
    """The built-in spec of a task by name."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None
