"""``cerberus evaluate``: score predictions against the truth, matching images by name.

The truth is a folder of label files (``NAME.npz`` or ``NAME.mat``) or a dataset folder (``dataset.yaml``, read
at its labels for the task, or at its ``classes.csv`` for per-image tissue classes; ``split`` keeps one split's
images). The predictions are a folder of label files in the same layout, or an ``infer-tile`` output folder as it
is: its ``NAME.npz`` maps (``{task}_inst``, ``{task}_type``, ``tissue_class``) are at the model's resolution and
are brought to the truth's shape by nearest neighbour; a per-image tissue class is the most frequent class of
the predicted map. Label files hold, as the dataset layout does:

- instance tasks: ``inst_map`` and either ``id`` + ``class`` (one class per instance) or ``type_map``;
- ``tissue``: ``class_map`` (per-pixel classes; scored pixel by pixel) or a scalar ``class`` (per image).

Per task:

- ``nuclei``: per-image Dice, AJI, AJI+, DICE2, PQ/DQ/SQ and mPQ (means over images); pooled binary PQ+ and
  mPQ+ (CoNIC); detection F1 and per-class F1 with centroids paired within ``radius_um`` (HoVer-Net), in
  microns at each image's resolution (the truth dataset's ``mpp``/``mpps.csv``, or ``mpp`` when given);
- ``gland`` / ``lumen``: per-image Dice and PQ; GlaS object F1, object Dice and object Hausdorff (per-image
  means and pooled); for glands with classes, mPQ+;
- ``tissue``: accuracy, balanced accuracy, macro F1 and the confusion matrix.

A model's head that was never trained writes nothing (docs/outputs.md): predictions without a task's maps are a
one-line error naming the model's trusted heads, and predictions without types (no trained type head) are scored
without the type metrics, the summary's ``types`` saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CerberusError
from ..io.files import write_json as write_strict_json
from .classification import classification_metrics
from .detection import DetectionAccumulator
from .glas import GlaSAccumulator
from .instance import MPQPlus, aji, aji_plus, dice, dice2, instance_types, pq

TASKS = ("nuclei", "gland", "lumen", "tissue")
#: classes of each task's type head (background excluded), the built-in task specs'
NUM_CLASSES = {"nuclei": 6, "gland": 2, "lumen": 0, "tissue": 9}
DEFAULT_MPP = 0.5


class _Truth:
    """The true labels of one task: ``{name: path}`` of label files, or per-image classes, and resolutions."""

    def __init__(self, folder: Path, task: str, split: int | None):
        if not folder.is_dir():
            raise CerberusError(f"{folder}: folder not found")
        self.classes: dict[str, int] | None = None
        self.mpps: dict[str, float] = {}
        if not (folder / "dataset.yaml").is_file():
            if split is not None:
                raise CerberusError(f"--split needs a dataset folder (dataset.yaml) as --true, not {folder}")
            self.dir, self.files = folder, _files(folder)
            return
        from ..data.dataset import load_dataset

        spec = load_dataset(folder)
        names = spec.names(split)
        self.mpps = {n: spec.image_mpp(n) for n in names}
        ann = spec.annotation(task)
        if ann.dir is None:  # per-image classes (a tissue patch set)
            table = spec.image_classes(task)
            self.dir, self.files, self.classes = spec.root, {n: spec.image_path(n) for n in names}, table
            return
        self.dir = spec.root / ann.dir
        files = _files(self.dir)
        self.files = {n: files[n] for n in names if n in files}
        missing = [n for n in names if n not in files]
        if missing:
            raise CerberusError(f"{self.dir}: no label file for image {missing[0]!r} of {spec.root / spec.split_csv}")

    def read(self, name: str) -> dict[str, np.ndarray]:
        if self.classes is not None:
            return {"class": np.int64(self.classes[name])}
        return _read(self.files[name])

    def shape(self, name: str, data: dict) -> tuple[int, int] | None:
        """The truth's map shape (``None`` for a per-image class)."""
        for key in ("inst_map", "class_map"):
            if key in data:
                return np.asarray(data[key]).shape[:2]
        return None


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


