"""Check, where torchvision is installed (not beside the CPU torch of the project's machines), that
torchvision's ResNet state dicts load strictly into our encoders and give the same features.

    python benchmarks/torchvision_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cerberus_histo.models.encoders import build_encoder, imagenet_state_dict  # noqa: E402


def main() -> int:
    import torchvision

    torch.manual_seed(0)
    failures = 0
    for name in ("resnet18", "resnet34", "resnet50"):
        ref = getattr(torchvision.models, name)(weights=None).eval()
        ours = build_encoder(name, stem_stride=2).eval()
        ours.load_state_dict(imagenet_state_dict(ref.state_dict()), strict=True)
        x = torch.rand(2, 3, 128, 128)
        with torch.no_grad():
            feats = ours(x)
            r = ref.relu(ref.bn1(ref.conv1(x)))
            expected = [r]
            r = ref.layer1(ref.maxpool(r))
            expected.append(r)
            for layer in (ref.layer2, ref.layer3, ref.layer4):
                r = layer(r)
                expected.append(r)
        diff = max(float((a - b).abs().max()) for a, b in zip(feats, expected, strict=True))
        ok = diff < 1e-5
        failures += not ok
        print(f"{name}: torchvision {torchvision.__version__} state dict loads strictly; max |feature diff| "
              f"{diff:.2e} {'OK' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
