"""Model-quality monitoring of the served versions: what they predict, how sure they are,
and how far the inputs have drifted from the data they were trained on.

The reference is the federated feature moments every member standardises its inputs
with (``Standardize``: the sites' pooled per-feature mean and std, in the artifact; a
compressed ONNX version carries its source's in its manifest).
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

from fedfuse.serving.registry import ModelSlot

FLUSH_ROWS = 4096
"""Noted rows that trigger a fold even without a scrape (bounds the memory held)."""
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


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
        self.pending: list[tuple[ModelSlot, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.predicted = Counter("fedfuse_predicted_class_total", "Instances answered, by "
                                 "version and predicted class", ["version", "label"],
                                 registry=registry)
        self.confidence = Histogram("fedfuse_prediction_confidence", "Top-class probability "
                                    "of each answered instance", ["version"],
                                    buckets=CONFIDENCE_BUCKETS, registry=registry)
        self.mean_shift = Gauge("fedfuse_input_drift_mean_shift", "RMS over features of the "
                                "recent inputs' mean, in training standard deviations",
                                ["version"], registry=registry,
                                multiprocess_mode="mostrecent")
        self.spread = Gauge("fedfuse_input_drift_spread_ratio", "Mean over features of the "
                            "recent inputs' spread over the training spread", ["version"],
                            registry=registry, multiprocess_mode="mostrecent")

    def observe(self, slot: ModelSlot, x: np.ndarray, proba: np.ndarray) -> None:
        """Note one answered request of ``slot`` (inputs ``x``, answers ``proba``); the
        figures are folded in by :meth:`flush`, in bulk, off the request's path."""
        self.pending.append((slot, x, proba))
        self.pending_rows += len(x)
        if self.pending_rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Fold the noted requests into each version's figures and the Prometheus
        series (on every scrape and report, and every ``FLUSH_ROWS`` rows)."""
        pending, self.pending, self.pending_rows = self.pending, [], 0
        by_version: dict[str, list[tuple[ModelSlot, np.ndarray, np.ndarray]]] = {}
        for item in pending:
            by_version.setdefault(item[0].version, []).append(item)
        for items in by_version.values():
            slot = items[0][0]
            x = np.concatenate([i[1].reshape(len(i[1]), -1) for i in items])
            proba = np.concatenate([i[2] for i in items])
            self._fold(slot, x, proba)

    def _fold(self, slot: ModelSlot, x: np.ndarray, proba: np.ndarray) -> None:
        q = self.versions.get(slot.version)
        if q is None:
            q = self.versions[slot.version] = VersionQuality(slot.predictor.input_reference())
        classes = slot.predictor.schema.class_labels
        counts = np.bincount(proba.argmax(axis=1), minlength=len(classes))
        for index in np.flatnonzero(counts):
            label = classes[int(index)]
            q.classes[label] = q.classes.get(label, 0) + int(counts[index])
            self.predicted.labels(slot.version, label).inc(int(counts[index]))
        top = proba.max(axis=1)
        histogram = self.confidence.labels(slot.version)
        for value in top.tolist():
            histogram.observe(value)
        q.instances += len(x)
        q.confidence_sum += float(top.sum())
        if q.reference is not None:
            mean, std = q.reference
            z = (x.astype(np.float64) - mean) / std
            q.sums = decayed_update(q.sums if q.sums is not None else np.zeros((3, z.shape[1])),
                                    z, self.half_life)
            shift, spread = drift_scores(q.sums)
            self.mean_shift.labels(slot.version).set(shift)
            self.spread.labels(slot.version).set(spread)

    def report(self, version: str) -> dict[str, Any]:
        """``GET /v1/models/{version}/quality``'s body."""
        self.flush()
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