def _nearest(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from ..data.resolution import resample_map  # pure NumPy

    return resample_map(np.asarray(label), tuple(shape))


def _prediction(data: dict, task: str, shape: tuple[int, int] | None, path: Path) -> dict[str, np.ndarray]:
    """A predicted label file as the truth's layout: ``infer-tile`` maps (``{task}_inst`` ...) are brought to
    the truth's ``shape``; label files pass unchanged."""
    key = "tissue_class" if task == "tissue" else f"{task}_inst"
    if "meta" not in data or ("inst_map" in data or "class_map" in data or "class" in data):
        return data  # a label file
    if key not in data:
        head = "tissue-class" if task == "tissue" else f"{task}-inst"
        trusted = json.loads(str(data["meta"])).get("trusted_heads")
        why = (f"the model that wrote it has no trained {head} head (its trusted heads: {', '.join(trusted) or 'none'};"
               " a head never trained writes nothing)" if trusted is not None else f"the model has no {task} head")
        raise CerberusError(f"{path}: an infer-tile result without {key!r}: {why}")
    if task == "tissue":
        cells = np.asarray(data[key]).astype(np.int64)
        if shape is None:  # one class per image: the most frequent predicted class
            return {"class": np.int64(np.bincount(cells.ravel()).argmax())}
        meta = json.loads(str(data["meta"]))
        cell, scale = meta.get("tissue_cell"), float(meta.get("scale", 1.0))
        if cell:  # each value covers cell x cell map pixels; the last cells may reach past the map
            h, w = max(1, round(shape[0] / scale)), max(1, round(shape[1] / scale))
            cells = np.repeat(np.repeat(cells, cell, 0), cell, 1)[:h, :w]
        return {"class_map": _nearest(cells, shape)}
    out = {"inst_map": _nearest(data[key], shape)}
    if f"{task}_type" in data:
        out["type_map"] = _nearest(data[f"{task}_type"], shape)
    return out


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


def evaluate(task: str, pred_dir: str | Path, true_dir: str | Path, mpp: float | None = None,
             radius_um: float = 3.0, num_classes: int | None = None, split: int | None = None) -> dict:
    """Scores of ``pred_dir`` against ``true_dir`` (see the module docstring) as a JSON-ready dict. ``mpp``
    (the truth's resolution, for the detection radius) defaults to the truth dataset's, else 0.5."""
    if task not in TASKS:
        raise CerberusError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if not radius_um > 0:
        raise CerberusError(f"--radius-um must be > 0 (the centroid pairing radius in microns, e.g. 3), got {radius_um}")
    if mpp is not None and not mpp > 0:
        raise CerberusError(f"--mpp must be a positive number of microns per pixel (e.g. 0.5), got {mpp}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise CerberusError(f"{pred_dir}: folder not found")
    if (pred_dir / "dataset.yaml").is_file():
        pred_dir = _Truth(pred_dir, task, None).dir
    truth = _Truth(Path(true_dir), task, split)
    preds, trues = _files(pred_dir), truth.files
    if not trues:
        raise CerberusError(f"{truth.dir}: no .npz or .mat label files")
    for name in trues:
        if name not in preds:
            raise CerberusError(f"{trues[name]} has no prediction: expected {pred_dir / name}.npz")
    if split is None:
        for name in preds:
            if name not in trues:
                raise CerberusError(f"{preds[name]} has no ground truth: expected {truth.dir / name}.npz")

    def pairs():
        for name in sorted(trues):
            t = truth.read(name)
            yield name, t, _prediction(_read(preds[name]), task, truth.shape(name, t), preds[name])

    n_cls = NUM_CLASSES[task] if num_classes is None else num_classes
    if task == "tissue":
        result = _evaluate_tissue(pairs(), n_cls, preds, trues)
    else:
        result = _evaluate_instances(task, pairs(), n_cls, preds, trues, truth.mpps, mpp, radius_um)
    return {"task": task, "n_images": len(trues), "pred": str(pred_dir), "true": str(truth.dir), **result}


def _evaluate_instances(task, pairs, n_cls, preds, trues, mpps, mpp, radius_um) -> dict:
    per_image: dict[str, dict] = {}
    mpq = MPQPlus(n_cls) if n_cls > 0 else None
    det = DetectionAccumulator(radius_px=radius_um) if task == "nuclei" else None  # centroids in microns
    glas = GlaSAccumulator() if task != "nuclei" else None
    typed, untyped_pred = True, False
    for name, t_data, p_data in pairs:
        t_inst, t_types = _instances(t_data, trues[name])
        p_inst, p_types = _instances(p_data, preds[name])
        if t_inst.shape != p_inst.shape:
            raise CerberusError(f"{preds[name]}: shape {p_inst.shape} differs from the truth {t_inst.shape} "
                                f"({trues[name]})")
        q = pq(t_inst, p_inst)
        row = {"dice": dice(t_inst, p_inst), "pq": q.pq, "dq": q.dq, "sq": q.sq}
        if task == "nuclei":
            row.update(aji=aji(t_inst, p_inst), aji_plus=aji_plus(t_inst, p_inst), dice2=dice2(t_inst, p_inst))
        untyped_pred = untyped_pred or (t_types is not None and p_types is None)
        typed = typed and t_types is not None and p_types is not None and mpq is not None
        if typed:
            row["mpq"] = mpq.update(t_inst, t_types, p_inst, p_types).mpq
        if det is not None:
            um = float(mpp if mpp is not None else mpps.get(name, DEFAULT_MPP))
            (txy, tt), (pxy, pt) = _centroids(t_inst, t_types), _centroids(p_inst, p_types)
            det.update(txy * um, tt if typed else None, pxy * um, pt if typed else None)
        if glas is not None:
            g = glas.update(t_inst, p_inst)
            row.update(object_f1=g.f1, object_dice=g.object_dice, object_hausdorff=g.object_hausdorff)
        per_image[name] = row
    summary = {f"{k}_mean": _nanmean([r[k] for r in per_image.values()]) for k in next(iter(per_image.values()))}
    if untyped_pred:  # marked, not scored: an infer-tile model without a trained type head writes no type map
        summary["types"] = f"not scored: the predictions have no {task} types (no trained {task}-type head)"
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
    return {"summary": summary, "per_image": per_image}


def _evaluate_tissue(pairs, n_cls: int, preds: dict, trues: dict) -> dict:
    t_all, p_all, per_image = [], [], {}
    for name, t, p in pairs:
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
    return {"summary": summary, "per_image": per_image}


def write_json(result: dict, path: Path) -> None:
    """The result as strict JSON, atomically: a NaN or infinite metric (nothing to score) is ``null``."""
    write_strict_json(Path(path), result)


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
