"""Inference: window geometry (:mod:`.tiling`), a run's settings (:mod:`.options`) and those chosen for the machine
(:mod:`.runtime`), the engine (:mod:`.engine`, one path for tiles and slides), typed results (:mod:`.results`),
tile inference (:mod:`.tiles`), whole slides (:mod:`.wsi`: a slide's plan in :mod:`.slide_plan`, the stages after
it in :mod:`.slide_run`) and many slides (:mod:`.cohort`).

Names are imported lazily, so importing this package (as post-processing workers do) does not import torch.
"""

from __future__ import annotations

_EXPORTS = {
    "Predictor": "engine", "TTA_FLIPS": "engine",
    "PRECISIONS": "runtime", "Runtime": "runtime", "plan_runtime": "runtime", "resolve_device": "runtime",
    "RegionPrediction": "results", "TilePrediction": "results",
    "Geometry": "tiling", "TilePlan": "tiling", "plan_tiles": "tiling",
    "predict_tile": "tiles", "infer_tiles": "tiles", "TileRunSummary": "tiles",
    "RunOptions": "options",
    "predict_wsi": "wsi", "predict_slide": "wsi", "make_predictor": "wsi", "WSIResult": "wsi", "SlideJob": "wsi",
    "infer_wsi": "cohort", "CohortSummary": "cohort", "SlideStatus": "cohort",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
