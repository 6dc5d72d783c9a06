"""Classification metrics (tissue type): accuracy, balanced accuracy, macro F1 and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClassificationResult", "classification_metrics"]


@dataclass(frozen=True)
class ClassificationResult:
    """Scores of :func:`classification_metrics`.

    ``confusion[i, j]`` counts samples of true class i predicted as j (rows = truth). ``recall_per_class`` is
    NaN for classes absent from the truth; ``f1_per_class`` is NaN for classes absent from both truth and
    prediction.
    """

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    confusion: np.ndarray
    recall_per_class: np.ndarray
    f1_per_class: np.ndarray


def _labels(x, name: str, num_classes: int) -> np.ndarray:
    a = np.asarray(x).reshape(-1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}), got values in [{a.min()}, {a.max()}]")
    return a


def classification_metrics(true_labels, pred_labels, num_classes: int) -> ClassificationResult:
    """Accuracy, balanced accuracy, macro F1 and confusion matrix of integer labels in [0, num_classes).

    * accuracy: fraction of samples with ``pred == true``;
    * balanced accuracy: mean recall ``C[c, c] / sum_j C[c, j]`` over the classes present in the truth (as
      scikit-learn's ``balanced_accuracy_score``, which drops classes without true samples);
    * macro F1: mean over classes of ``2 C[c, c] / (row sum + column sum)``, over the classes present in the
      truth or the prediction (scikit-learn's default label set, the union of both): a class only predicted
      counts with F1 0, a class absent from both is left out;
    * confusion: ``num_classes x num_classes`` counts, rows = truth, columns = prediction.

    Edge cases: no samples gives NaN for the three scores and a zero matrix.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = _labels(true_labels, "true_labels", num_classes)
    p = _labels(pred_labels, "pred_labels", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"true_labels and pred_labels differ in length: {t.size} and {p.size}")
    conf = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    diag = np.diag(conf).astype(np.float64)
    rows, cols = conf.sum(axis=1), conf.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(rows > 0, diag / rows, np.nan)
        f1 = np.where(rows + cols > 0, 2 * diag / (rows + cols), np.nan)
    if t.size == 0:
        nan = float("nan")
        return ClassificationResult(nan, nan, nan, conf, recall, f1)
    return ClassificationResult(
        accuracy=float(diag.sum() / t.size),
        balanced_accuracy=float(np.nanmean(recall)),
        macro_f1=float(np.nanmean(f1)),
        confusion=conf,
        recall_per_class=recall,
        f1_per_class=f1,
    )
