"""``cerberus evaluate``: score a folder of predicted label files against a folder of true ones.

Files are matched by name (``NAME.npz`` or ``NAME.mat``). A folder holding a ``dataset.yaml`` (the common
layout) is read at its labels folder for the task. Each file holds, as the dataset layout does:

- instance tasks: ``inst_map`` and either ``id`` + ``class`` (one class per instance) or ``type_map``;
- ``tissue``: ``class_map`` (per-pixel classes; scored pixel by pixel) or a scalar ``class`` (per image).

Per task:

- ``nuclei``: per-image Dice, AJI, AJI+, DICE2, PQ/DQ/SQ and mPQ (means over images); pooled binary PQ+ and
  mPQ+ (CoNIC); detection F1 and per-class F1 with centroids paired within ``radius_um`` (HoVer-Net);
- ``gland`` / ``lumen``: per-image Dice and PQ; GlaS object F1, object Dice and object Hausdorff (per-image
  means and pooled); for glands with classes, mPQ+;
- ``tissue``: accuracy, balanced accuracy, macro F1 and the confusion matrix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import CerberusError
from ..io.files import atomic_write_bytes
from .classification import classification_metrics
from .detection import DetectionAccumulator
from .glas import GlaSAccumulator
from .instance import MPQPlus, aji, aji_plus, dice, dice2, instance_types, pq

TASKS = ("nuclei", "gland", "lumen", "tissue")
#: classes of each task's type head (background excluded), the built-in task specs'
NUM_CLASSES = {"nuclei": 6, "gland": 2, "lumen": 0, "tissue": 9}


def _label_dir(folder: Path, task: str) -> Path:
    if not folder.is_dir():
        raise CerberusError(f"{folder}: folder not found")
    if (folder / "dataset.yaml").is_file():
        from ..data.dataset import load_dataset

        spec = load_dataset(folder)
        ann = spec.annotation(task)
        if ann.dir is None:
            raise CerberusError(f"{folder}: the {task} labels are per image in {ann.csv}, not label files")
        return spec.root / ann.dir
    return folder


def _files(folder: Path) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix in (".npz", ".mat") and not p.name.startswith("."):
            if p.stem in files:
                raise CerberusError(f"{p} and {files[p.stem]}: two label files for image {p.stem!r}")
            files[p.stem] = p
    return files


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".mat":
            from scipy.io import loadmat

            return {k: v for k, v in loadmat(str(path)).items() if not k.startswith("__")}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
        raise CerberusError(f"{path} is not a readable label file ({type(exc).__name__})") from None


def _instances(data: dict, path: Path):
    if "inst_map" not in data:
        raise CerberusError(f"{path}: no 'inst_map' array")
    inst = np.asarray(data["inst_map"]).astype(np.int64)
    if "type_map" in data:
        types = instance_types(inst, np.asarray(data["type_map"]).astype(np.int64))
    elif "class" in data and "id" in data:
        ids, cls = np.asarray(data["id"]).ravel(), np.asarray(data["class"]).ravel()
        if ids.shape != cls.shape:
            raise CerberusError(f"{path}: {ids.size} ids but {cls.size} classes")
        types = {int(i): int(c) for i, c in zip(ids, cls, strict=True)}
    else:
        types = None
    return inst, types


def _centroids(inst: np.ndarray, types: dict | None):
    ids = np.flatnonzero(np.bincount(inst.ravel()))
    ids = ids[ids > 0]
    ys, xs = np.nonzero(inst)
    lab = inst[ys, xs]
    n = int(inst.max(initial=0)) + 1
    area = np.bincount(lab, minlength=n)[ids]
    xy = np.stack([np.bincount(lab, xs, n)[ids] / area, np.bincount(lab, ys, n)[ids] / area], 1) if ids.size \
        else np.zeros((0, 2))
    t = None if types is None else np.array([types.get(int(i), 0) for i in ids], np.int64)
    return xy, t


def _nanmean(values) -> float:
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def evaluate(task: str, pred_dir: str | Path, true_dir: str | Path, mpp: float = 0.5, radius_um: float = 3.0,
             num_classes: int | None = None) -> dict:
    """Scores of ``pred_dir`` against ``true_dir`` (see the module docstring) as a JSON-ready dict."""
    if task not in TASKS:
        raise CerberusError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    pred_dir, true_dir = _label_dir(Path(pred_dir), task), _label_dir(Path(true_dir), task)
    preds, trues = _files(pred_dir), _files(true_dir)
    if not trues:
        raise CerberusError(f"{true_dir}: no .npz or .mat label files")
    for name in trues:
        if name not in preds:
            raise CerberusError(f"{true_dir / trues[name].name} has no prediction: expected {pred_dir / name}.npz")
    for name in preds:
        if name not in trues:
            raise CerberusError(f"{preds[name]} has no ground truth: expected {true_dir / name}.npz")
    n_cls = NUM_CLASSES[task] if num_classes is None else num_classes
    if task == "tissue":
        return _evaluate_tissue(preds, trues, n_cls)
    per_image: dict[str, dict] = {}
    mpq = MPQPlus(n_cls) if n_cls > 0 else None
    det = DetectionAccumulator(radius_um=radius_um, mpp=mpp) if task == "nuclei" else None
    glas = GlaSAccumulator() if task != "nuclei" else None
    typed = True
    for name in sorted(trues):
        t_inst, t_types = _instances(_read(trues[name]), trues[name])
        p_inst, p_types = _instances(_read(preds[name]), preds[name])
        if t_inst.shape != p_inst.shape:
            raise CerberusError(f"{preds[name]}: shape {p_inst.shape} differs from the truth {t_inst.shape} "
                                f"({trues[name]})")
        q = pq(t_inst, p_inst)
        row = {"dice": dice(t_inst, p_inst), "pq": q.pq, "dq": q.dq, "sq": q.sq}
        if task == "nuclei":
            row.update(aji=aji(t_inst, p_inst), aji_plus=aji_plus(t_inst, p_inst), dice2=dice2(t_inst, p_inst))
        typed = typed and t_types is not None and p_types is not None and mpq is not None
        if typed:
            row["mpq"] = mpq.update(t_inst, t_types, p_inst, p_types).mpq
        if det is not None:
            (txy, tt), (pxy, pt) = _centroids(t_inst, t_types), _centroids(p_inst, p_types)
            det.update(txy, tt if typed else None, pxy, pt if typed else None)
        if glas is not None:
            g = glas.update(t_inst, p_inst)
            row.update(object_f1=g.f1, object_dice=g.object_dice, object_hausdorff=g.object_hausdorff)
        per_image[name] = row
    summary = {f"{k}_mean": _nanmean([r[k] for r in per_image.values()]) for k in next(iter(per_image.values()))}
    if typed and mpq is not None:
        summary.update(mpq_plus=mpq.mpq_plus, bpq_plus=mpq.bpq_plus,
                       pq_plus_per_class={str(c): v for c, v in mpq.pq_plus_per_class.items()})
    if det is not None:
        d = det.result()
        summary.update(detection_f1=d.f1, detection_precision=d.precision, detection_recall=d.recall)
        if typed:
            summary.update(type_accuracy=d.type_accuracy, f1_per_class={str(c): v for c, v in d.f1_per_class.items()})
    if glas is not None:
        pooled = glas.pooled
        summary.update(object_f1_pooled=pooled.f1, object_dice_pooled=pooled.object_dice,
                       object_hausdorff_pooled=pooled.object_hausdorff)
    return {"task": task, "n_images": len(per_image), "pred": str(pred_dir), "true": str(true_dir),
            "summary": summary, "per_image": per_image}


def _evaluate_tissue(preds: dict, trues: dict, n_cls: int) -> dict:
    t_all, p_all, per_image = [], [], {}
    for name in sorted(trues):
        t, p = _read(trues[name]), _read(preds[name])
        key = "class_map" if "class_map" in t else "class"
        if key not in t or key not in p:
            raise CerberusError(f"{trues[name]} / {preds[name]}: both need 'class_map' (or a scalar 'class')")
        tv, pv = np.asarray(t[key]).astype(np.int64), np.asarray(p[key]).astype(np.int64)
        if tv.shape != pv.shape:
            raise CerberusError(f"{preds[name]}: shape {pv.shape} differs from the truth {tv.shape} ({trues[name]})")
        t_all.append(tv.ravel())
        p_all.append(pv.ravel())
        per_image[name] = {"accuracy": float((tv == pv).mean())}
    r = classification_metrics(np.concatenate(t_all), np.concatenate(p_all), n_cls)
    summary = {"accuracy": r.accuracy, "balanced_accuracy": r.balanced_accuracy, "macro_f1": r.macro_f1,
               "confusion": np.asarray(r.confusion).tolist()}
    return {"task": "tissue", "n_images": len(per_image), "summary": summary, "per_image": per_image}


def write_json(result: dict, path: Path) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None  # JSON has no NaN/inf: written as null
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    atomic_write_bytes(Path(path), json.dumps(clean(result), indent=2).encode())


def table(result: dict) -> str:
    """The summary as aligned ``metric  value`` lines."""
    lines = [f"{result['task']}: {result['n_images']} images"]
    for k, v in result["summary"].items():
        if isinstance(v, dict):
            v = "  ".join(f"{c}:{x:.3f}" if isinstance(x, float) else f"{c}:{x}" for c, x in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, list):
            continue
        lines.append(f"  {k:<26} {v}")
    return "\n".join(lines)
