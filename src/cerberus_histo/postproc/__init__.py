"""Post-processing: network probabilities to instances with records (NumPy / SciPy / scikit-image; no torch).

``postprocess(probs, mpp)`` takes softmax probabilities by head name (``"nuclei-inst"``: 3 x H x W,
``"nuclei-type"``: C x H x W, ``"gland-inst"``, ``"gland-type"``, ``"lumen-inst"``, ``"tissue-class"``: C x H x W
per-pixel tissue probabilities) and returns a :class:`TaskResult` per task present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .instances import (
    LUMEN_PARAMS,
    GlandParams,
    NucleiParams,
    fill_instance_holes,
    gland_instances,
    link_lumina,
    nuclei_instances,
    remove_small,
)
from .records import Instances, instance_types, measure


@dataclass
class TaskResult:
    """One task's result: ``inst_map`` (int32) and ``instances`` for instance tasks, ``type_map`` (argmax of
    the type head) when there is one; ``class_map`` and ``class_prob`` for the tissue task."""

    inst_map: np.ndarray | None = None
    instances: Instances | None = None
    type_map: np.ndarray | None = None
    class_map: np.ndarray | None = None
    class_prob: np.ndarray | None = None


def postprocess(probs: dict[str, np.ndarray], mpp: float = 0.5, nuclei: NucleiParams | None = None,
                gland: GlandParams | None = None, lumen: GlandParams | None = None) -> dict[str, TaskResult]:
    """Instances of every task whose heads are in ``probs`` (see the module docstring); parameters default
    to the original's values at 0.5 µm/px, scaled to ``mpp``."""
    out: dict[str, TaskResult] = {}
    for task, fn, params in (("nuclei", nuclei_instances, nuclei or NucleiParams()),
                             ("gland", gland_instances, gland or GlandParams()),
                             ("lumen", gland_instances, lumen or LUMEN_PARAMS)):
        p = probs.get(f"{task}-inst")
        if p is None:
            continue
        inst = fn(p[1], p[2], mpp, params)
        t = probs.get(f"{task}-type")
        type_map = None if t is None else np.argmax(t, axis=0).astype(np.int32)
        out[task] = TaskResult(inst, None, type_map)
    if "lumen" in out and "gland" in out:
        out["lumen"].inst_map, parents = link_lumina(out["lumen"].inst_map, out["gland"].inst_map)
    else:
        parents = None
    for task, res in out.items():
        n_cls = None if res.type_map is None else probs[f"{task}-type"].shape[0]
        res.instances = measure(res.inst_map, res.type_map, n_cls, parents if task == "lumen" else None)
    t = probs.get("tissue-class")
    if t is not None:
        out["tissue"] = TaskResult(class_map=np.argmax(t, axis=0).astype(np.int32), class_prob=np.max(t, axis=0))
    return out


__all__ = ["GlandParams", "Instances", "LUMEN_PARAMS", "NucleiParams", "TaskResult", "fill_instance_holes",
           "gland_instances", "instance_types", "link_lumina", "measure", "nuclei_instances", "postprocess",
           "remove_small"]
