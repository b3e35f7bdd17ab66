"""Scoring a fused artifact on labelled data: accuracy, per-class metrics, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.atomic import atomic_write_figure
from fedfuse.data.datasets import Dataset
from fedfuse.errors import DataError


@dataclass(frozen=True)
class EvaluationReport:
    labels: list[str]
    accuracy: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray
    """``confusion[i, j]``: examples of true class ``labels[i]`` predicted as ``labels[j]``."""

    def to_dict(self) -> dict:
        per_class = {lab: {"precision": float(p), "recall": float(r), "f1": float(f),
                           "support": int(s)}
                     for lab, p, r, f, s in zip(self.labels, self.precision, self.recall,
                                                self.f1, self.support)}
        return {"accuracy": self.accuracy, "per_class": per_class,
                "confusion_matrix": self.confusion.tolist(), "labels": self.labels}


def evaluate_artifact(predictor: FusedPredictor, data: Dataset) -> EvaluationReport:
    """Score ``predictor`` on ``data``; the data's labels must be among the artifact's classes."""
    labels = list(predictor.schema.class_labels)
    truth = np.array(data.schema.class_labels)[data.y]
    unknown = sorted(str(t) for t in set(truth) - set(labels))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not classes of this model "
                        f"(classes: {', '.join(labels)})")
    pred = predictor.predict(data.X)
    p, r, f, s = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(truth, pred, labels=labels)
    return EvaluationReport(labels, float((pred == truth).mean()), p, r, f, s, cm)


def plot_confusion(report: EvaluationReport, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(report.labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * k, 1.0 + 0.5 * k), dpi=110)
    ax.imshow(report.confusion, cmap="Blues")
    ax.set_xticks(range(k), report.labels, rotation=45 if k > 12 else 0)
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    peak = report.confusion.max() or 1
    for i in range(k):
        for j in range(k):
            v = report.confusion[i, j]
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    atomic_write_figure(fig, path)
