"""Typed results of inference (no torch, so post-processing workers can receive them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..postproc import Instances, TaskResult


@dataclass
class RegionPrediction:
    """Softmax probabilities of one region, as :meth:`~cerberus_histo.infer.engine.Predictor.predict_region`
    returns them.

    Attributes:
        probs: head name -> ``C x H x W`` (dense heads, region pixels) or ``C x h x w`` (``class`` heads, one
            value per ``cell`` x ``cell`` block; block ``(i, j)`` covers region pixels ``[i * cell, (i + 1) *
            cell) x [j * cell, (j + 1) * cell)``, so the last block may reach past the region).
        region: ``(x, y, width, height)`` in model-resolution pixels of the image.
        mpp: the model's resolution (µm/px), the resolution of ``probs``.
        cell: model pixels per value of the ``class`` maps (the encoder's overall stride).
        windows: network windows run (test-time flips not counted).
        reused: windows whose outputs came from a window cache (run before for another region), not run.
        timings: seconds spent reading (``read``), in the network incl. softmax and transfer (``forward``) and
            writing the crops into the maps (``stitch``, in a thread while the network runs the next batch).
    """

    probs: dict[str, np.ndarray]
    region: tuple[int, int, int, int]
    mpp: float
    cell: int
    windows: int
    timings: dict[str, float] = field(default_factory=dict)
    reused: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the region in model pixels."""
        return self.region[3], self.region[2]


@dataclass
class TilePrediction:
    """Everything predicted for one image (:meth:`~cerberus_histo.models.net.Cerberus.predict_tile`).

    Attributes:
        results: task -> :class:`~cerberus_histo.postproc.TaskResult`: instance maps, instance records (ids,
            boxes, centroids, contours, areas, types) and type maps for ``gland``/``lumen``/``nuclei``; the
            tissue ``class_map``/``class_prob`` (one value per ``cell`` x ``cell`` model pixels) for ``tissue``.
            All in model-resolution pixels.
        mpp: the model's resolution (µm/px): the maps' resolution.
        shape: (height, width) of the instance maps (model pixels).
        image_shape: (height, width) of the input image.
        image_mpp: the input image's resolution (the model's when none was given).
        scale: image pixels per model pixel (``mpp / image_mpp``): image coordinate = model coordinate x scale.
        cell: model pixels per tissue-map value.
        timings: seconds per stage: ``read``, ``forward``, ``stitch`` (network side), ``resample`` (when the
            image's mpp differs), ``postprocess``.
    """

    results: dict[str, TaskResult]
    mpp: float
    shape: tuple[int, int]
    image_shape: tuple[int, int]
    image_mpp: float
    scale: float
    cell: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.results)

    def instances(self, task: str, frame: str = "image") -> Instances:
        """The instances of ``task`` in image pixels (``frame="image"``) or model pixels (``"model"``)."""
        res = self.results.get(task)
        if res is None or res.instances is None:
            have = ", ".join(t for t, r in self.results.items() if r.instances is not None)
            raise KeyError(f"no instances for task {task!r}; tasks with instances: {have}")
        if frame == "model" or self.scale == 1.0:
            return res.instances
        if frame != "image":
            raise ValueError(f"frame must be 'image' or 'model', got {frame!r}")
        return res.instances.transformed(self.scale)

    def counts(self) -> dict[str, int]:
        """Number of instances per instance task."""
        return {t: len(r.instances) for t, r in self.results.items() if r.instances is not None}


__all__ = ["RegionPrediction", "TilePrediction"]
