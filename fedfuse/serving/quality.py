"""Model-quality monitoring of the served versions: what they predict, how sure they are,
and how far the inputs have drifted from the data they were trained on.

The reference is the federated feature moments every member standardises its inputs
with (``Standardize``: the sites' pooled per-feature mean and std, in the artifact).
Each answered instance ``x`` is standardised, ``z = (x - mean) / std``, and per feature
the server keeps exponentially decayed sums ``W = Σ w``, ``S1 = Σ w z``, ``S2 = Σ w z²``
(each instance's weight halves after ``half_life`` more instances), so the figures
follow the recent traffic:

- mean shift ``= sqrt(mean_f (S1_f / W)²)``: the RMS over features of the recent mean of
  ``z``; 0 for inputs distributed as in training, 1 when every feature moved by one
  training standard deviation;
- spread ratio ``= mean_f sqrt(S2_f / W - (S1_f / W)²)``: 1 for the training spread.

Exported as Prometheus gauges per version, with the predicted-class counts and a
top-class confidence histogram, and as ``GET /v1/models/{version}/quality``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedfuse.models.registry import Standardize
from fedfuse.serving.registry import ModelSlot

CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def reference_moments(slot: ModelSlot) -> tuple[np.ndarray, np.ndarray] | None:
    """The (mean, std) per feature a version's first member standardises with, or None
    for a model without a ``Standardize`` layer (a user model that does its own)."""
    layer = next((m for m in slot.predictor.model.modules() if isinstance(m, Standardize)),
                 None)
    if layer is None:
        return None
    return (layer.mean.detach().cpu().numpy().reshape(-1).astype(np.float64),
            layer.std.detach().cpu().numpy().reshape(-1).astype(np.float64))


def decayed_update(sums: np.ndarray, z: np.ndarray, half_life: float) -> np.ndarray:
    """``(W, S1, S2)`` per feature (rows of ``sums``) after the instances ``z`` (n, F),
    the i-th of n weighted ``2^(-(n - 1 - i) / half_life)`` and the old sums
    ``2^(-n / half_life)``."""
    n = len(z)
    w = 0.5 ** (np.arange(n - 1, -1, -1) / half_life)
    decay = 0.5 ** (n / half_life)
    return sums * decay + np.stack([np.full(z.shape[1], w.sum()), w @ z, w @ (z * z)])


def drift_scores(sums: np.ndarray) -> tuple[float, float]:
    """(mean shift, spread ratio) of the sums (formulas in the module docstring)."""
    weight, s1, s2 = sums
    mean = s1 / weight
    spread = np.sqrt(np.maximum(s2 / weight - mean * mean, 0.0))
    return float(np.sqrt(np.mean(mean * mean))), float(np.mean(spread))


@dataclass
class VersionQuality:
    """One version's running figures."""

    reference: tuple[np.ndarray, np.ndarray] | None
    instances: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0
    sums: np.ndarray | None = None


class QualityMonitor:
    """The quality figures of every served version, and their Prometheus families."""

    def __init__(self, registry: CollectorRegistry, half_life: float = 500.0) -> None:
        self.half_life = half_life
        self.versions: dict[str, VersionQuality] = {}
        self.predicted = Counter("fedfuse_predicted_class_total", "Instances answered, by "
                                 "version and predicted class", ["version", "label"],
                                 registry=registry)
        self.confidence = Histogram("fedfuse_prediction_confidence", "Top-class probability "
                                    "of each answered instance", ["version"],
                                    buckets=CONFIDENCE_BUCKETS, registry=registry)
        self.mean_shift = Gauge("fedfuse_input_drift_mean_shift", "RMS over features of the "
                                "recent inputs' mean, in training standard deviations",
                                ["version"], registry=registry)
        self.spread = Gauge("fedfuse_input_drift_spread_ratio", "Mean over features of the "
                            "recent inputs' spread over the training spread", ["version"],
                            registry=registry)

    def observe(self, slot: ModelSlot, x: np.ndarray, proba: np.ndarray) -> None:
        """Count one answered request of ``slot``: inputs ``x`` (n, ...), answers ``proba``."""
        q = self.versions.get(slot.version)
        if q is None:
            q = self.versions[slot.version] = VersionQuality(reference_moments(slot))
        classes = slot.predictor.schema.class_labels
        top = proba.max(axis=1)
        for index, count in zip(*np.unique(proba.argmax(axis=1), return_counts=True)):
            label = classes[int(index)]
            q.classes[label] = q.classes.get(label, 0) + int(count)
            self.predicted.labels(slot.version, label).inc(int(count))
        for value in top:
            self.confidence.labels(slot.version).observe(float(value))
        q.instances += len(x)
        q.confidence_sum += float(top.sum())
        if q.reference is not None:
            mean, std = q.reference
            z = (x.reshape(len(x), -1).astype(np.float64) - mean) / std
            q.sums = decayed_update(q.sums if q.sums is not None else np.zeros((3, z.shape[1])),
                                    z, self.half_life)
            shift, spread = drift_scores(q.sums)
            self.mean_shift.labels(slot.version).set(shift)
            self.spread.labels(slot.version).set(spread)

    def report(self, version: str) -> dict[str, Any]:
        """``GET /v1/models/{version}/quality``'s body."""
        q = self.versions.get(version) or VersionQuality(None)
        drift: dict[str, Any] | None = None
        if q.sums is not None:
            shift, spread = drift_scores(q.sums)
            drift = {"mean_shift": round(shift, 6), "spread_ratio": round(spread, 6),
                     "half_life_instances": self.half_life,
                     "reference": "the federated feature moments the members standardise "
                                  "with"}
        total = max(q.instances, 1)
        return {"model_version": version, "instances": q.instances,
                "predicted_classes": {k: round(v / total, 6)
                                      for k, v in sorted(q.classes.items())},
                "mean_confidence": round(q.confidence_sum / total, 6) if q.instances
                else None,
                "drift": drift}

