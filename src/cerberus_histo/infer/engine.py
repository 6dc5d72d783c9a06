"""The inference engine: softmax probability maps of any region of any :class:`~cerberus_histo.io.readers.Reader`.

One code path serves tiles (an :class:`~cerberus_histo.io.readers.ArrayReader`) and slides (a slide reader): a
:class:`Predictor` reads the region plus its context in one ``read_region`` call at the model's mpp (white
outside the image), cuts it into the windows of a :class:`~.tiling.TilePlan`, runs them through the network in
batches (optionally with flip test-time augmentation and bf16/fp16 autocast), applies the softmax to the kept
central crops only and writes them into the region's maps. Every output pixel comes from exactly one window.

Coordinates: a region is ``(x, y, width, height)`` in *model-resolution* pixels of the reader's image, i.e.
level-0 pixel = model pixel x ``model.config.mpp / reader.mpp``. Dense heads give ``C x height x width`` maps;
``class`` heads (tissue type) give ``C x ceil(height / cell) x ceil(width / cell)`` maps, one value per ``cell``
(the encoder's overall stride, 16 px) = the class of the patch of ``class_pool_cells`` cells centred on it, of which
only the cells inside the image are averaged (what lies outside is read as white but does not vote).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import CerberusError
from ..io.readers import Reader
from .results import RegionPrediction
from .tiling import Geometry, Tile, TilePlan, cell_count, cell_weights, plan_tiles

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the flips averaged by test-time augmentation: none, left-right, up-down, both (dims of N x C x H x W)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` (``"cuda:1"``) or ``"mps"`` as a torch device; one-line error when unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CerberusError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CerberusError("device cuda requested but no CUDA GPU is available here; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CerberusError("device mps requested but Apple MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CerberusError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


class Predictor:
    """Sliding-window inference with one model.

    Args:
        model: a :class:`~cerberus_histo.models.net.Cerberus` network; it is put in eval mode and moved to
            ``device`` (in place, like ``model.to``).
        geometry: window sides; default :meth:`Geometry.default` (1024 in / 720 out, shrunk to small regions).
            ``Geometry.original()`` is the original's 448/144. ``input_shape``/``output_shape`` build one
            (``output_shape`` defaults to ``input_shape - 304``), used as given unless ``fit=True``.
        batch_size: windows per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast (weights stay fp32).
        tta: average the probabilities of the 4 flips of each window (4x the network time).
        heads: heads to compute (default all).
        prob_dtype: dtype of the returned maps (``np.float16`` halves their memory).
    """

    def __init__(self, model, geometry: Geometry | None = None, *, input_shape: int | None = None,
                 output_shape: int | None = None, fit: bool | None = None, batch_size: int = 4,
                 device: str | torch.device = "cpu", precision: str = "fp32", tta: bool = False,
                 heads: Iterable[str] | None = None, prob_dtype=np.float32):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
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
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CerberusError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        if precision not in PRECISIONS:
            raise CerberusError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.tta = bool(tta)
        self.heads = tuple(model.head_names if heads is None else heads)
        unknown = [h for h in self.heads if h not in model.head_names]
        if unknown:
            raise CerberusError(f"no head(s) {unknown} in this model; heads: {', '.join(model.head_names)}")
        self.class_heads = {h for h in self.heads if model.config.head(h)[1].kind == "class"}
        self.prob_dtype = np.dtype(prob_dtype)

    @property
    def mpp(self) -> float:
        return float(self.model.config.mpp)

    def full_region(self, reader: Reader) -> tuple[int, int, int, int]:
        """The whole image as a region in model pixels: level-0 size x ``reader.mpp / model mpp``, rounded."""
        w, h = reader.dimensions
        f = reader.mpp / self.mpp
        return 0, 0, max(1, round(w * f)), max(1, round(h * f))

    def plan(self, width: int, height: int) -> TilePlan:
        return plan_tiles(width, height, self.geometry)

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
        dtype = PRECISIONS[self.precision]
        kind = self.device.type
        flips = TTA_FLIPS if self.tta else ((),)
        x0, y0 = min(c[0] for c in crops), min(c[1] for c in crops)  # the union of the crops
        x1, y1 = max(c[2] for c in crops), max(c[3] for c in crops)
        acc: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for dims in flips:
                x = batch.flip(dims) if dims else batch
                w = inside.flip(dims) if dims and inside is not None else inside
                out = self._forward(x.contiguous(memory_format=torch.channels_last), w)
                for name, logits in out.items():
                    logits = logits.flip(dims) if dims else logits
                    if name not in self.class_heads:
                        logits = logits[..., y0:y1, x0:x1]
                    p = logits.float().softmax(1)
                    acc[name] = p if name not in acc else acc[name] + p
        res: dict[str, list[torch.Tensor]] = {}
        for name, p in acc.items():
            p = (p / len(flips)).cpu()
            if name in self.class_heads:
                res[name] = list(p)
            else:
                res[name] = [p[i, :, c[1] - y0:c[3] - y0, c[0] - x0:c[2] - x0] for i, c in enumerate(crops)]
        return res

    # ---- a region ------------------------------------------------------------------------------------
    def predict_region(self, reader: Reader, region: tuple[int, int, int, int] | None = None,
                       progress=None, keep: Callable[[Sequence[Tile]], Sequence[bool]] | None = None
                       ) -> RegionPrediction:
        """Probabilities of ``region`` = (x, y, width, height) in model pixels (default: the whole image).

        ``progress``, if given, is called with the number of windows finished after each batch. ``keep``, if
        given, gets the plan's windows and returns one flag per window: windows flagged False are not run (whole
        slides skip the windows without tissue) and their output crops stay 0 in every map (no class has any
        probability there); nothing is read when no window is left. ``windows`` of the result counts the windows
        run.
        """
        timings = {"read": 0.0, "forward": 0.0, "stitch": 0.0}
        x, y, width, height = region or self.full_region(reader)
        if width < 1 or height < 1:
            raise CerberusError(f"region {region} is empty; width and height must be >= 1 model pixel")
        plan = self.plan(width, height)
        tiles = plan.tiles()
        if keep is not None:
            tiles = [t for t, k in zip(tiles, keep(tiles), strict=True) if k]
        t0 = time.perf_counter()
        rx0, ry0, rx1, ry1 = plan.read_box
        f = self.mpp / reader.mpp  # level-0 pixels per model pixel
        if tiles:
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
        for b in range(0, len(tiles), self.batch_size):
            chunk = tiles[b:b + self.batch_size]
            t0 = time.perf_counter()
            windows = np.stack([block[t.window[1] - ry0:t.window[1] - ry0 + wh, t.window[0] - rx0:t.window[0] - rx0 + ww]
                                for t in chunk])
            batch = torch.from_numpy(windows).permute(0, 3, 1, 2).to(self.device, non_blocking=True)
            inside = self._inside(chunk, (x, y), extent, (wh, ww)) if self.class_heads else None
            out = self._probs(batch, [t.crop_in_window for t in chunk], inside)
            t1 = time.perf_counter()
            timings["forward"] += t1 - t0
            for name, maps in out.items():
                for t, p in zip(chunk, maps, strict=True):
                    self._stitch(probs[name], p.numpy(), t, plan, name in self.class_heads)
            timings["stitch"] += time.perf_counter() - t1
            if progress is not None:
                progress(len(chunk))
        for name in self.class_heads:
            probs[name] = probs[name].astype(self.prob_dtype, copy=False)
        return RegionPrediction(probs, (x, y, width, height), self.mpp, self.cell, len(tiles), timings)

    def _stitch(self, target: np.ndarray, p: np.ndarray, tile: Tile, plan: TilePlan, coarse: bool) -> None:
        if not coarse:
            x0, y0, x1, y1 = tile.crop
            target[:, y0:y1, x0:x1] = p
            return
        my, jy, wy = cell_weights(plan.ys, tile.row, self.cell)
        mx, jx, wx = cell_weights(plan.xs, tile.col, self.cell)
        part = p[:, jy:jy + wy.shape[1], jx:jx + wx.shape[1]]
        target[:, my:my + wy.shape[0], mx:mx + wx.shape[0]] += np.einsum("ij,cjk,lk->cil", wy, part, wx, optimize=True)


__all__ = ["PRECISIONS", "Predictor", "RegionPrediction", "TTA_FLIPS", "resolve_device"]
