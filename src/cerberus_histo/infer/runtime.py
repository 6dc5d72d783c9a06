"""Defaults chosen for the machine: device, precision, memory layout, batch, chunk, threads and workers.

Every choice can be given instead (``auto`` or ``None`` asks for it to be chosen); :meth:`Runtime.line` states
them all in the line that starts a run. The rules, each measured (``docs/inference.md``, "Defaults chosen for the
machine"):

* **device** ``auto``: the first CUDA GPU when torch sees one, else the CPU (Apple's ``mps`` only when asked).
* **precision** ``auto``: bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16 (AVX512-BF16
  or AMX; elsewhere it is emulated and slower), fp32 everywhere else. ``fp16`` asked for on a CPU (which has no
  fp16 arithmetic: 3-5x slower than fp32) becomes bf16 where it is native, else fp32, with a warning.
* **layout**: channels_last on CPU and CUDA (faster in every precision measured), the default layout on ``mps``.
* **batch**: 1 on a CPU (a larger batch costs memory and gains nothing there); on a GPU as many windows as fit
  in 60% of its free memory, at most 16.
* **threads** and **post-processing workers**: :func:`~cerberus_histo.cores.plan_cores`, as for training: as many
  torch threads as the usable cores (affinity, CPU quota) that other processes leave free, or ``threads``; the
  workers take the usable cores the network leaves: on an idle CPU whose cores all run the network none
  (post-processing runs between chunks in the same process); on a GPU all cores but two.
* **memory**: a budget (``memory_gb``; default on a CPU 3 GB or half the available memory if that is less, on a
  GPU machine half the available memory) that the whole process and its workers stay within: the chunk side of a
  slide is the largest that fits (:meth:`Runtime.chunk_for`). A larger budget gives larger chunks, and so fewer
  context margins computed twice (faster); a smaller one, more of them.

The network's memory per window is measured once per model, precision and window (:func:`window_bytes`): every
module's output is counted while it lives, on a small window, and scaled to the real one.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..cores import plan_cores
from ..errors import CerberusError

GB = 2**30
CPU_BUDGET_GB = 3.0  # the default memory budget on a CPU (a laptop with 8 GB keeps room for everything else)
GPU_MAX_BATCH = 16
POSTPROC_BYTES_PER_PX = 56  # post-processing's working memory per model pixel of a chunk: 45 measured, + 25%
READ_BYTES_PER_PX = 6  # the chunk's RGB block and the next one's, read ahead
BASE_BYTES = 600 * 2**20  # a process with torch, the readers and post-processing imported (measured 350-450 MB)
REGION_BYTES_PER_PX = 2 * 19 + READ_BYTES_PER_PX + POSTPROC_BYTES_PER_PX  # six heads: maps, blocks, post-processing
MAX_CHUNK_WINDOWS = 8  # extended regions of at most the area of 8 x 8 windows' chunk: a finer pipeline
PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str):
    """The torch autocast dtype of a precision name (None for fp32)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_native_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_cores() -> int:
    """Cores this process may use: its affinity, capped by its control group's CPU quota
    (:func:`~cerberus_histo.cores.plan_cores`)."""
    return plan_cores(1, measure_load=False).usable


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_device(device: str = "auto"):
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch device; a
    one-line error when unavailable."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CerberusError(f"--device {device!r} is unknown; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CerberusError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here; "
                            "use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CerberusError("--device mps: Apple MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CerberusError(f"--device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def auto_precision(device) -> tuple[str, str]:
    """``(precision, why)`` for a torch device: bf16 where the hardware has it natively, else fp32."""
    import torch

    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", f"{torch.cuda.get_device_name(device)} lacks bf16"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "native bf16 on this CPU"
        return "fp32", "no native bf16 on this CPU"
    return "fp32", f"{device.type}"


def window_bytes(model, shape: tuple[int, int], precision: str, batch: int = 1, channels_last: bool = True) -> int:
    """Peak bytes of the tensors that one forward pass of ``batch`` windows of ``shape`` holds (softmax included):
    every module's output is counted from when it is made until it is freed, on a 128-px window, and the peak is
    scaled by area (activations grow with it), + 15% for what lives inside modules and the kernels' scratch
    (on a CPU the peak RSS grew by 1.08-1.17 x the count). Module hooks, not a dispatch mode: no torch._dynamo
    import (0.8 s)."""
    import torch

    live = {"now": 0, "peak": 0}
    seen: set[int] = set()

    def free(key: int, n: int) -> None:
        live["now"] -= n
        seen.discard(key)

    def count(obj) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n and key not in seen:
                seen.add(key)
                live["now"] += n
                live["peak"] = max(live["peak"], live["now"])
                weakref.finalize(storage, free, key, n)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                count(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                count(item)

    side = 128
    device = next(model.parameters()).device
    x = torch.zeros((1, 3, side, side), dtype=torch.uint8, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(precision)
    hooks = [m.register_forward_hook(lambda _m, _i, out: count(out)) for m in model.modules()]
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                                                      enabled=dtype is not None):
            out = model.forward_dense(x, model.head_names)
            count([v.float().softmax(1) for v in out.values()])
    finally:
        for h in hooks:
            h.remove()
    del out
    return int(live["peak"] * batch * shape[0] * shape[1] / side**2 * 1.15)


@dataclass(frozen=True)
class Runtime:
    """What a run uses, and why (``why``: setting -> reason, for the chosen ones)."""

    device: str
    precision: str
    channels_last: bool
    batch_size: int
    threads: int
    postproc_workers: int
    memory_bytes: int
    batch_bytes: int  # the network's host memory for one batch (0 on a GPU)
    weight_bytes: int = 0
    pixel_bytes: int = 0  # the network's memory per window pixel (one window), on its device
    device_bytes: int = 0  # on a GPU: 60% of its free memory when the settings were chosen
    why: dict[str, str] = field(default_factory=dict)

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB

    def chunk_bytes_per_px(self, dense_channels: int) -> int:
        """Host memory per model pixel of a chunk's extended region: its float16 probability maps, the read
        blocks and post-processing, once here and once in each worker (plus the copy sent to it)."""
        here = 2 * dense_channels + READ_BYTES_PER_PX
        if self.postproc_workers == 0:
            return here + POSTPROC_BYTES_PER_PX
        return here + 2 * dense_channels + self.postproc_workers * (2 * dense_channels + POSTPROC_BYTES_PER_PX)

    def chunk_for(self, width: int, height: int, output: int, margin: int, dense_channels: int) -> int:
        """The largest chunk side (a multiple of the window ``output``) whose extended region (the chunk +
        ``margin`` on each side, clipped to the ``width x height`` slide) fits in the budget left after the process
        itself (``BASE_BYTES`` + the weights) and the network's batch, and is no larger than that of a chunk of
        8 x 8 windows (a strip may be one long chunk); at least one window. Fixed figures, not the memory of the
        moment, so that a resumed run chunks the slide as before."""
        left = self.memory_bytes - BASE_BYTES - self.weight_bytes - self.batch_bytes
        per_px = self.chunk_bytes_per_px(dense_channels)
        cap = (MAX_CHUNK_WINDOWS * output + 2 * margin) ** 2
        best = 1
        for k in range(1, math.ceil(max(width, height) / output) + 1):
            side = k * output + 2 * margin
            area = min(side, width) * min(side, height)
            if area > cap or area * per_px > left:
                break
            best = k
        return best * output

    def spare_bytes(self, region_px: int, dense_channels: int) -> int:
        """What the budget leaves beside the process, the batch and a chunk's network region of ``region_px``
        model pixels: the share of the window cache (:class:`~.window_cache.WindowCache`) in memory."""
        used = BASE_BYTES + self.weight_bytes + self.batch_bytes + region_px * self.chunk_bytes_per_px(dense_channels)
        return max(0, self.memory_bytes - used)

    def max_window_pixels(self) -> int:
        """The largest window (in pixels) one forward pass may take: what the GPU's share holds, or on a CPU what
        the budget leaves after the process, with ~100 bytes per pixel for the region's maps and
        post-processing (0 when unknown)."""
        if not self.pixel_bytes:
            return 0
        if self.device_bytes:
            return self.device_bytes // self.pixel_bytes
        left = self.memory_bytes - BASE_BYTES - self.weight_bytes
        return max(0, left) // (self.pixel_bytes + REGION_BYTES_PER_PX)

    def line(self, chunks: bool = True) -> str:
        """The settings in one line, as a run's log starts (``chunks``: with the memory budget of slides)."""
        def why(key: str) -> str:
            return f" ({self.why[key]})" if key in self.why else ""

        workers = (f"{self.postproc_workers} post-processing worker{'s' * (self.postproc_workers != 1)}"
                   if self.postproc_workers else "post-processing in this process")
        return (f"device {self.device}{why('device')}, precision {self.precision}{why('precision')}, layout "
                f"{'channels_last' if self.channels_last else 'contiguous'}, batch {self.batch_size}{why('batch')}, "
                f"{self.threads} torch thread{'s' * (self.threads != 1)}{why('threads')}, {workers}{why('workers')}"
                + (f", memory budget {self.memory_gb:.1f} GB{why('memory')}" if chunks else ""))


def resolve_precision(device, precision: str | None = "auto") -> tuple[str, str]:
    """``(precision, why)``: the precision a run on the torch ``device`` uses when ``precision`` is asked for
    (``auto``: :func:`auto_precision`; ``fp16`` on a CPU, which has no fp16 arithmetic (3-5x slower than fp32):
    bf16 where it is native, else fp32); ``why`` is empty where it is the one asked for. Nothing is loaded, so a
    cohort's parent process can tell what its workers will use (:mod:`.cohort`)."""
    if precision in (None, "auto"):
        return auto_precision(device)
    if precision not in PRECISIONS:
        raise CerberusError(f"--precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        native = cpu_has_native_bf16()
        used, reason = ("bf16", "native bf16 on this CPU") if native else ("fp32", "no native bf16 on this CPU")
        return used, f"fp16 asked, slow on a CPU; {reason}"
    return precision, ""


def plan_runtime(model, window: tuple[int, int] = (1024, 1024), *, device: str = "auto", precision: str = "auto",
                 batch_size: int | None = None, threads: int | None = None, postproc_workers: int | None = None,
                 memory_gb: float | None = None) -> Runtime:
    """Choose every setting left ``auto``/``None`` for ``model`` on this machine (see the module docstring).
    Sets torch's thread count when ``threads`` is given and moves the model to the device."""
    import torch

    why: dict[str, str] = {}
    dev = resolve_device(device)
    if device in (None, "auto"):
        why["device"] = "auto"
    asked = precision
    precision, reason = resolve_precision(dev, precision)
    if reason:
        why["precision"] = reason
    if asked == "fp16" and precision != "fp16":
        warnings.warn(f"--precision fp16 is 3-5x slower than fp32 on a CPU: using {precision} instead "
                      f"({reason.split('; ')[-1]})", stacklevel=2)
    channels_last = dev.type in ("cpu", "cuda")
    if postproc_workers is not None and (not isinstance(postproc_workers, int) or isinstance(postproc_workers, bool)
                                         or postproc_workers < 0):
        raise CerberusError(f"--postproc-workers must be 0 or more, got {postproc_workers!r}")
    cores = plan_cores(threads, gpu=dev.type != "cpu", workers=postproc_workers)
    torch.set_num_threads(cores.threads)
    n_threads = cores.threads
    why["threads"] = cores.why()
    if postproc_workers is None:
        postproc_workers = cores.workers
        why["workers"] = (f"{cores.usable} cores, the network uses {n_threads}" if dev.type == "cpu" else
                          f"{cores.usable} cores, 2 kept for feeding the GPU and reading")
    avail = available_bytes()
    if memory_gb is None:
        budget = avail // 2 if dev.type == "cuda" else min(int(CPU_BUDGET_GB * GB), avail // 2)
        why["memory"] = f"of {avail / GB:.1f} GB available"
    else:
        if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not 0 < memory_gb < math.inf:
            raise CerberusError(f"--memory-gb must be a number of GB > 0 (e.g. 8), got {memory_gb!r}")
        budget = int(memory_gb * GB)
    per_window = window_bytes(model.to(dev), window, precision, 1, channels_last)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
    if batch_size is None:
        if dev.type == "cuda":
            batch_size = int(max(1, min(GPU_MAX_BATCH, 0.6 * free // max(per_window, 1))))
            why["batch"] = f"{per_window / GB:.2f} GB a window, {free / GB:.0f} GB free on the GPU"
        else:
            batch_size = 1
            why["batch"] = f"{per_window / GB:.2f} GB a window"
    elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise CerberusError(f"--batch-size must be a positive integer, got {batch_size!r}")
    host_window = 0 if dev.type == "cuda" else per_window * batch_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return Runtime(str(dev), precision, channels_last, batch_size, n_threads, postproc_workers, budget, host_window,
                   weights, per_window // (window[0] * window[1]), int(0.6 * free), why)


__all__ = ["GB", "PRECISIONS", "Runtime", "auto_precision", "autocast_dtype", "available_bytes", "cpu_cores",
           "cpu_has_native_bf16", "plan_runtime", "resolve_device", "resolve_precision", "window_bytes"]
