"""The Cerberus multi-task network: one shared encoder, one decoder per dense head, a patch-class head.

:class:`CerberusNet` is the ``nn.Module``: it knows its layers and ``forward``. What users hold,
:class:`cerberus_histo.Cerberus`, is this network with the verbs ``load``, ``save``, ``predict_tile`` and
``predict_wsi`` (:mod:`cerberus_histo.api`), which sits above both the models and the inference code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..config import ModelConfig, trusted_heads
from ..errors import ConfigError
from .decoders import ClassHead, DenseDecoder
from .encoders import build_encoder


class CerberusNet(nn.Module):
    """Multi-task network built from a :class:`~cerberus_histo.config.ModelConfig`.

    ``forward(images)`` takes ``N x 3 x H x W`` RGB pixels (uint8, or float in 0-255) and returns a dict
    of logits by head name: ``N x C x H x W`` for ``inst``/``type`` heads and ``N x C`` for ``class`` heads.
    Normalisation (``config.norm``) happens inside, so saved weights carry their own input convention.

    Module layout: ``encoder`` (torchvision names for ResNets), ``bottleneck`` (1x1 conv, deepest feature to
    the next level's width; the original's ``conv_map``; only built with dense heads) and ``heads[head_name]`` (a :class:`DenseDecoder` or
    :class:`ClassHead`). Only the configured tasks' heads are built.

    Example:
        >>> net = CerberusNet(ModelConfig.preset("original")).eval()
        >>> logits = net(torch.zeros(1, 3, 448, 448))      # {"gland-inst": 1x3x448x448, ...}
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

    @property
    def trusted_heads(self) -> tuple[str, ...]:
        """The heads whose outputs inference computes and writes: the provenance's ``trained_heads`` (every head
        when the provenance has none: an original release, a freshly built model); see
        :func:`~cerberus_histo.config.trusted_heads`."""
        return trusted_heads(self.config, self.provenance)

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

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
