"""Why a tissue map is right or wrong: one trained model's dense tissue accuracy against its patch accuracy, under
each factor that separates the two.

On fresh synthetic tiles (448 px, 1-3 tissue regions, seeds 50000+) and fresh patches (144 px, 20 per class, seeds
90000+), with the model given (``demo-output/train/model`` after ``make demo``):

* **patch accuracy**: the patch head on 144-px patches, as trained (``Cerberus.classify_patches``);
* **engine**: the dense map as inference makes it (``predict_tile``), and its accuracy by distance to the tile's
  edge and to the nearest boundary between tissue regions;
* **pooling neighbourhood** ``k`` (cells averaged around each cell before the head), with what lies outside the
  image pooled as white, or left out of the average (what the engine does);
* **window padding**: white (the engine's rule) against mirrored tissue;
* **BatchNorm statistics**: re-estimated on 256-px tiles instead of the training mix;
* **per patch**: the patch head on the 144-px patch around every cell, and the original's way (the patch head
  on the 448-px window of every 144-px output block, one class per block);
* **cell size**: the best any map of cells can do (each cell the true majority class of its pixels).

    python benchmarks/tissue_map.py --model demo-output/train/model
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from cerberus_histo import Cerberus
from cerberus_histo.data.synthetic import synth_patch, synth_tile

HEAD = "tissue-class"
SIZE = 448


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("demo-output/train/model"))
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Cerberus.load(args.model).eval()
    head = model.heads[HEAD]
    cell = int(model.encoder.strides[-1])
    k0 = min(-(-model.config.class_patch_shape // cell), model.config.class_pool_cells or 99)
    tiles = [synth_tile(SIZE, seed=50_000 + i) for i in range(args.tiles)]
    n = -(-SIZE // cell)
    t0 = time.perf_counter()
    print(f"model {args.model}: cell {cell} px, class patch {model.config.class_patch_shape} px = {k0} cells pooled; "
          f"{args.tiles} tiles of {SIZE} px, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")

    patches = np.stack([synth_patch(c, 144, seed=s) for c in range(9) for s in range(90_000, 90_020)])
    truth = np.repeat(np.arange(9), 20)

    def patch_accuracy() -> float:
        return float((model.classify_patches(patches).argmax(1) == truth).mean())

    def score(name: str, maps: list[np.ndarray]) -> None:
        acc, interior = [], []
        for t, m in zip(tiles, maps, strict=True):
            full = np.repeat(np.repeat(m, cell, 0), cell, 1)[:SIZE, :SIZE] == t.tissue
            acc.append(full.mean())
            far = ndi.distance_transform_edt(ndi.morphological_gradient(t.tissue, size=3) == 0) > 80
            far[:80], far[-80:], far[:, :80], far[:, -80:] = False, False, False, False
            if far.any():
                interior.append(full[far].mean())
        print(f"  {name:<58} {np.mean(acc):.3f}   {np.mean(interior):.3f}")

    @torch.no_grad()
    def dense(k: int, pad_mode: str = "white", leave_out: bool = False) -> list[np.ndarray]:
        out, pad = [], (k0 + 1) * cell
        for t in tiles:
            if pad_mode == "white":
                x = np.pad(t.image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
            else:
                x = np.pad(t.image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
            f = model.encoder(model.normalise(torch.from_numpy(x[None]).permute(0, 3, 1, 2)))[4]
            p = pad // cell
            inside = None
            if leave_out:  # the engine's rule: cells outside the image do not vote
                inside = torch.zeros(1, 1, *f.shape[-2:])
                inside[..., p:p + n, p:p + n] = 1
            out.append(head.dense(f, k, inside).argmax(1)[0].numpy()[p:p + n, p:p + n])
        return out

    @torch.no_grad()
    def per_patch() -> list[np.ndarray]:
        out, half = [], 72
        for t in tiles:
            x = np.pad(t.image, ((half, half + cell), (half, half + cell), (0, 0)), constant_values=255)
            crops = [x[i * cell + cell // 2:i * cell + cell // 2 + 144, j * cell + cell // 2:j * cell + cell // 2 + 144]
                     for i in range(n) for j in range(n)]
            out.append(model.classify_patches(np.stack(crops)).argmax(1).reshape(n, n))
        return out

    @torch.no_grad()
    def original() -> list[np.ndarray]:
        out, nb = [], -(-SIZE // 144)
        for t in tiles:
            x = np.pad(t.image, ((152, 152 + 144), (152, 152 + 144), (0, 0)), constant_values=255)
            wins = np.stack([x[i * 144:i * 144 + 448, j * 144:j * 144 + 448] for i in range(nb) for j in range(nb)])
            f = model.encoder(model.normalise(torch.from_numpy(wins).permute(0, 3, 1, 2)))[4]
            c = (f.shape[-1] - k0) // 2  # the centre k0 cells: the 144-px output block
            blocks = head(f[..., c:c + k0, c:c + k0]).argmax(1).numpy().reshape(nb, nb)
            full = np.repeat(np.repeat(blocks, 144, 0), 144, 1)
            out.append(full[cell // 2::cell, cell // 2::cell][:n, :n])
        return out

    from cerberus_histo.infer.tiles import predict_tile

    engine = [predict_tile(model, t.image).results["tissue"].class_map for t in tiles]
    right = model.classify_patches(patches).argmax(1) == truth
    recall = np.array([right[truth == c].mean() for c in range(9)])
    share = np.bincount(np.concatenate([t.tissue.ravel() for t in tiles]), minlength=9) / (len(tiles) * SIZE * SIZE)
    print(f"\npatch accuracy (180 held-out 144-px patches, 20 per class): {right.mean():.3f}; weighted by the tiles' "
          f"class mix (each class's patch recall x its share of the tiles' pixels): {float(recall @ share):.3f}")
    print("  patch recall by class: " + ", ".join(f"{model.config.task('tissue').class_names[c]} {recall[c]:.2f} "
                                                f"({share[c]:.0%} of tile pixels)" for c in range(9)) + "\n")
    print(f"  {'dense tissue map, pixel accuracy on tiles':<58} {'all':>5}   interior (> 80 px from any edge)")
    score("engine (predict_tile)", engine)
    for k in sorted({1, 3, k0, 7, 9}):
        score(f"k = {k} cells, outside pooled as white", dense(k))
        score(f"k = {k} cells, outside left out of the average", dense(k, leave_out=True))
    score(f"k = {k0}, mirrored padding instead of white", dense(k0, "reflect"))
    score("the patch head on the 144-px patch around each cell", per_patch())
    score("the original: patch head per 144-px output block", original())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(16):
            model(torch.from_numpy(np.stack([synth_tile(256, seed=70_000 + 4 * i + j).image for j in range(4)]))
                  .permute(0, 3, 1, 2))
    model.eval()
    score(f"k = {k0}, BatchNorm statistics re-estimated on 256-px tiles", dense(k0, leave_out=True))
    print(f"  (patch accuracy with those statistics: {patch_accuracy():.3f})")
    model.load_state_dict(state)

    edges = [0, cell, 2 * cell, 3 * cell, 4 * cell, SIZE]
    ok, tot = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    bounds = [0, 32, 64, 128, 10**6]
    okb, totb = np.zeros(len(bounds) - 1), np.zeros(len(bounds) - 1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    d_edge = np.minimum(np.minimum(yy, SIZE - 1 - yy), np.minimum(xx, SIZE - 1 - xx))
    for t, m in zip(tiles, engine, strict=True):
        right = np.repeat(np.repeat(m, cell, 0), cell, 1)[:SIZE, :SIZE] == t.tissue
        d_region = ndi.distance_transform_edt(ndi.morphological_gradient(t.tissue, size=3) == 0)
        for i in range(len(edges) - 1):
            sel = (d_edge >= edges[i]) & (d_edge < edges[i + 1])
            ok[i], tot[i] = ok[i] + right[sel].sum(), tot[i] + sel.sum()
        for i in range(len(bounds) - 1):
            sel = (d_region >= bounds[i]) & (d_region < bounds[i + 1]) & (d_edge >= 4 * cell)
            okb[i], totb[i] = okb[i] + right[sel].sum(), totb[i] + sel.sum()
    print("\nengine map, pixel accuracy by distance to the tile's edge (px):")
    print("  " + "  ".join(f"[{a}, {b}): {o / max(n_, 1):.3f} ({n_ / tot.sum():.0%})"
                           for a, b, o, n_ in zip(edges[:-1], edges[1:], ok, tot, strict=True)))
    print(f"by distance to the nearest tissue-region boundary (px; pixels >= {4 * cell} px from the tile's edge):")
    print("  " + "  ".join(f"[{a}, {b if b < 10**6 else 'inf'}): {o / max(n_, 1):.3f} ({n_ / totb.sum():.0%})"
                           for a, b, o, n_ in zip(bounds[:-1], bounds[1:], okb, totb, strict=True)))
    print("the ceiling of a map of cells (each cell given the true majority class of its pixels), by cell size:")
    ceil = {}
    for c in (8, 16, 32, 64, 144):
        right = []
        for t in tiles:
            m = -(-SIZE // c)
            pad = np.pad(t.tissue, ((0, m * c - SIZE), (0, m * c - SIZE)), mode="edge")
            counts = np.stack([(pad == k).reshape(m, c, m, c).sum((1, 3)) for k in range(9)])
            best = np.repeat(np.repeat(counts.argmax(0), c, 0), c, 1)[:SIZE, :SIZE]
            right.append((best == t.tissue).mean())
        ceil[c] = np.mean(right)
    print("  " + "  ".join(f"{c} px: {v:.3f}" for c, v in ceil.items()))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
