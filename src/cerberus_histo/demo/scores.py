"""The demo's scores: metrics of the held-out tiles and of the slide against their truth, and pictures of truth
next to prediction. No torch."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from ..io.files import json_ready, write_json, write_png

TASKS = ("nuclei", "gland", "lumen", "tissue")

#: (label, key in evaluate()'s summary, how to show it) per task, the numbers the demo reports
HEADLINE = {
    "nuclei": (("PQ", "pq_mean"), ("Dice", "dice_mean"), ("AJI", "aji_mean"), ("detection F1", "detection_f1"),
               ("type F1 (mean over classes)", "type_f1"), ("type accuracy", "type_accuracy"),
               ("mPQ+", "mpq_plus")),
    "gland": (("PQ", "pq_mean"), ("Dice", "dice_mean"), ("object F1 (GlaS)", "object_f1_pooled"),
              ("object Dice (GlaS)", "object_dice_pooled"), ("mPQ+ (gland, surface-epi)", "mpq_plus")),
    "lumen": (("PQ", "pq_mean"), ("Dice", "dice_mean"), ("object F1 (GlaS)", "object_f1_pooled")),
    "tissue": (("pixel accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"),
               ("macro F1", "macro_f1"), ("patch accuracy (held-out patches)", "patch_accuracy"),
               ("patch accuracy at the tiles' class mix", "patch_accuracy_tile_mix")),
}


def _clean(v):
    """JSON-ready: NaN -> None, numpy scalars -> Python (:func:`~cerberus_histo.io.files.json_ready`)."""
    return json_ready(v)


def model_config(folder: Path):
    """The :class:`~cerberus_histo.config.ModelConfig` of a model folder, without loading torch."""
    from ..config import ModelConfig
    from ..io.files import read_yaml_mapping

    return ModelConfig.from_dict(read_yaml_mapping(Path(folder) / "model.yaml")["model"])


def model_heads(folder: Path) -> tuple[str, ...]:
    """The trusted heads of a model folder (:func:`~cerberus_histo.config.trusted_heads`), without loading torch."""
    from ..config import trusted_heads
    from ..io.files import read_yaml_mapping

    return trusted_heads(model_config(folder), read_yaml_mapping(Path(folder) / "model.yaml").get("provenance"))


def untrained(config, task: str, heads) -> list[str]:
    """The heads of ``task`` that are not among the trusted ``heads`` (never trained: their outputs are not
    written); the first is the ``inst``/``class`` head when that one is."""
    return [h for h in config.task(task).head_names if h not in heads]


# ---- held-out tiles --------------------------------------------------------------------------------------
def _truth(spec, name: str) -> dict[str, dict]:
    out = {}
    for task in ("gland", "lumen", "nuclei", "tissue"):
        with np.load(spec.label_path(name, task)) as z:
            out[task] = {k: z[k] for k in z.files}
    return out


def _lut(inst: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    lut = np.zeros(int(max(inst.max(initial=0), ids.max(initial=0))) + 1, np.int32)
    lut[ids] = values
    return lut[inst]


def truth_results(truth: dict[str, dict]) -> dict:
    """Post-processing-shaped results (task -> TaskResult) of a synthetic tile's truth, for the overlay."""
    from ..postproc import TaskResult
    from ..postproc.records import measure

    res = {}
    for task, n_cls in (("gland", 3), ("nuclei", 7)):
        t = truth[task]
        inst = t["inst_map"]
        type_map = _lut(inst, t["id"], t["class"])
        res[task] = TaskResult(inst, measure(inst, type_map, n_cls), type_map)
    t = truth["lumen"]
    parents = {int(i): int(p) for i, p in zip(t["id"], t.get("class", np.zeros_like(t["id"])), strict=True)}
    res["lumen"] = TaskResult(t["inst_map"], measure(t["inst_map"], None, None, parents))
    res["tissue"] = TaskResult(class_map=truth["tissue"]["class_map"])
    return res


