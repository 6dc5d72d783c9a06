"""Batch composition as in the paper: segmentation and classification super-tasks, mixed-target batches.

Indices refer to the concatenation of the segmentation datasets (in order) followed by the classification
dataset. Each batch is one super-task, drawn with probability ``p_seg`` (0.7) for segmentation, so 144-px
classification samples never share a batch with 448-px segmentation samples. A segmentation batch is either
*mixed* (sample i from dataset i mod n, so every dataset is in every batch) or *single-task* (whole batches
from one dataset, taking the datasets in turn). Every dataset is read through its own reshuffled stream, so
smaller datasets are cycled.

The super-task of step ``t`` is the same on every rank (so all ranks of a distributed run train the same
heads at each step); the samples differ by rank. The sampler is deterministic given ``seed`` and ``rank``
and keeps its position in a small state dict, so a
resumed run draws exactly the batches the interrupted run would have drawn. No torch needed.
"""

from __future__ import annotations

import numpy as np


class TaskBatchSampler:
    """Yields lists of dataset indices (or ``(index, augmentation seed)`` pairs with ``with_seeds``);
    ``len()`` is ``num_batches`` per pass (an "epoch" of steps)."""

    def __init__(self, seg_sizes: list[int], class_size: int = 0, batch_size: int = 8,
                 class_batch_size: int | None = None, p_seg: float = 0.7, mix: bool = True, seed: int = 0,
                 rank: int = 0, num_batches: int = 1000, with_seeds: bool = False):
        if not seg_sizes and not class_size:
            raise ValueError("no data: give at least one segmentation or classification dataset")
        if any(n < 1 for n in seg_sizes):
            raise ValueError(f"every segmentation dataset needs samples, got sizes {seg_sizes}")
        if not 0 <= p_seg <= 1 or batch_size < 1:
            raise ValueError("p_seg must be in [0, 1] and batch_size >= 1")
        self.seg_sizes, self.class_size = list(seg_sizes), int(class_size)
        self.batch_size, self.class_batch_size = batch_size, class_batch_size or batch_size
        self.p_seg = p_seg if seg_sizes and class_size else (1.0 if seg_sizes else 0.0)
        self.mix, self.seed, self.rank, self.num_batches = mix, seed, rank, num_batches
        self.with_seeds = with_seeds
        self.offsets = np.cumsum([0] + self.seg_sizes).tolist()
        self.step = 0
        self.seg_batches = 0
        self.drawn = [0] * (len(self.seg_sizes) + (1 if class_size else 0))
        self._perms: dict[int, tuple] = {}

    # ---- streams -------------------------------------------------------------------------------------
    def _sizes(self) -> list[int]:
        return self.seg_sizes + ([self.class_size] if self.class_size else [])

    def _draw(self, d: int) -> int:
        """The next index (global) of dataset ``d``, from its reshuffled stream."""
        size = self._sizes()[d]
        k = self.drawn[d]
        self.drawn[d] += 1
        key = (d, k // size)
        perm = self._perms.get(d)
        if perm is None or perm[0] != key:  # one permutation per pass over the dataset, cached
            perm = self._perms[d] = (key, np.random.default_rng([self.seed, self.rank, d, k // size]).permutation(size))
        perm = perm[1]
        return int(perm[k % size] + (self.offsets[d] if d < len(self.seg_sizes) else self.offsets[-1]))

    def next_batch(self) -> list[int]:
        coin = np.random.default_rng([self.seed, 10**6, self.step]).random()  # the same on every rank
        self.step += 1
        if coin >= self.p_seg:  # classification super-task
            return [self._draw(len(self.seg_sizes)) for _ in range(self.class_batch_size)]
        n = len(self.seg_sizes)
        if self.mix:
            batch = [self._draw(i % n) for i in range(self.batch_size)]
        else:
            batch = [self._draw(self.seg_batches % n) for _ in range(self.batch_size)]
        self.seg_batches += 1
        return batch

    def __iter__(self):
        for _ in range(self.num_batches):
            batch = self.next_batch()
            if self.with_seeds:  # an augmentation seed per drawn sample: (index, seed) keys
                seeds = np.random.default_rng([self.seed, self.rank, 2 * 10**6, self.step]).integers(0, 2**31, len(batch))
                batch = list(zip(batch, seeds.tolist(), strict=True))
            yield batch

    def __len__(self) -> int:
        return self.num_batches

    # ---- exact resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "seg_batches": self.seg_batches, "drawn": list(self.drawn)}

    def state_at(self, step: int) -> dict:
        """The state after ``step`` batches, by replaying the draws (cheap: no data is read). A run's
        checkpoint stores this for its global step, since a data loader may have drawn batches ahead."""
        replay = getattr(self, "_replay", None)
        if replay is None or replay.step > step:  # kept between calls: checkpoints only move forward
            replay = self._replay = TaskBatchSampler(self.seg_sizes, self.class_size, self.batch_size,
                                                     self.class_batch_size, self.p_seg, self.mix, self.seed, self.rank)
        while replay.step < step:
            replay.next_batch()
        return replay.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if len(state["drawn"]) != len(self.drawn):
            raise ValueError("the sampler state belongs to another set of datasets")
        self.step, self.seg_batches, self.drawn = int(state["step"]), int(state["seg_batches"]), list(state["drawn"])
