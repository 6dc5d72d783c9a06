"""Decoders and heads, as in the original Cerberus.

A :class:`DenseDecoder` (one per ``inst`` or ``type`` head) is a U-Net decoder: starting from the mapped
deepest feature it upsamples bilinearly to the next skip's size, **adds** the skip feature, and applies two
3x3 conv-BN-ReLU layers, four times; then a 1x1 conv-BN-ReLU to ``head_channels`` (96) and a 1x1 output conv
give the logits. With a stride-1 stem the logits have the input's resolution; otherwise they are upsampled
to it. A :class:`ClassHead` classifies a patch from the raw deepest feature (before the bottleneck map).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """conv (with bias) -> BatchNorm -> ReLU, 'same' padding."""

    def __init__(self, cin: int, cout: int, ksize: int):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, ksize, padding=ksize // 2, bias=True),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        ))


class DenseDecoder(nn.Module):
    """U-Net decoder with additive skips and an output head.

    Args:
        channels: the encoder's five feature channels ``(f0, ..., f4)``; the decoder's input is the
            deepest feature mapped to ``f3`` channels by the network's shared bottleneck conv.
        out_channels: number of logits.
        head_channels: width of the 1x1 block before the output conv.
    """

    def __init__(self, channels: tuple[int, ...], out_channels: int, head_channels: int = 96):
        super().__init__()
        f = channels
        # level for skip s (3, 2, 1, 0): f[s] -> f[s] -> f[s - 1] (f0 at the last level)
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBNReLU(f[s], f[s], 3), ConvBNReLU(f[s], f[max(s - 1, 0)], 3)) for s in (3, 2, 1, 0)
        )
        self.out = nn.Sequential(ConvBNReLU(f[0], head_channels, 1), nn.Conv2d(head_channels, out_channels, 1))

    def forward(self, skips: list[torch.Tensor], bottom: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = bottom
        for block, skip in zip(self.blocks, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip
            x = block(x)
        x = self.out(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class ClassHead(nn.Sequential):
    """Patch classifier: centre crop, global average pool, BN-ReLU-dropout, 1x1 conv, BN-ReLU, 1x1 conv.

    Works with any encoder width ``in_channels`` (the original hard-codes 512). ``pool_cells`` crops the
    centre ``n x n`` cells of the feature map before pooling (the original crops to 9x9 = a 144-px patch at
    stride 16); dimensions not larger than ``n`` are kept whole. Returns ``N x num_classes`` logits.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 256, dropout: float = 0.3,
                 pool_cells: int | None = 9):
        super().__init__(OrderedDict(
            bn1=nn.BatchNorm2d(in_channels),
            relu1=nn.ReLU(inplace=True),
            dropout=nn.Dropout(dropout),
            conv1=nn.Conv2d(in_channels, hidden, 1),
            bn2=nn.BatchNorm2d(hidden),
            relu2=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(hidden, num_classes, 1),
        ))
        self.pool_cells = pool_cells

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        n = self.pool_cells
        if n is not None:
            h, w = feat.shape[-2:]
            top, left = max((h - n) // 2, 0), max((w - n) // 2, 0)
            feat = feat[..., top:top + min(n, h), left:left + min(n, w)]
        x = feat.mean(dim=(-2, -1), keepdim=True)
        return super().forward(x).flatten(1)

    def dense(self, feat: torch.Tensor, cells: int | None = None, inside: torch.Tensor | None = None) -> torch.Tensor:
        """Dense logits ``N x C x h x w`` at the feature map's resolution: cell ``(i, j)`` is classified from the
        average of the ``cells x cells`` cells centred on it (default ``pool_cells``, or 9 when that is ``None``),
        i.e. as the patch of that many cells centred on the cell. Where the neighbourhood reaches past the map only
        the cells inside are averaged; ``inside`` (``N x 1 x h x w``, the share of each cell that lies inside the
        image) weighs the average, so that what lies outside the image (read as white) does not vote. Equals
        :meth:`forward` on a ``cells x cells`` map at its centre cell; meant for eval mode (dropout is skipped)."""
        k = int(cells or self.pool_cells or 9)
        h, w = feat.shape[-2:]
        x = F.avg_pool2d(feat, k, stride=1, padding=k // 2, count_include_pad=False)[..., :h, :w]
        if inside is not None:
            inside = inside[..., :h, :w].to(feat.dtype)
            num = F.avg_pool2d(feat * inside, k, stride=1, padding=k // 2, count_include_pad=False)[..., :h, :w]
            den = F.avg_pool2d(inside, k, stride=1, padding=k // 2, count_include_pad=False)[..., :h, :w]
            x = torch.where(den > 0, num / den.clamp_min(1e-6), x)  # cells with no image around keep the plain mean
        for name, layer in self.named_children():
            if name != "dropout":
                x = layer(x)
        return x
