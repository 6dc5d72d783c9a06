"""``cerberus demo``: build the network, run it on a synthetic H&E tile, save, reload and check.

This is the foundation demo: it shows the model end to end with progress and per-stage timings. The data,
training, evaluation and slide stages join it as those parts of the toolkit land.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm


def synthetic_tile(size: int, rng: np.random.Generator) -> np.ndarray:
    """A rough H&E-like RGB tile (uint8, ``size x size x 3``): pink stroma, glands of purple nuclei around
    pale lumina, scattered dark nuclei. For smoke runs only; it carries no labels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (236, 178, 206)
    img += rng.normal(0, 6, img.shape)
    nuclei = np.zeros((size, size), bool)
    for _ in range(max(1, size // 150)):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.08, 0.16, 2) * size
        r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
        img[r < 0.75] = (248, 240, 246)  # lumen
        for t in np.linspace(0, 2 * np.pi, 28, endpoint=False):
            ny, nx = cy + 0.88 * ry * np.sin(t), cx + 0.88 * rx * np.cos(t)
            nuclei |= (yy - ny) ** 2 / 16 + (xx - nx) ** 2 / 9 < 1
    for ny, nx in rng.uniform(0, size, (size // 12, 2)):
        nuclei |= (yy - ny) ** 2 + (xx - nx) ** 2 < rng.uniform(6, 16)
    img[nuclei] = (92, 56, 140) + rng.normal(0, 8, (int(nuclei.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def run_demo(out_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    import torch

    from .config import ModelConfig
    from .models.net import Cerberus

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    timings: dict[str, float] = {}
    bar = tqdm(total=4, desc="demo", unit="stage")

    @contextmanager
    def stage(name: str):
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0
        bar.update()

    with stage("build model"):
        config = ModelConfig.preset("original", **({"encoder": "tiny"} if quick else {}))
        model = Cerberus(config).eval()
    with stage("synthesise tile"):
        tile = synthetic_tile(config.patch_shape, rng)
        batch = torch.from_numpy(tile).permute(2, 0, 1)[None]
    with stage("infer"), torch.inference_mode():
        logits = model(batch)
    with stage("save + reload"):
        model.save(out_dir / "model")
        with torch.inference_mode():
            again = Cerberus.load(out_dir / "model")(batch)
    bar.close()
    results = {"reload_max_abs_diff": max(float((again[k] - logits[k]).abs().max()) for k in logits)}
    heads = {name: list(v.shape) for name, v in logits.items()}
    results.update(encoder=config.encoder, parameters=model.num_parameters(), heads=heads,
                   timings_s={k: round(v, 3) for k, v in timings.items()})
    (out_dir / "demo.json").write_text(json.dumps(results, indent=2))
    _write_index(out_dir, results)
    for stage, t in timings.items():
        print(f"  {stage:<16} {t:7.2f} s")
    print(f"model: {config.encoder}, {results['parameters']:,} parameters; heads: "
          + ", ".join(f"{k} {'x'.join(map(str, v[1:]))}" for k, v in heads.items()))
    print(f"save -> reload max |diff| = {results['reload_max_abs_diff']:.3g}; outputs in {out_dir}/")
    return results


def _write_index(out_dir: Path, results: dict) -> None:
    rows = "\n".join(f"| `{name}` | {' x '.join(map(str, shape))} |" for name, shape in results["heads"].items())
    times = "\n".join(f"| {k} | {v:.2f} |" for k, v in results["timings_s"].items())
    (out_dir / "index.md").write_text(
        f"# Cerberus demo\n\nEncoder `{results['encoder']}`, {results['parameters']:,} parameters, random weights.\n\n"
        f"| head | logits shape |\n|---|---|\n{rows}\n\n| stage | seconds |\n|---|---|\n{times}\n\n"
        f"Saved to `model/` and reloaded: max |difference| of logits = {results['reload_max_abs_diff']:.3g}.\n"
        "Files: [model/model.yaml](model/model.yaml), [model/weights.pt](model/weights.pt), [demo.json](demo.json)\n"
    )
