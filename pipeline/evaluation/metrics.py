"""Classification metrics of a land-cover map and their DVC-friendly outputs.

``classification_metrics`` gives overall accuracy (OA), average accuracy (AA, the mean
per-class recall), Cohen's κ, per-class precision / recall / F1 / IoU, mean IoU and the
confusion matrix (rows = actual, columns = predicted). ``summarise_seeds`` turns several runs
into mean ± std.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "plot_confusion",
    "summarise_seeds",
    "write_confusion_csv",
]

SUMMARY_KEYS = ("oa", "aa", "kappa", "miou")


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``cm[i, j]`` = pixels of class ``i`` predicted as ``j`` (class indices ``0..n-1``)."""
    actual = np.asarray(actual, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    return np.bincount(actual * n_classes + predicted, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def classification_metrics(
    actual: np.ndarray, predicted: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """OA, AA, κ, mIoU, per-class precision/recall/F1/IoU and the confusion matrix.

    Classes absent from ``actual`` count neither in AA nor in mIoU (their recall is undefined).
    """
    k = len(class_names)
    cm = confusion_matrix(actual, predicted, k).astype(np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    support, predicted_n = cm.sum(axis=1), cm.sum(axis=0)
    recall = _ratio(tp, support)
    precision = _ratio(tp, predicted_n)
    f1 = _ratio(2 * precision * recall, precision + recall)
    iou = _ratio(tp, support + predicted_n - tp)
    present = support > 0
    oa = float(tp.sum() / n) if n else 0.0
    pe = float((support * predicted_n).sum() / n**2) if n else 0.0
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 0.0
    return {
        "oa": oa,
        "aa": float(recall[present].mean()) if present.any() else 0.0,
        "kappa": float(kappa),
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "n_test": int(n),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "iou": float(iou[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def summarise_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of the summary metrics over runs (one per seed).

    The std divides by the number of runs (NumPy's default, ddof 0), as every ± hsicache
    prints does; the sample standard deviation is ``sqrt(n / (n - 1))`` times larger.
    """
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def write_confusion_csv(
    path: str | Path, actual: np.ndarray, predicted: np.ndarray, class_names: list[str]
) -> None:
    """One ``actual,predicted`` row per test pixel: DVC's ``confusion`` plot template input."""
    names = np.asarray(class_names, dtype=object)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(names[actual], names[predicted], strict=True))


def plot_confusion(cm: np.ndarray, class_names: list[str], title: str) -> Any:
    """A row-normalised confusion-matrix figure with counts."""
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    rows = _ratio(cm, cm.sum(axis=1, keepdims=True).repeat(cm.shape[1], axis=1))
    k = len(class_names)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title, fontsize=9)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the actual class")
    fig.tight_layout()
    return fig
