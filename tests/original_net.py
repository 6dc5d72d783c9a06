"""A test-only re-creation of the original Cerberus ``NetDesc`` (inference path), written from
``shared/reference/original-cerberus-spec.md`` §1 with the original's module names, so that its state dict has
exactly the keys of ``original-cerberus-state-dict.tsv``.

It is deliberately structured like the original (decoders and output heads in separate ``ModuleDict``s,
``x4`` upsampled with ``scale_factor=2``, the 9x9 crop rule of the patch head) and not like our model, so
that importing its weights into :class:`cerberus_histo.Cerberus` and comparing logits tests the key mapping
and the operations. The backbone reuses our torchvision-named ResNet plus the unused ``fc`` layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cerberus_histo.models.encoders import build_encoder

SETTINGS = {
    "model_kwargs": {
        "encoder_backbone_name": "resnet34",
        "backbone_imagenet_pretrained": False,
        "fullnet_custom_pretrained": False,
        "considered_tasks": ["Lumen", "Gland", "Nuclei", "Nuclei#TYPE", "Gland#TYPE", "Patch-Class"],
        "decoder_kwargs": {
            "Lumen": {"INST": 3},
            "Gland": {"INST": 3},
            "Nuclei": {"INST": 3},
            "Nuclei#TYPE": {"TYPE": 7},
            "Gland#TYPE": {"TYPE": 3},
            "Patch-Class": {"OUT": 9},
        },
    },
    "dataset_kwargs": {
        "input_shape": 448, "output_shape": 448, "class_input_shape": 144,
        "req_target_code": {
            "Lumen-INST": "IP-ERODED-CONTOUR-3", "Gland-INST": "IP-ERODED-CONTOUR-11",
            "Nuclei-INST": "IP-ERODED-CONTOUR-3", "Nuclei-TYPE": "TP", "Gland-TYPE": "TP", "Patch-Class": "PC",
        },
    },
}


class _PostActLayer(nn.Module):
    """conv -> bn -> relu, registered as bn, relu, conv (hence the key order of the original)."""

    def __init__(self, cin, cout, ksize):
        super().__init__()
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, ksize, padding=ksize // 2, bias=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _Block(nn.Module):
    def __init__(self, cin, units, ksize):
        super().__init__()
        self.block = nn.ModuleList()
        for u in units:
            self.block.append(_PostActLayer(cin, u, ksize))
            cin = u

    def forward(self, x):
        for layer in self.block:
            x = layer(x)
        return x


class _Conv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x):
        return self.conv(x)


class _OutHead(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.x = nn.Sequential(_Block(cin, [96], 1), _Conv(96, cout))

    def forward(self, x):
        return self.x(x)


class OriginalNet(nn.Module):
    def __init__(self, encoder="resnet34", decoder_kwargs=None, considered_tasks=None):
        super().__init__()
        decoder_kwargs = decoder_kwargs or SETTINGS["model_kwargs"]["decoder_kwargs"]
        considered_tasks = considered_tasks or list(decoder_kwargs)
        self.backbone = build_encoder(encoder, stem_stride=1)
        f = self.backbone.channels
        self.backbone.avgpool = nn.AdaptiveAvgPool2d(1)  # present (and unused) in the original
        self.backbone.fc = nn.Linear(f[4], 1000)
        self.conv_map = nn.Conv2d(f[4], f[3], 1, bias=False)
        self.decoder_head = nn.ModuleDict()
        self.output_head = nn.ModuleDict()
        for name, outputs in decoder_kwargs.items():
            if name not in considered_tasks:
                continue
            if name == "Patch-Class":
                (n_out,) = outputs.values()
                self.decoder_head[name] = nn.Sequential(OrderedDict([
                    ("bn1", nn.BatchNorm2d(f[4])), ("relu1", nn.ReLU()), ("dropout", nn.Dropout(0.3)),
                    ("conv1", nn.Conv2d(f[4], 256, 1)), ("bn2", nn.BatchNorm2d(256)), ("relu2", nn.ReLU()),
                    ("conv2", nn.Conv2d(256, n_out, 1)),
                ]))
            else:
                self.decoder_head[name] = nn.ModuleList([
                    _Block(f[3], [f[3], f[2]], 3), _Block(f[2], [f[2], f[1]], 3),
                    _Block(f[1], [f[1], f[0]], 3), _Block(f[0], [f[0], f[0]], 3),
                ])
                self.output_head[name] = nn.ModuleDict({k: _OutHead(f[0], c) for k, c in outputs.items()})

    def forward(self, imgs):
        imgs = imgs / 255.0
        feats = self.backbone(imgs)
        bottom = feats[-1]
        feats[-1] = self.conv_map(bottom)
        out = OrderedDict()
        for name, blocks in self.decoder_head.items():
            if name == "Patch-Class":
                feat = bottom
                h, w = feat.shape[-2:]
                if h != 9 and w != 9:
                    top, left = int((h - 9) * 0.5), int((w - 9) * 0.5)
                    feat = feat[:, :, top:top + 9, left:left + 9]
                out[name] = blocks(F.adaptive_avg_pool2d(feat, 1))
                continue
            prev = feats[-1]
            for idx in range(1, len(feats)):
                prev = F.interpolate(prev, scale_factor=2, mode="bilinear", align_corners=False)
                prev = blocks[idx - 1](feats[-(idx + 1)] + prev)
            for head_name, head in self.output_head[name].items():
                out[name.split("#")[0] + "-" + head_name] = head(prev)
        return out


#: original output key -> our head name
OUTPUT_NAMES = {
    "Lumen-INST": "lumen-inst", "Gland-INST": "gland-inst", "Nuclei-INST": "nuclei-inst",
    "Nuclei-TYPE": "nuclei-type", "Gland-TYPE": "gland-type", "Patch-Class": "tissue-class",
}


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that every parameter and buffer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn.weight", "bn1.weight", "bn2.weight", "bn3.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return net.eval()
