"""The Cerberus multi-task network: one shared encoder, one decoder per dense head, a patch-class head."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .decoders import ClassHead, DenseDecoder
from .encoders import build_encoder


class Cerberus(nn.Module):
    """Multi-task network built from a :class:`~cerberus_histo.config.ModelConfig`.

    ``forward(images)`` takes ``N x 3 x H x W`` RGB pixels (uint8, or float in 0-255) and returns a dict
    of logits by head name: ``N x C x H x W`` for ``inst``/``type`` heads and ``N x C`` for ``class`` heads.
    Normalisation (``config.norm``) happens inside, so saved weights carry their own input convention.

    Module layout: ``encoder`` (torchvision names for ResNets), ``bottleneck`` (1x1 conv, deepest feature to
    the next level's width; the original's ``conv_map``; only built with dense heads) and ``heads[head_name]`` (a :class:`DenseDecoder` or
    :class:`ClassHead`). Only the configured tasks' heads are built.

    Example:
        >>> model = Cerberus(ModelConfig.preset("original"))
        >>> logits = model(torch.zeros(1, 3, 448, 448))      # {"gland-inst": 1x3x448x448, ...}
        >>> model.save("my_model"); same = Cerberus.load("my_model")
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        #: where the weights came from (an imported original release, a training run); saved in model.yaml
        self.provenance: dict = {}
        self.encoder = build_encoder(config.encoder, config.stem_stride)
        f = self.encoder.channels
        dense = any(k != "class" for t in config.tasks for k in t.kinds)
        self.bottleneck = nn.Conv2d(f[4], f[3], 1, bias=False) if dense else None
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            for kind, name in zip(task.kinds, task.head_names, strict=True):
                n_out = task.num_outputs(kind)
                if kind == "class":
                    self.heads[name] = ClassHead(f[4], n_out, config.class_hidden, config.class_dropout,
                                                 config.class_pool_cells)
                else:
                    self.heads[name] = DenseDecoder(f, n_out, config.head_channels)
        norm = config.norm
        self.register_buffer("_mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) conv weights, BatchNorm weight 1 and bias 0, as the original."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W RGB images, got shape {tuple(images.shape)}")
        x = images.float() if not torch.is_floating_point(images) else images
        x = x / self.config.norm.divisor
        if not self.config.norm.is_plain_scale:
            x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        return x

    def forward(self, images: torch.Tensor, heads: Iterable[str] | None = None,
                dense: bool = False, inside: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits by head name; ``heads`` limits the computation to some heads (default: all). ``dense`` and
        ``inside``: see :meth:`forward_dense`."""
        names = self.head_names if heads is None else tuple(heads)
        unknown = [h for h in names if h not in self.heads]
        if unknown:
            raise ConfigError(f"no head(s) {unknown} in this model; heads: {', '.join(self.head_names)}")
        x = self.normalise(images)
        feats = self.encoder(x)
        bottom = None
        out: dict[str, torch.Tensor] = {}
        for name in names:
            head = self.heads[name]
            if isinstance(head, ClassHead):
                if dense:  # the neighbourhood the head was trained on: a class patch, at most class_pool_cells
                    cells = -(-self.config.class_patch_shape // self.encoder.strides[4])
                    out[name] = head.dense(feats[4], min(cells, self.config.class_pool_cells or cells), inside)
                else:
                    out[name] = head(feats[4])
            else:
                if bottom is None:
                    bottom = self.bottleneck(feats[4])
                out[name] = head(feats[:4], bottom, x.shape[-2:])
        return out

    def forward_dense(self, images: torch.Tensor, heads: Iterable[str] | None = None,
                      inside: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Like :meth:`forward`, but ``class`` heads give dense logits ``N x C x h x w`` at the deepest feature's
        resolution (one cell per ``encoder.strides[-1]`` pixels): each cell is classified as the patch centred on it
        of the size the head was trained on, ``class_patch_shape`` in cells and at most ``class_pool_cells`` (9 =
        144 px at stride 16, 5 at stride 32; :meth:`ClassHead.dense`). ``inside`` (``N x 1 x h x w``: the share of
        each cell inside the image) keeps cells outside the image out of the neighbourhood's average. This is what
        inference uses."""
        return self.forward(images, heads, dense=True, inside=inside)

    @torch.no_grad()
    def classify_patches(self, patches, head: str = "tissue-class", batch_size: int = 64):
        """Softmax probabilities (``N x C`` float32 NumPy array) of a ``class`` head for RGB patches (an ``N x H x W x
        3`` uint8 array, or a list of equal-sized ``H x W x 3`` arrays) at the model's mpp, ideally of
        ``config.class_patch_shape`` pixels: the patch head as trained (:meth:`forward`), one class per patch. Runs
        on the model's device, in eval mode."""
        import numpy as np

        if head not in self.heads or not isinstance(self.heads[head], ClassHead):
            raise ConfigError(f"no patch-class head {head!r} in this model; heads: {', '.join(self.head_names)}")
        self.eval()
        device = next(self.parameters()).device
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"expected N x H x W x 3 RGB patches, got shape {patches.shape}")
        out = [self(torch.from_numpy(np.ascontiguousarray(patches[i:i + batch_size])).permute(0, 3, 1, 2).to(device),
                    heads=[head])[head].float().softmax(1).cpu().numpy() for i in range(0, len(patches), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.config.head(head)[0].class_names)), np.float32)

    def predict_tile(self, image, mpp: float | None = None, **options):
        """Instances, type maps and the tissue map of one RGB image (``H x W x 3`` array; RGBA, grey and 16-bit
        are converted with a warning) as a :class:`~cerberus_histo.infer.tiles.TilePrediction`.

        ``mpp`` is the image's resolution; when it differs from the model's the image is resampled, and the
        result's ``scale`` maps its model-resolution coordinates back to image pixels. ``options`` go to
        :class:`~cerberus_histo.infer.engine.Predictor` (``batch_size``, ``device``, ``precision``, ``tta``,
        ``geometry`` or ``input_shape``/``output_shape`` ...); the model is put in eval mode and moved to
        ``device`` in place, like ``model.to``.
        """
        from ..infer.tiles import predict_tile

        return predict_tile(self, image, mpp=mpp, **options)

    def predict_wsi(self, slide, output="cerberus-wsi", *, mpp: float | None = None, mask=None,
                    chunk_size: int | None = None, margin_um: float = 256.0, centroids_only: bool = False,
                    progress: bool = True, **options):
        """Glands, lumina, nuclei and tissue classes of a whole slide, predicted chunk by chunk with bounded memory
        and written to ``output`` (a folder): the SQLite store (TIAToolbox), QuPath GeoJSON, summary JSON/CSV,
        thumbnail overlay, tissue mask and metadata, all in level-0 pixels. Returns a
        :class:`~cerberus_histo.infer.wsi.WSIResult` (output paths, summary, counts, timings).

        ``mpp`` overrides the slide's level-0 resolution; ``mask`` is a tissue mask image (default: computed);
        ``chunk_size`` (model px; default: the largest the memory budget allows) and ``margin_um`` set the
        chunking; a re-run resumes an interrupted slide and skips a finished one. ``options`` go to
        :func:`~cerberus_histo.infer.wsi.make_predictor` (``batch_size``, ``device``, ``precision``, ``tta``,
        ``threads``, ``postproc_workers``, ``memory_gb``, ``input_shape``, ``output_shape``; left out, they are
        chosen for the machine). See ``docs/wsi.md``.
        """
        from ..infer.wsi import predict_wsi

        return predict_wsi(self, slide, output, mpp=mpp, mask=mask, chunk_size=chunk_size, margin_um=margin_um,
                           centroids_only=centroids_only, progress=progress, **options)

    # ---- checkpoints (implemented in .checkpoint) ------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``model.yaml`` (the config) and ``weights.pt`` (the state dict) into ``folder``."""
        from .checkpoint import save_model

        return save_model(self, folder)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Cerberus:
        """Rebuild a model from a folder written by :meth:`save`, or from an original Cerberus model
        folder (``settings.yml`` + ``weights.tar``), which is converted on the fly. Returned in eval mode."""
        from .checkpoint import load_model

        return load_model(folder, device)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
