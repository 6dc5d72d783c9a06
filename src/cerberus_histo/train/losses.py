"""Multi-task losses with masked means, so that samples without a task's labels add nothing to it.

A batch is a dict: ``image`` (N x 3 x H x W) and, per head present, ``target/{head}`` (N x H x W class map
for ``inst``/``type`` heads, N for ``class`` heads), ``has/{head}`` (N booleans: which samples carry labels)
and for ``inst`` heads optionally ``weight/{head}`` (N x H x W separation weights, 1 where absent); optionally
``labelled`` (N x H x W, 1 where the pixel is labelled, 0 outside the annotated region of a partly annotated
image; all ones where absent).

Per head (the original Cerberus's losses, spec §3, with its broadcasting accident made explicit):

- ``inst``: cross-entropy times the separation weight map, mean over the labelled pixels of each sample, then
  the masked mean over samples ``sum(loss * has) / (sum(has) + 1e-8)``, where a sample without any labelled
  pixel counts as unlabelled (``has`` False);
- ``type``: class-weighted cross-entropy (pixel weight = the class weight of its label; background, label 0,
  weight 0, so only object pixels count), mean over the labelled pixels, masked mean over samples; plus soft
  Dice inside the objects of the labelled pixels, summed over the non-background classes:
  ``sum_c 1 - (2 I_c + s) / (P_c + T_c + s)``, ``s = 1e-3``, over the labelled samples;
- ``class``: cross-entropy, masked mean over samples (of the mean over cells, for mosaics trained densely).

The total is ``sum_head loss_weight * (ce_weight * CE + dice_weight * Dice)``. Pixels outside ``labelled`` add
nothing to any term nor to its gradient; with ``labelled`` all ones every term is exactly what it is without it
(the mean over the labelled pixels is computed as the mean over all pixels times ``pixels / labelled pixels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig

EPS = 1e-8
DICE_SMOOTH = 1e-3


def masked_mean(per_sample: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    has = has.to(per_sample.dtype)
    return (per_sample * has).sum() / (has.sum() + EPS)


def labelled_mean(pixel_loss: torch.Tensor, has: torch.Tensor, labelled: torch.Tensor | None = None):
    """Masked mean over samples of each sample's mean over its labelled pixels (``N x H x W`` losses; ``labelled``
    ``N x H x W``, > 0 = labelled, or None: all). A sample without a labelled pixel counts as ``has`` False."""
    if labelled is None:
        return masked_mean(pixel_loss.flatten(1).mean(1), has)
    inside = (labelled > 0).flatten(1)
    count = inside.sum(1)
    # mean over all pixels times pixels / labelled pixels: exactly the plain mean when every pixel is labelled
    per_sample = (pixel_loss.flatten(1) * inside.to(pixel_loss.dtype)).mean(1)
    per_sample = per_sample * (inside.shape[1] / count.clamp(min=1).to(pixel_loss.dtype))
    return masked_mean(per_sample, has.bool() & (count > 0))


def inst_ce(logits: torch.Tensor, target: torch.Tensor, has: torch.Tensor, weight: torch.Tensor | None = None,
            labelled: torch.Tensor | None = None):
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if weight is not None:
        ce = ce * weight
    return labelled_mean(ce, has, labelled)


def type_ce(logits: torch.Tensor, target: torch.Tensor, has: torch.Tensor, class_weights: torch.Tensor,
            labelled: torch.Tensor | None = None):
    target = target.long()
    ce = F.cross_entropy(logits.float(), target, reduction="none") * class_weights.to(logits.device)[target]
    return labelled_mean(ce, has, labelled)


def type_dice(logits: torch.Tensor, target: torch.Tensor, has: torch.Tensor,
              labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice over non-background classes, inside objects of labelled samples (and labelled pixels), summed
    over classes."""
    n_cls = logits.shape[1]
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), n_cls).permute(0, 3, 1, 2).to(prob.dtype)
    inside = (target > 0) & has.view(-1, 1, 1)
    if labelled is not None:
        inside = inside & (labelled > 0)
    mask = inside.unsqueeze(1).to(prob.dtype)
    prob, onehot = (prob * mask)[:, 1:], (onehot * mask)[:, 1:]
    inter = (prob * onehot).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return (1 - (2 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)).sum()


def class_ce(logits: torch.Tensor, target: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Per patch (``N x C`` logits, ``N`` targets) or per cell (``N x C x h x w``, ``N x h x w``: mosaics)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return masked_mean(ce.flatten(1).mean(1) if ce.ndim > 1 else ce, has)


def multitask_loss(config: ModelConfig, logits: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the losses of the heads in ``logits`` (see the module docstring) and each term."""
    total = None
    parts: dict[str, torch.Tensor] = {}
    labelled = batch.get("labelled")  # the dense heads' labelled pixels (patch heads: whole patches)
    for name, out in logits.items():
        task, head = config.head(name)
        target, has = batch[f"target/{name}"], batch[f"has/{name}"]
        if head.kind == "inst":
            loss = head.ce_weight * inst_ce(out, target, has, batch.get(f"weight/{name}"), labelled)
            parts[f"{name}/ce"] = loss
        elif head.kind == "type":
            weights = torch.tensor(task.class_weights or [0.0] + [1.0] * (out.shape[1] - 1), dtype=torch.float32)
            ce = type_ce(out, target, has, weights, labelled)
            parts[f"{name}/ce"] = ce
            loss = head.ce_weight * ce
            if head.dice_weight:
                dice = type_dice(out, target, has, labelled)
                parts[f"{name}/dice"] = dice
                loss = loss + head.dice_weight * dice
        else:
            loss = head.ce_weight * class_ce(out, target, has)
            parts[f"{name}/ce"] = loss
        loss = head.loss_weight * loss
        parts[name] = loss
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("no head in the batch: nothing to train")
    return total, parts
