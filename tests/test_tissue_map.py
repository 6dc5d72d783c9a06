"""The dense tissue map's geometry on a network whose output is known, and the mosaics its head is trained on.

The *colour network* has an encoder whose deepest feature is the mean RGB of each ``cell`` x ``cell`` block of the
window (as a stride-``cell`` encoder's cells) and a patch head rigged to a fixed linear rule, so every cell's
probabilities can be computed in NumPy: cell means on the network's cell grid (white outside the image), the
head's ``k x k`` neighbourhood mean over the cells inside the image (weighted by their share inside), the rule,
softmax, then the network cells spread onto the image's cell grid by overlap. The engine must give exactly that,
whatever the windows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cerberus_histo import Cerberus, ModelConfig
from cerberus_histo.infer.engine import Predictor
from cerberus_histo.infer.tiling import Geometry
from cerberus_histo.io.readers import ArrayReader
from cerberus_histo.models.decoders import ClassHead
from cerberus_histo.tasks import TISSUE
from cerberus_histo.train.losses import class_ce
from cerberus_histo.train.module import class_mosaic

#: logits = RULE @ mean rgb (0-1) + BIAS: class 0 (background) for white, 1/2/3 for red/green/blue, the rest never
RULE = np.array([[0.4, 0.4, 0.4], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]] + [[0, 0, 0]] * 5, np.float32)
BIAS = np.array([-0.5, 0, 0, 0] + [-3] * 5, np.float32)


class ColourEncoder(nn.Module):
    """Deepest feature: the mean colour of each ``cell`` x ``cell`` block; the shallower ones are unused."""

    def __init__(self, cell: int):
        super().__init__()
        self.cell = cell
        self.channels = (3, 3, 3, 3, 3)
        self.strides = (1, 2, 4, 8, cell)

    def forward(self, x):
        return [x, x, x, x, F.avg_pool2d(x, self.cell, ceil_mode=True)]  # a partial last cell, as conv strides


def colour_model(cell: int, class_patch: int) -> Cerberus:
    model = Cerberus(ModelConfig((TISSUE,), encoder="tiny", class_patch_shape=class_patch))
    model.encoder = ColourEncoder(cell)
    head = ClassHead(3, 9, hidden=3, pool_cells=9)
    with torch.no_grad():
        for bn in (head.bn1, head.bn2):  # identities in eval mode
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)
        head.conv1.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        head.conv1.bias.zero_()
        head.conv2.weight.copy_(torch.from_numpy(RULE).view(9, 3, 1, 1))
        head.conv2.bias.copy_(torch.from_numpy(BIAS))
    model.heads["tissue-class"] = head
    return model.eval()


def expected_map(image: np.ndarray, cell: int, k: int, margin: int) -> np.ndarray:
    """What the engine must give (9 x cells x cells), computed without the network."""
    h, w = image.shape[:2]
    off = -(margin % cell) if margin % cell else 0  # the network's cells start here (window origins: -margin + k*out)
    pad = (k + 2) * cell
    canvas = np.full((h + 2 * pad, w + 2 * pad, 4), 255, np.float32)
    canvas[pad:pad + h, pad:pad + w, :3] = image
    canvas[..., 3] = 0
    canvas[pad:pad + h, pad:pad + w, 3] = 255  # the 4th channel: inside the image
    n_y, n_x = math.ceil(h / cell) + 2, math.ceil(w / cell) + 2  # network cells covering the image, one more each side
    y0, x0 = pad + off - cell, pad + off - cell
    blocks = canvas[y0:y0 + n_y * cell, x0:x0 + n_x * cell] / 255
    means = blocks.reshape(n_y, cell, n_x, cell, 4).mean((1, 3))
    padded = np.pad(means, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), constant_values=1.0)  # white, outside
    padded[:k // 2, :, 3] = padded[-(k // 2) or len(padded):, :, 3] = 0
    padded[:, :k // 2, 3] = padded[:, -(k // 2) or padded.shape[1]:, 3] = 0

    def pool(block):  # the neighbourhood's mean, weighted by the share of each cell inside the image
        wgt = block[..., 3:]
        return (block[..., :3] * wgt).sum((0, 1)) / wgt.sum() if wgt.sum() > 0 else block[..., :3].mean((0, 1))

    pooled = np.stack([[pool(padded[i:i + k, j:j + k]) for j in range(n_x)] for i in range(n_y)])
    logits = np.maximum(pooled, 0) @ RULE.T + BIAS
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)

    def spread(n_img: int, n_net: int) -> np.ndarray:  # weight of network cell j in image cell m
        wgt = np.zeros((n_img, n_net), np.float32)
        for m in range(n_img):
            for j in range(n_net):
                lo, hi = off - cell + j * cell, off + j * cell
                wgt[m, j] = max(0, min(hi, (m + 1) * cell) - max(lo, m * cell)) / cell
        return wgt

    wy, wx = spread(math.ceil(h / cell), n_y), spread(math.ceil(w / cell), n_x)
    return np.einsum("my,yxc,nx->cmn", wy, probs, wx)


def _picture(h: int, w: int) -> np.ndarray:
    """Red, green and blue regions with borders off the cell grid, some white, on an image that is not a whole
    number of cells."""
    img = np.full((h, w, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    img[xx < 0.45 * w] = (220, 30, 40)
    img[(xx >= 0.45 * w) & (yy < 0.6 * h)] = (30, 200, 50)
    img[(yy - 0.75 * h) ** 2 + (xx - 0.7 * w) ** 2 < (0.15 * h) ** 2] = (40, 40, 230)
    return img


@pytest.mark.parametrize("cell", [16, 32])
@pytest.mark.parametrize("k_px", [16, 48, 144])  # the class patch: 1, 3 and 9 (or 5) cells pooled
def test_the_dense_tissue_map_is_the_patch_rule_on_the_cell_grid(cell, k_px):
    model = colour_model(cell, k_px)
    image = _picture(203, 270)
    k = min(math.ceil(k_px / cell), 9)
    many = Geometry(2 * cell + 2 * 160, 2 * cell, fit=False, align=cell)  # 4 x 5 windows, margin 160
    for geometry in (None, many):  # the default (one window, margin 152: network cells off the image's grid)
        p = Predictor(model, geometry, heads=["tissue-class"], precision="fp32")
        pred = p.predict_region(ArrayReader(image, 0.5))
        assert pred.windows == (1 if geometry is None else math.ceil(203 / (2 * cell)) * math.ceil(270 / (2 * cell)))
        got = pred.probs["tissue-class"]
        assert got.shape == (9, math.ceil(203 / cell), math.ceil(270 / cell))
        np.testing.assert_allclose(got, expected_map(image, cell, k, p.geometry.margin), atol=1e-5)


def test_the_map_is_aligned_with_the_image_and_white_outside_it():
    """One-cell pooling at cell 16 with a margin of 16 (no half-cell offset): each map cell is its own 16 x 16
    block of the image, and the last, partial column is read with white beyond the image."""
    model = colour_model(16, 16)
    image = np.full((48, 76, 3), 255, np.uint8)
    image[:, 20:] = (255, 0, 0)   # red from x = 20: column 1 is 12/16 red (red wins), columns 2.. red
    image[16:, 64:] = (0, 255, 0)  # green in the last column (12 px of image, 4 of white) from row 1
    pred = Predictor(model, Geometry(64, 32, fit=False, align=16), heads=["tissue-class"],
                     precision="fp32").predict_region(
        ArrayReader(image, 0.5))
    np.testing.assert_array_equal(pred.probs["tissue-class"].argmax(0), [[0, 1, 1, 1, 1], [0, 1, 1, 1, 2],
                                                                         [0, 1, 1, 1, 2]])
    np.testing.assert_allclose(pred.probs["tissue-class"], expected_map(image, 16, 1, 16), atol=1e-5)
    image[:, 72:] = (0, 255, 0)  # 8 px of green and 8 of white: background (white) wins the last column
    pred = Predictor(model, Geometry(64, 32, fit=False, align=16), heads=["tissue-class"],
                     precision="fp32").predict_region(
        ArrayReader(image[:, :72], 0.5))
    assert (pred.probs["tissue-class"].argmax(0)[:, 4] == 0).all()


def test_what_lies_outside_the_image_does_not_vote():
    """A red image pooled over 3 x 3 cells: its corner cell's neighbourhood is 5/9 outside (white), yet red; a
    white cell inside the image still votes (background next to the red)."""
    model = colour_model(16, 48)
    image = np.full((48, 64, 3), 255, np.uint8)
    image[:, :32] = (255, 0, 0)
    pred = Predictor(model, Geometry(64, 32, fit=False, align=16), heads=["tissue-class"],
                     precision="fp32").predict_region(
        ArrayReader(image, 0.5))
    np.testing.assert_array_equal(pred.probs["tissue-class"].argmax(0), [[1, 1, 0, 0]] * 3)
    np.testing.assert_allclose(pred.probs["tissue-class"], expected_map(image, 16, 3, 16), atol=1e-5)


def test_tissue_patches_train_as_mosaics_labelled_cell_by_cell():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 48, 48).clone()
    batch = {"image": images, "target/tissue-class": torch.tensor([4, 1, 2, 3, 0]),
             "has/tissue-class": torch.ones(5, dtype=torch.bool)}
    m = class_mosaic(batch, ["tissue-class"], 2, 32)
    assert m["image"].shape == (2, 3, 96, 96)
    assert m["image"][0, 0, 0, 0] == 0 and m["image"][0, 0, 0, 95] == 1 and m["image"][0, 0, 95, 0] == 2
    assert m["image"][1, 0, 0, 0] == 4 and m["image"][1, 0, 0, 95] == 0  # the last mosaic filled from the start
    # cells of 32 px, centres at 16, 48, 80: patch rows/columns 0, 1, 1
    np.testing.assert_array_equal(m["target/tissue-class"][0], [[4, 1, 1], [2, 3, 3], [2, 3, 3]])
    np.testing.assert_array_equal(m["target/tissue-class"][1], [[0, 4, 4], [1, 2, 2], [1, 2, 2]])
    logits = torch.zeros(2, 9, 3, 3)
    logits[:, 4] = 10.0
    loss = class_ce(logits, m["target/tissue-class"], m["has/tissue-class"])
    per_cell = F.cross_entropy(logits, m["target/tissue-class"], reduction="none")
    torch.testing.assert_close(loss, per_cell.mean())


def test_batchnorm_statistics_are_measured_afresh_as_inference_runs_the_heads():
    from cerberus_histo.train.module import calibrate_batchnorm

    torch.manual_seed(0)
    model = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, class_patch_shape=48)).eval()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    head_bn = model.heads["tissue-class"].bn1
    for m in (bn, head_bn):
        m.running_mean.fill_(100.0)  # training's running averages, gone astray
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    seen, sizes = [], []
    bn.register_forward_hook(lambda m, i, o: seen.append(i[0].mean((0, 2, 3))))
    model.encoder.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    gen = torch.Generator().manual_seed(1)
    seg = [{"image": torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)} for _ in range(3)]
    calibrate_batchnorm(model, seg)
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0))  # the plain mean over the batches
    assert not model.training and (head_bn.running_mean.abs() < 100).all()  # the tissue head measured densely too
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    patches = {"image": torch.randint(0, 256, (9, 3, 48, 48), generator=gen, dtype=torch.uint8),
               "target/tissue-class": torch.arange(9), "has/tissue-class": torch.ones(9, dtype=torch.bool)}
    for h in ("gland-inst", "nuclei-inst"):
        patches[f"target/{h}"] = torch.zeros(9, 48, 48, dtype=torch.long)
        patches[f"has/{h}"] = torch.zeros(9, dtype=torch.bool)
    sizes.clear()
    calibrate_batchnorm(model, [patches], mosaic=3)
    assert sizes == [(144, 144)]  # tissue patches measured as the mosaics they train as
