"""Client-level ("user-level") DP: ``privacy.mode = "user"``.

This is DP-FedAvg with fixed clipping (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"), the mechanism of Flower's
``DifferentialPrivacyClientSideFixedClipping`` wrapper, run per cohort:

- site i trains without noise and clips its update, ``Δ_i ← Δ_i · min(1, C / ‖Δ_i‖₂)``;
- it counts once in the average (weight 1, not its example count n_i);
- the coordinator releases ``w ← w + (Σ_i Δ_i + N(0, σ²C² I)) / m`` with ``m`` the number
  of sites the round sampled (a fixed denominator, so a site that drops out cannot raise
  another's weight).

Adding or removing all of one site's records changes ``Σ_i Δ_i`` by at most C in L2, so
each release is the Gaussian mechanism with noise multiplier σ. The cohort's releases
compose in the accountant as ``(σ, q = 1, 1)`` entries: no amplification by sampling is
claimed, as in Flower's accounted wrappers. The clipping is done by the sites; the
coordinator re-clips every update it can see (without secure aggregation), and with
secure aggregation it sees only the sum, to which it adds the noise.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedfuse import wire
from fedfuse.privacy.accounting import calibrate_noise, default_delta
from fedfuse.privacy.ledger import PrivacyLedger

SAMPLE_RATE = 1.0
"""Each release is charged to every site of the cohort, sampled or not."""


def clip_update(delta: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """``Δ · min(1, C / ‖Δ‖₂)`` with ‖Δ‖₂ over all tensors; returns it and ‖Δ‖₂."""
    norm = math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta))
    scale = min(1.0, clip / norm) if norm > 0.0 else 1.0
    return [d * scale for d in delta], norm


def noisy_mean(total: list[np.ndarray], sampled: int, noise_multiplier: float, clip: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    """The private cohort update ``(Σ_i Δ_i + N(0, σ²C² I)) / m`` from ``total = Σ_i Δ_i``
    and ``m = sampled``."""
    std = noise_multiplier * clip
    return [(t + rng.normal(0.0, std, size=t.shape)) / sampled for t in total]


def cohort_ledger(accountant: str, delta: float | None, budget: float | None,
                  target_epsilon: float | None, noise_multiplier: float | None,
                  sites: int, planned_rounds: int) -> PrivacyLedger:
    """A cohort's client-level account: δ defaults to a power of ten below 1/(10·sites);
    σ is the given one, or calibrated so ``planned_rounds`` releases spend
    ``target_epsilon``."""
    d = delta if delta is not None else default_delta(sites)
    if noise_multiplier is not None:
        sigma = noise_multiplier
    elif target_epsilon is not None:
        sigma = calibrate_noise(target_epsilon, d, SAMPLE_RATE, planned_rounds, accountant)
    else:
        raise ValueError("client-level DP needs a target ε or a noise multiplier")
    return PrivacyLedger(accountant, d, budget, sigma)


def release(arrays: ArrayRecord, updates: list[Message], sent: list[Message],
            ledger: PrivacyLedger, clip: float, rng: np.random.Generator,
            secure: bool) -> Message | None:
    """One private release of a cohort from its train replies:
    ``w + noisy_mean(Σ_r n_r (w_r - w))`` with ``m = len(sent)`` (the round's train
    messages), as a single reply for the cohort's strategy, and the release charged to
    ``ledger``. Without secure aggregation (``secure`` false) each reply is one site's
    update: ``n_r = 1`` whatever it claims, and it is clipped to C here. With it, the one
    reply is the sum of the sites it counts (``n_r`` = its ``num-examples``), each
    clipped by its site. None when no reply carries an update (nothing is released or
    charged)."""
    valid = [u for u in updates if not u.has_error()]
    if not valid:
        return None
    base = [a.numpy().astype(np.float64) for a in arrays.values()]
    total = [np.zeros_like(b) for b in base]
    count, loss, accuracy = 0, 0.0, 0.0
    for reply in valid:
        metrics = wire.metrics(reply)
        n = wire.as_int(metrics, "num-examples") if secure else 1
        delta = [a.numpy().astype(np.float64) - b
                 for a, b in zip(wire.arrays(reply, "arrays").values(), base, strict=True)]
        if not secure:
            delta, _ = clip_update(delta, clip)
        total = [t + n * d for t, d in zip(total, delta, strict=True)]
        count += n
        loss += n * wire.as_float(metrics, "train-loss")
        accuracy += n * wire.as_float(metrics, "train-accuracy")
    sigma = ledger.noise_multiplier
    assert sigma is not None, "a cohort ledger is calibrated when it is made"
    step = noisy_mean(total, len(sent), sigma, clip, rng)
    ledger.history.append((sigma, SAMPLE_RATE, 1))
    new = ArrayRecord({k: Array((b + s).astype(a.numpy().dtype))
                       for (k, a), b, s in zip(arrays.items(), base, step, strict=True)})
    return Message(RecordDict({"arrays": new, "metrics": MetricRecord({
        "num-examples": count, "train-loss": loss / count,
        "train-accuracy": accuracy / count})}), reply_to=next(
            m for m in sent if m.metadata.dst_node_id == valid[0].metadata.src_node_id))
