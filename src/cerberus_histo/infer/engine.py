"""The inference engine: softmax probability maps of any region of any :class:`~cerberus_histo.io.readers.Reader`.

One code path serves tiles (an :class:`~cerberus_histo.io.readers.ArrayReader`) and slides (a slide reader): a
:class:`Predictor` reads the region plus its context in one ``read_region`` call at the model's mpp (white
outside the image), cuts it into the windows of a :class:`~.tiling.TilePlan`, runs them through the network in
batches (optionally with flip test-time augmentation; bf16/fp16 autocast and the channels_last layout as
:mod:`.runtime` chooses them for the machine), applies the softmax to the kept central crops only and writes them
into the region's maps, in a thread while the next batch runs. Every output pixel comes from exactly one window.

Coordinates: a region is ``(x, y, width, height)`` in *model-resolution* pixels of the reader's image, i.e.
level-0 pixel = model pixel x ``model.config.mpp / reader.mpp``. Dense heads give ``C x height x width`` maps;
``class`` heads (tissue type) give ``C x ceil(height / cell) x ceil(width / cell)`` maps, one value per ``cell``
(the encoder's overall stride, 16 px) = the class of the patch of ``class_pool_cells`` cells centred on it, of which
only the cells inside the image are averaged (what lies outside is read as white but does not vote).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import CerberusError
from ..io.readers import Reader
from .results import RegionPrediction
from .runtime import PRECISIONS, autocast_dtype, plan_runtime, resolve_device
from .tiling import Geometry, Tile, TilePlan, cell_count, cell_weights, plan_tiles
from .window_cache import window_key

#: the flips averaged by test-time augmentation: none, left-right, up-down, both (dims of N x C x H x W)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


class Predictor:
    """Sliding-window inference with one model.

    Args:
        model: a :class:`~cerberus_histo.models.net.Cerberus` network; it is put in eval mode and moved to
            ``device`` (in place, like ``model.to``).
        geometry: window sides; default :meth:`Geometry.default` (1024 in / 720 out, shrunk to small regions).
            ``Geometry.original()`` is the original's 448/144. ``input_shape``/``output_shape`` build one
            (``output_shape`` defaults to ``input_shape - 304``), used as given unless ``fit=True``.
        batch_size: windows per forward pass (None: chosen for the device, see :mod:`.runtime`).
        device: ``"auto"`` (a CUDA GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
            ``"mps"``.
        precision: ``"auto"`` (bf16 where the hardware has it natively, else fp32; see :mod:`.runtime`),
            ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast (weights stay fp32).
        tta: average the probabilities of the 4 flips of each window (4x the network time).
        heads: heads to compute (default: the model's trusted heads, ``model.trusted_heads``: a head its provenance
            says was never trained is not run, so nothing downstream sees its random outputs).
        prob_dtype: dtype of the returned maps (``np.float16`` halves their memory).
        runtime: settings chosen before (:func:`~.runtime.plan_runtime`); ``device``, ``precision`` and
            ``batch_size`` are then taken from it.

    ``runtime`` holds what was chosen (:class:`~.runtime.Runtime`; its ``line()`` says it); the model is put in
    the channels_last layout where that is faster (CPU and CUDA).
    """

    def __init__(self, model, geometry: Geometry | None = None, *, input_shape: int | None = None,
                 output_shape: int | None = None, fit: bool | None = None, batch_size: int | None = None,
                 device: str | torch.device = "auto", precision: str = "auto", tta: bool = False,
                 heads: Iterable[str] | None = None, prob_dtype=np.float32, runtime=None):
        self.cell = int(model.encoder.strides[-1])
        if geometry is None:
            base = Geometry.default(self.cell)
            if input_shape is not None or output_shape is not None:
                i = int(input_shape or base.input_shape)
                o = int(output_shape if output_shape is not None else i - 2 * base.margin)
                try:
                    base = Geometry(i, o, fit=bool(fit), align=self.cell)
                except ValueError as exc:
                    raise CerberusError(f"window geometry: {exc}") from None
            elif fit is not None:
                base = Geometry(base.input_shape, base.output_shape, fit=fit, align=self.cell)
            geometry = base
        self.geometry = geometry
        if runtime is None:
            side = geometry.input_shape
            runtime = plan_runtime(model, (side, side), device=str(device), precision=precision,
                                   batch_size=batch_size, postproc_workers=0)
        self.runtime = runtime
        self.device = resolve_device(runtime.device)
        self.model = model.to(self.device).eval()
        if runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = runtime.batch_size
        self.precision = runtime.precision
        self.tta = bool(tta)
        self.heads = tuple(getattr(model, "trusted_heads", model.head_names) if heads is None else heads)
        unknown = [h for h in self.heads if h not in model.head_names]
        if unknown:
            raise CerberusError(f"no head(s) {unknown} in this model; heads: {', '.join(model.head_names)}")
        if not self.heads:
            raise CerberusError(f"none of this model's heads ({', '.join(model.head_names)}) was trained (the "
                                "trained_heads of its model.yaml name none of them); train it first")
        self.class_heads = {h for h in self.heads if model.config.head(h)[1].kind == "class"}
        self.prob_dtype = np.dtype(prob_dtype)

    @property
    def _layout(self):
        return torch.channels_last if self.runtime.channels_last else torch.contiguous_format

    @property
    def mpp(self) -> float:
        return float(self.model.config.mpp)

    def full_region(self, reader: Reader) -> tuple[int, int, int, int]:
        """The whole image as a region in model pixels: level-0 size x ``reader.mpp / model mpp``, rounded."""
        w, h = reader.dimensions
        f = reader.mpp / self.mpp
        return 0, 0, max(1, round(w * f)), max(1, round(h * f))

    def plan(self, width: int, height: int, fit: tuple[bool, bool] | None = None) -> TilePlan:
        """The windows of a ``width x height`` region: the geometry's, or one larger window where the region fits
        in it and the memory allows (:func:`~.tiling.plan_tiles`)."""
        return plan_tiles(width, height, self.geometry, fit, self.runtime.max_window_pixels())

    # ---- the network on one batch --------------------------------------------------------------------
    def _forward(self, batch: torch.Tensor, inside: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits of a uint8 ``N x 3 x H x W`` batch already on the device (dense maps for every head)."""
        return self.model.forward_dense(batch, self.heads, inside)

    def _inside(self, tiles: Sequence[Tile], origin: tuple[int, int], extent: tuple[int, int],
                shape: tuple[int, int]) -> torch.Tensor:
        """``N x 1 x h x w``: the share of each window cell that lies inside the image (``extent`` = its width and
        height in model pixels; ``origin`` = the region's place in it), for the tissue head's neighbourhood mean."""
        c = self.cell

        def axis(start: int, n: int, length: int) -> np.ndarray:
            lo = start + np.arange(n) * c
            return np.clip(np.minimum(lo + c, length) - np.maximum(lo, 0), 0, c) / c

        maps = [np.outer(axis(origin[1] + t.window[1], cell_count(shape[0], c), extent[1]),
                         axis(origin[0] + t.window[0], cell_count(shape[1], c), extent[0])) for t in tiles]
        return torch.from_numpy(np.stack(maps)[:, None].astype(np.float32)).to(self.device)

    def _probs(self, batch: torch.Tensor, crops: Sequence[tuple[int, int, int, int]],
               inside: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        """Softmax probabilities (float32, CPU) of each window's crop: ``crops[i]`` = (x0, y0, x1, y1) in window
        pixels for dense heads; class heads return their whole cell maps (``inside``: see :meth:`_inside`). Flips
        are averaged with ``tta``."""
        dtype = autocast_dtype(self.precision)
        kind = self.device.type
        flips = TTA_FLIPS if self.tta else ((),)
        x0, y0 = min(c[0] for c in crops), min(c[1] for c in crops)  # the union of the crops
        x1, y1 = max(c[2] for c in crops), max(c[3] for c in crops)
        acc: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for dims in flips:
                x = batch.flip(dims) if dims else batch
                w = inside.flip(dims) if dims and inside is not None else inside
                out = self._forward(x.contiguous(memory_format=self._layout), w)
                for name, logits in out.items():
                    logits = logits.flip(dims) if dims else logits
                    if name not in self.class_heads:
                        logits = logits[..., y0:y1, x0:x1]
                    p = logits.float().softmax(1)
                    acc[name] = p if name not in acc else acc[name] + p
        res: dict[str, list[torch.Tensor]] = {}
        half = self.prob_dtype == np.float16
        for name, p in acc.items():
            p = p / len(flips)
            p = (p.half() if half and name not in self.class_heads else p).cpu()  # half the copy for float16 maps
            if name in self.class_heads:
                res[name] = list(p)
            else:
                res[name] = [p[i, :, c[1] - y0:c[3] - y0, c[0] - x0:c[2] - x0] for i, c in enumerate(crops)]
        return res

    # ---- a region ------------------------------------------------------------------------------------
    def predict_region(self, reader: Reader, region: tuple[int, int, int, int] | None = None,
                       progress=None, keep: Callable[[Sequence[Tile]], Sequence[bool]] | None = None,
                       fit: tuple[bool, bool] | None = None, cache=None) -> RegionPrediction:
        """Probabilities of ``region`` = (x, y, width, height) in model pixels (default: the whole image).

        ``progress``, if given, is called with the number of windows finished after each batch. ``keep``, if
        given, gets the plan's windows and returns one flag per window: windows flagged False are not run (whole
        slides skip the windows without tissue) and their output crops stay 0 in every map (no class has any
        probability there); nothing is read when no window is left. ``windows`` of the result counts the windows
        run. ``fit`` = (x, y) overrides the geometry's ``fit`` per axis (see :func:`~.tiling.plan_tiles`).
        ``cache`` (a :class:`~.window_cache.WindowCache`; whole slides) gives the outputs of windows run before
        for another region, stitched instead of run again (counted in ``reused``), and keeps the outputs of the
        windows run here that it :meth:`~.window_cache.WindowCache.wants`.
        """
        timings = {"read": 0.0, "forward": 0.0, "stitch": 0.0}
        x, y, width, height = region or self.full_region(reader)
        if width < 1 or height < 1:
            raise CerberusError(f"region {region} is empty; width and height must be >= 1 model pixel")
        plan = self.plan(width, height, fit)
        tiles = plan.tiles()
        if keep is not None:
            tiles = [t for t, k in zip(tiles, keep(tiles), strict=True) if k]
        reused: list[Tile] = []
        if cache is not None:  # windows another region ran: stitched below, not run
            run: list[Tile] = []
            for t in tiles:
                (reused if window_key((x, y), t.window, t.crop) in cache else run).append(t)
            tiles = run
        t0 = time.perf_counter()
        rx0, ry0, rx1, ry1 = plan.read_box
        f = self.mpp / reader.mpp  # level-0 pixels per model pixel
        if tiles:  # one read: the windows that run
            rx0, ry0 = min(t.window[0] for t in tiles), min(t.window[1] for t in tiles)
            rx1, ry1 = max(t.window[2] for t in tiles), max(t.window[3] for t in tiles)
            block = reader.read_region(((x + rx0) * f, (y + ry0) * f), (rx1 - rx0, ry1 - ry0), self.mpp)
        timings["read"] += time.perf_counter() - t0

        n_cells = (cell_count(height, self.cell), cell_count(width, self.cell))
        probs: dict[str, np.ndarray] = {}
        for name in self.heads:
            c = self.model.config.head(name)[0].num_outputs(self.model.config.head(name)[1].kind)
            shape = (c, *n_cells) if name in self.class_heads else (c, height, width)
            probs[name] = np.zeros(shape, np.float32 if name in self.class_heads else self.prob_dtype)
        wh, ww = plan.window_shape
        extent = self.full_region(reader)[2:]

        def stitch(chunk: Sequence[Tile], out: dict[str, list[torch.Tensor]]) -> float:
            t1 = time.perf_counter()
            for name, maps in out.items():
                for t, p in zip(chunk, maps, strict=True):
                    self._stitch(probs[name], p.numpy(), t, plan, name in self.class_heads)
            return time.perf_counter() - t1

        # batch k is stitched (a thread: numpy copies release the GIL) while the network runs batch k + 1
        with ThreadPoolExecutor(1) as stitcher:
            pending = None
            for b in range(0, len(tiles), self.batch_size):
                chunk = tiles[b:b + self.batch_size]
                t0 = time.perf_counter()
                windows = torch.from_numpy(np.stack([block[t.window[1] - ry0:t.window[1] - ry0 + wh,
                                                           t.window[0] - rx0:t.window[0] - rx0 + ww] for t in chunk]))
                if self.device.type == "cuda":
                    windows = windows.pin_memory()
                batch = windows.permute(0, 3, 1, 2).to(self.device, non_blocking=True)
                inside = self._inside(chunk, (x, y), extent, (wh, ww)) if self.class_heads else None
                out = self._probs(batch, [t.crop_in_window for t in chunk], inside)
                timings["forward"] += time.perf_counter() - t0
                if cache is not None:
                    for i, t in enumerate(chunk):
                        if cache.wants(key := window_key((x, y), t.window, t.crop)):
                            cache.put(key, {name: maps[i].numpy().copy() for name, maps in out.items()})
                if pending is not None:
                    timings["stitch"] += pending.result()
                pending = stitcher.submit(stitch, chunk, out)
                if progress is not None:
                    progress(len(chunk))
            if pending is not None:
                timings["stitch"] += pending.result()
        t0 = time.perf_counter()
        for t in reused:
            for name, p in cache.get(window_key((x, y), t.window, t.crop)).items():
                self._stitch(probs[name], p, t, plan, name in self.class_heads)
        timings["stitch"] += time.perf_counter() - t0
        for name in self.class_heads:
            probs[name] = probs[name].astype(self.prob_dtype, copy=False)
        return RegionPrediction(probs, (x, y, width, height), self.mpp, self.cell, len(tiles), timings, len(reused))

    def _stitch(self, target: np.ndarray, p: np.ndarray, tile: Tile, plan: TilePlan, coarse: bool) -> None:
        if not coarse:
            x0, y0, x1, y1 = tile.crop
            target[:, y0:y1, x0:x1] = p
            return
        my, jy, wy = cell_weights(plan.ys, tile.row, self.cell)
        mx, jx, wx = cell_weights(plan.xs, tile.col, self.cell)
        part = p[:, jy:jy + wy.shape[1], jx:jx + wx.shape[1]]
        target[:, my:my + wy.shape[0], mx:mx + wx.shape[0]] += np.einsum("ij,cjk,lk->cil", wy, part, wx, optimize=True)


@torch.no_grad()
def classify_patches(model, patches, head: str = "tissue-class", batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities (``N x C`` float32) of ``model``'s ``class`` head for RGB patches (an ``N x H x W x 3``
    uint8 array, or a list of equal-sized ``H x W x 3`` arrays) at the model's mpp, ideally of
    ``config.class_patch_shape`` pixels: the patch head as trained, one class per patch. Runs on the model's
    device, in eval mode."""
    from ..errors import ConfigError
    from ..models.decoders import ClassHead

    if head not in model.heads or not isinstance(model.heads[head], ClassHead):
        raise ConfigError(f"no patch-class head {head!r} in this model; heads: {', '.join(model.head_names)}")
    model.eval()
    device = next(model.parameters()).device
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 RGB patches, got shape {patches.shape}")
    out = [model(torch.from_numpy(np.ascontiguousarray(patches[i:i + batch_size])).permute(0, 3, 1, 2).to(device),
                 heads=[head])[head].float().softmax(1).cpu().numpy() for i in range(0, len(patches), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(model.config.head(head)[0].class_names)), np.float32)


__all__ = ["PRECISIONS", "Predictor", "RegionPrediction", "TTA_FLIPS", "classify_patches", "resolve_device"]
