"""What one demo run runs with: its sizes and budgets (:class:`DemoSettings`, the quick and full presets) and the
machine (device and precision, torch threads, the machine's description for ``demo.json``)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

from .._version import __version__
from ..errors import CerberusError


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


def quick_settings(**changes) -> DemoSettings:
    """The quick preset with some fields changed (tests use a tiny budget)."""
    return replace(DemoSettings.preset(True), **changes)


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


def choose_threads(workers: int) -> int | None:
    """Torch threads for a CPU run of the demo: the cores :func:`~cerberus_histo.cores.plan_cores` finds free
    (affinity, CPU quota, other processes' load) less the ``workers`` processes that run beside the network all
    along (data loading, post-processing), at least 1. OpenMP threads that share cores with busy processes spin and
    wait: on 2 cores with two other busy processes, one thread trained 3.5x faster than two. ``None``: leave
    torch's choice (``OMP_NUM_THREADS`` set)."""
    from ..cores import plan_cores

    cores = plan_cores(workers=workers)
    return None if cores.asked is not None else max(1, cores.threads - workers)


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
