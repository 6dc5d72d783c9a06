"""Encoders: a registry by name; each encoder returns five feature maps and publishes their channels and strides.

The ResNets are written in plain PyTorch with torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ...), so an ImageNet state dict saved by torchvision loads into them (its unused
``fc.*`` classifier is dropped). ``stem_stride=1`` gives the original Cerberus variant: the 7x7 first conv has
stride 1, so the five maps are at strides 1, 2, 4, 8, 16 and the decoders output at full resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class EncoderInfo:
    """Registry entry: a builder ``f(stem_stride) -> Encoder`` and what the encoder is."""

    build: Callable[[int], Encoder]
    channels: tuple[int, int, int, int, int]
    imagenet_keys: bool
    description: str


ENCODERS: dict[str, EncoderInfo] = {}


def register_encoder(name: str, channels, imagenet_keys: bool, description: str):
    def deco(build):
        ENCODERS[name] = EncoderInfo(build, tuple(channels), imagenet_keys, description)
        return build

    return deco


def build_encoder(name: str, stem_stride: int = 1) -> Encoder:
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; registered encoders: {', '.join(ENCODERS)}")
    return ENCODERS[name].build(stem_stride)


class Encoder(nn.Module):
    """Base: ``forward(x)`` returns ``[x0, x1, x2, x3, x4]``; ``channels`` and ``strides`` describe them."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]


# ---- ResNet (torchvision key names) -------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as in torchvision."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(Encoder):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], stem_stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        e = block.expansion
        self.channels = (64, 64 * e, 128 * e, 256 * e, 512 * e)
        self.strides = tuple(stem_stride * s for s in (1, 2, 4, 8, 16))

    def forward(self, x):
        x0 = self.relu(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(x0))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x0, x1, x2, x3, x4]


@register_encoder("resnet18", (64, 64, 128, 256, 512), True, "ResNet-18 (BasicBlock 2-2-2-2)")
def resnet18(stem_stride: int = 1) -> ResNetEncoder:
    return ResNetEncoder(BasicBlock, (2, 2, 2, 2), stem_stride)


@register_encoder("resnet34", (64, 64, 128, 256, 512), True, "ResNet-34 (BasicBlock 3-4-6-3), the paper's encoder")
def resnet34(stem_stride: int = 1) -> ResNetEncoder:
    return ResNetEncoder(BasicBlock, (3, 4, 6, 3), stem_stride)


@register_encoder("resnet50", (64, 256, 512, 1024, 2048), True, "ResNet-50 (Bottleneck 3-4-6-3)")
def resnet50(stem_stride: int = 1) -> ResNetEncoder:
    return ResNetEncoder(Bottleneck, (3, 4, 6, 3), stem_stride)


# ---- a narrow encoder for fast tests and quick demos ----------------------------------------------------


class TinyEncoder(Encoder):
    """Five stages of ``depth`` conv-BN-ReLU layers (default 8, 8, 16, 16, 32 channels), each stage after the
    first halving the resolution."""

    def __init__(self, stem_stride: int = 1, channels=(8, 8, 16, 16, 32), depth: int = 1):
        super().__init__()
        stages, cin = [], 3
        for i, cout in enumerate(channels):
            stride = stem_stride if i == 0 else 2
            layers = []
            for j in range(depth):
                layers += [nn.Conv2d(cin if j == 0 else cout, cout, 3, stride=stride if j == 0 else 1, padding=1,
                                     bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(channels)
        self.strides = tuple(stem_stride * s for s in (1, 2, 4, 8, 16))

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


@register_encoder("tiny", (8, 8, 16, 16, 32), False, "narrow 5-stage CNN for tests and quick demos (no ImageNet weights)")
def tiny(stem_stride: int = 1) -> TinyEncoder:
    return TinyEncoder(stem_stride)


@register_encoder("small", (16, 32, 48, 64, 128), False,
                  "narrow CNN (two convs per stage) that learns the synthetic data in CPU minutes (no ImageNet weights)")
def small(stem_stride: int = 1) -> TinyEncoder:
    return TinyEncoder(stem_stride, (16, 32, 48, 64, 128), depth=2)


def imagenet_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict without its ImageNet classifier (``fc.*``), which Cerberus does not use."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
