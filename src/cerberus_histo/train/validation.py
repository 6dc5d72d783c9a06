"""Validation statistics of a training run (NumPy; no torch): pixel Dice and PQ per instance head, type F1
and tissue accuracy, accumulated over batches of softmax probabilities.

Only samples that carry a head's labels count for it, and of a partly labelled sample (``labelled``: the labelled
region of its dataset) only the labelled pixels: predictions and truth outside are left out of every statistic.
Instances come from the same post-processing as inference (:func:`~cerberus_histo.postproc.postprocess`), so the PQ
is the one users will see.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..metrics.instance import PQResult, pq
from ..postproc import postprocess


class ValidationStats:
    """Accumulates per-head statistics; :meth:`summary` gives ``{metric name: value}`` and a ``score``."""

    def __init__(self, config: ModelConfig, mpp: float | None = None):
        self.config = config
        self.mpp = mpp or config.mpp
        self.reset()

    def reset(self) -> None:
        self.pq: dict[str, PQResult] = {}
        self.dice: dict[str, np.ndarray] = {}   # head -> [intersection, total]
        self.confusion: dict[str, np.ndarray] = {}
        self.correct: dict[str, np.ndarray] = {}  # head -> [correct, count]

    def update(self, probs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        """``probs``: head -> N x C x H x W (dense) or N x C (class) softmax; ``batch``: the numpy batch."""
        n = len(batch["image"])
        for i in range(n):
            labelled = {h: p[i] for h, p in probs.items() if bool(batch[f"has/{h}"][i])}
            dense = {h: p for h, p in labelled.items() if p.ndim == 3}
            results = postprocess(dense, self.mpp) if any(h.endswith("-inst") for h in dense) else {}
            region = None  # the labelled pixels of a partly labelled sample (None: all)
            if "labelled" in batch and not np.asarray(batch["labelled"][i]).all():
                region = np.asarray(batch["labelled"][i]) > 0.5
            for head, p in labelled.items():
                task, spec = self.config.head(head)
                target = np.asarray(batch[f"target/{head}"][i])
                if region is not None and spec.kind != "class":
                    target = np.where(region, target, 0)
                if spec.kind == "class":
                    c = self.correct.setdefault(head, np.zeros(2))
                    c += (int(np.argmax(p)) == int(target), 1)
                elif spec.kind == "inst":
                    pred_fg, true_fg = np.argmax(p, 0) > 0, target > 0
                    if region is not None:
                        pred_fg &= region
                    d = self.dice.setdefault(head, np.zeros(2))
                    d += (2 * np.count_nonzero(pred_fg & true_fg), np.count_nonzero(pred_fg) + np.count_nonzero(true_fg))
                    if task.name in results and f"inst/{head}" in batch:
                        true_inst, pred_inst = np.asarray(batch[f"inst/{head}"][i]), results[task.name].inst_map
                        if region is not None:
                            true_inst, pred_inst = np.where(region, true_inst, 0), np.where(region, pred_inst, 0)
                        r = pq(true_inst, pred_inst)
                        self.pq[head] = self.pq[head] + r if head in self.pq else r
                else:  # type: per-pixel classes inside the true objects
                    k = p.shape[0]
                    inside = target > 0
                    pred = np.argmax(p, 0)[inside]
                    cm = self.confusion.setdefault(head, np.zeros((k, k), np.int64))
                    np.add.at(cm, (target[inside].astype(np.int64), pred.astype(np.int64)), 1)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for head, (inter, total) in self.dice.items():
            out[f"{head}/dice"] = float(inter / total) if total else float("nan")
        for head, r in self.pq.items():
            out[f"{head}/pq"] = float(r.pq) if not r.empty else float("nan")
        for head, cm in self.confusion.items():
            out[f"{head}/f1"] = macro_f1(cm)
        for head, (correct, count) in self.correct.items():
            out[f"{head}/accuracy"] = float(correct / count) if count else float("nan")
        main = [v for k, v in out.items() if k.endswith(("/pq", "/f1", "/accuracy")) and np.isfinite(v)]
        out["score"] = float(np.mean(main)) if main else 0.0
        return out


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the non-background classes that occur in the truth or the predictions."""
    cm = np.asarray(confusion, np.float64)[1:, 1:] if len(confusion) > 1 else np.asarray(confusion, np.float64)
    tp = np.diag(cm)
    true, pred = cm.sum(1) + np.asarray(confusion)[1:, 0], cm.sum(0) + np.asarray(confusion)[0, 1:]
    present = (true + pred) > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp[present] / (true[present] + pred[present])
    return float(f1.mean())