def _label(img: np.ndarray, text: str, bottom: bool = False) -> None:
    """White text on a dark box (OpenCV 5 draws thick and thin strokes of one text at different widths, so an
    outline does not line up)."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)
    y = img.shape[0] - 8 if bottom else h + 8
    img[max(y - h - 5, 0):y + base + 1, :w + 12] //= 3
    cv2.putText(img, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)


def compare_figure(image: np.ndarray, truth: dict[str, dict], pred_overlay: np.ndarray, config) -> np.ndarray:
    """``image | truth | prediction`` side by side, the truth drawn exactly as the prediction overlay is."""
    from ..outputs.overlay import render_overlay
    from ..outputs.records import annotation_records

    res = truth_results(truth)
    inst = {k: v for k, v in res.items() if k != "tissue"}
    records = annotation_records(inst, config, mpp=0.5)
    class_map = res["tissue"].class_map
    truth_img = render_overlay(image, records, config, class_map=class_map, cell=image.shape[1] / class_map.shape[1])
    panels = [np.ascontiguousarray(a[:, :, :3]) for a in (image.copy(), truth_img, pred_overlay.copy())]
    for p, text in zip(panels, ("image", "truth", "prediction"), strict=True):
        _label(p, text)
    gap = np.full((image.shape[0], 6, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], 1)


def evaluate_tiles(out: Path) -> dict:
    """Score the tile predictions of ``out/tiles`` (an ``infer-tile`` output folder, read as it is, as ``cerberus
    evaluate`` does) against ``out/data/test``: ``evaluate`` per task, the JSON of each, and ``image | truth |
    prediction`` pictures."""
    from ..data.dataset import load_dataset
    from ..io.readers import read_image
    from ..metrics.evaluate import evaluate

    test = out / "data" / "test"
    spec = load_dataset(test)
    ev = out / "evaluation"
    config, heads = model_config(out / "train" / "model"), model_heads(out / "train" / "model")
    names = sorted(spec.names())
    pictures = {}
    for name in names:
        image = read_image(spec.image_path(name))
        overlay = read_image(out / "tiles" / f"{name}_overlay.png")
        pic = ev / f"{name}_truth_vs_prediction.png"
        write_png(pic, compare_figure(image, _truth(spec, name), overlay, config))
        pictures[name] = str(pic.relative_to(out))
    metrics, files = {}, {}
    for task in TASKS:
        missing = untrained(config, task, heads)
        if missing and missing[0] in ("tissue-class", f"{task}-inst"):
            metrics[task] = {"untrained": missing}  # nothing predicted: nothing to score
            continue
        r = evaluate(task, out / "tiles", test)
        s = r["summary"]
        if task == "nuclei" and s.get("f1_per_class"):
            s["type_f1"] = _nanmean(list(s["f1_per_class"].values()))
        path = ev / f"{task}.json"
        write_json(path, r)
        files[task] = str(path.relative_to(out))
        metrics[task] = {key: _clean(s.get(key)) for _, key in HEADLINE[task]}
        metrics[task]["images"] = r["n_images"]
        if missing:  # e.g. a type head never trained: what needs it is not scored
            metrics[task]["untrained"] = missing
    counts = {}
    for name in names:
        t = _truth(spec, name)
        with np.load(out / "tiles" / f"{name}.npz") as z:
            for task in ("gland", "lumen", "nuclei"):
                if f"{task}_inst" not in z.files:  # a head never trained writes nothing
                    continue
                c = counts.setdefault(task, [0, 0])
                c[0] += len(t[task]["id"])
                c[1] += len(np.unique(z[f"{task}_inst"])) - (1 if (z[f"{task}_inst"] == 0).any() else 0)
    return {"metrics": metrics, "objects_true_pred": counts, "files": files, "pictures": pictures,
            "tiles": names,
            "command": "cerberus evaluate --task nuclei --pred {out}/tiles --true {out}/data/test"}


def _nanmean(values) -> float:
    v = np.asarray([np.nan if x is None else x for x in values], float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


# ---- the slide -------------------------------------------------------------------------------------------
def _centroids(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(inst)
    ids, inv = np.unique(inst[ys, xs], return_inverse=True)
    n = np.bincount(inv, minlength=len(ids))
    xy = np.stack([np.bincount(inv, xs, len(ids)) / n, np.bincount(inv, ys, len(ids)) / n], 1) if len(ids) \
        else np.zeros((0, 2))
    return ids, xy


def evaluate_slide(slide: Path, store: Path, config, tissue_map: Path | None = None, cell: int = 16,
                   heads=None) -> dict:
    """Nuclei detection F1 / type F1 of the slide's store against the synthetic slide's ground truth (centroids
    paired within 3 µm), object counts (truth vs prediction), and with ``tissue_map`` (the ``X_tissue.png`` class
    map, one pixel per network cell of ``cell`` model pixels) the tissue map's pixel accuracy over the slide's tissue
    fields. Without a trusted ``nuclei-type`` head (``heads``, default every head) types are not scored."""
    from ..data.slide import SlideTruth
    from ..metrics import detection_f1
    from ..outputs.store import AnnotationStore

    t0 = time.perf_counter()
    truth = SlideTruth(slide)
    lay = truth.layout
    pred_xy, pred_types, pred_counts = [], [], {}
    with AnnotationStore(store, readonly=True) as db:
        for rec in db.records(config):
            pred_counts[rec.task] = pred_counts.get(rec.task, 0) + len(rec)
            if rec.task == "nuclei":
                pred_xy.extend(rec.centroid.tolist())
                pred_types.extend(rec.class_index.tolist())
    inst, classes = truth.read_region("nuclei", 0, 0, lay.width, lay.height)
    ids, true_xy = _centroids(inst)
    del inst
    true_types = np.array([classes[int(i)] for i in ids], np.int64)
    typed = heads is None or "nuclei-type" in heads
    d = detection_f1(true_xy, true_types if typed else None, np.asarray(pred_xy, float).reshape(-1, 2),
                     np.asarray(pred_types, np.int64) if typed else None, radius_um=3.0, mpp=lay.mpp)
    counts = {"nuclei": [len(ids), pred_counts.get("nuclei", 0)]}
    for task in ("gland", "lumen"):
        g, _ = truth.read_region(task, 0, 0, lay.width, lay.height)
        counts[task] = [int(np.unique(g).size - (1 if (g == 0).any() else 0)), pred_counts.get(task, 0)]
    tissue = {}
    if tissue_map is not None:
        cells = cv2.imread(str(tissue_map), cv2.IMREAD_UNCHANGED)
        px = round(cell * config.mpp / lay.mpp)  # level-0 pixels per map pixel
        pred = np.repeat(np.repeat(cells, px, 0), px, 1)[:lay.height, :lay.width]
        where = truth.fields(0, 0, lay.width, lay.height)
        tissue = {"tissue_accuracy": float((pred == truth.tissue(0, 0, lay.width, lay.height))[where].mean())}
    return _clean({**tissue, "nuclei_detection_f1": d.f1, "nuclei_precision": d.precision, "nuclei_recall": d.recall,
                   "nuclei_type_accuracy": d.type_accuracy,
                   "nuclei_type_f1": _nanmean(list(d.f1_per_class.values())),
                   "objects_true_pred": counts, "seconds": round(time.perf_counter() - t0, 1)})
