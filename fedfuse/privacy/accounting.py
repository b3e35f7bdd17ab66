"""Privacy accounting, pure math: δ defaults, Poisson steps, ε of a history, σ for a target ε.

A history is the accountant's list of ``(σ, q, steps)`` entries; the cumulative ε after
``T`` DP-SGD steps with sampling rate ``q`` and noise multiplier ``σ`` is Opacus's
``ε(δ) = min_α [ RDP_α(σ, q)·T + log(1/δ)/(α−1) ]`` (``rdp``), Opacus's PRV bound
(``prv``), or the privacy loss distribution bound of Google's ``dp_accounting``
(``pld``): ``ε(δ) = min{ε ≥ 0 : E[(1 − e^(ε−L))₊] ≤ δ}`` for the composed privacy loss
``L = Σ_entries Σ_steps L(σ, q)`` of the Poisson-subsampled Gaussian mechanism.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

ACCOUNTANTS = ("rdp", "prv", "pld")
"""The accountants whose ε is an upper bound (all three are; Opacus's ``gdp`` is not)."""

HistoryEntry = tuple[float, float, int]
"""One accountant entry: (noise multiplier σ, sample rate q, number of steps)."""

PLD_RESOLUTION = 0.05
"""``pld`` discretises the privacy loss in steps of about ``PLD_RESOLUTION·μ`` with
``μ = q·√(e^(1/σ²) − 1)`` the per-step scale of the subsampled Gaussian's privacy loss
(its Gaussian-DP μ): the pessimistic estimate's excess over the exact ε grows like that
ratio squared (0.1 gave 0.02–0.2 %, 0.3 gave 0.2–1.9 %, up to 30,000 steps); with 0.05
it was at most 0.054 % against a 10× finer grid (docs/privacy.md, *Accountants*)."""

PLD_INTERVAL_RANGE = (1e-5, 0.05)
"""The finest and the coarsest discretisation interval ``pld`` uses."""


def default_delta(n: int) -> float:
    """The largest power of ten strictly below ``1/(10·n)``: δ = 10^-(⌊log10(10n)⌋+1)."""
    return 10.0 ** -(math.floor(math.log10(10 * n)) + 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Opacus's Poisson loader draws ``⌈n/B⌉`` batches per epoch at rate ``q = 1/⌈n/B⌉``."""
    return math.ceil(n / batch_size)


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Cumulative ε at ``delta`` of the composed ``history`` under ``accountant``.

    For RDP this is Opacus's ``RDPAccountant.get_epsilon`` computed from cached
    per-step RDP curves: ``RDP_α(history) = Σ steps·RDP_α(σ, q)`` is exact, and the
    per-step curve (slow in pure Python) is computed once per (σ, q). For ``pld`` it is
    :func:`pld_epsilon`; any other name is Opacus's accountant of that name (``prv``),
    never reached with ``pld``.
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(int(t) * _rdp_per_step(float(s), float(q)) for s, q, t in history)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    if accountant == "pld":
        return pld_epsilon(history, delta)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                  orders=RDPAccountant.DEFAULT_ALPHAS))


def pld_interval(history: list[HistoryEntry]) -> float:
    """The discretisation interval Δ for ``history``: ``PLD_RESOLUTION·min μ`` over its
    entries (``μ = q·√(e^(1/σ²) − 1)``), rounded down to 1, 2 or 5 × 10^k and kept in
    ``PLD_INTERVAL_RANGE`` (few distinct values, so per-step PLDs are reused)."""
    lo, hi = PLD_INTERVAL_RANGE
    scales = [float(q) * math.sqrt(math.expm1(1.0 / float(s) ** 2)) if float(s) > 0.04
              else math.inf for s, q, _ in history]
    bound = min(max(PLD_RESOLUTION * min(scales, default=math.inf), lo), hi)
    power = 10.0 ** math.floor(math.log10(bound))
    return max(next(m * power for m in (5.0, 2.0, 1.0) if m * power <= bound * (1 + 1e-9)),
               lo)


def pld_epsilon(history: list[HistoryEntry], delta: float) -> float:
    """ε at ``delta`` of ``history`` under the PLD accountant (add-or-remove-one, as Opacus).

    Each entry is ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` self-composed
    ``steps`` times and the entries composed, exactly what
    ``dp_accounting.pld.PLDAccountant(value_discretization_interval=pld_interval(history))``
    computes for that event: the PLD of the subsampled Gaussian, built with the
    pessimistic (connect-the-dots) estimate, so the ε is an upper bound; its
    ``steps``-fold composition by FFT; ``ε(δ)`` by the hockey-stick divergence of the
    composed PLD. Composition commutes, so entries with equal (σ, q) are merged (their
    steps added) first. An entry with σ = 0 gives ε = ∞. Cached per (merged history, δ),
    and the per-step PLD per (σ, q, Δ).
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, t in history:
        if int(t) > 0 and float(q) > 0.0:
            key = (float(s), float(q))
            merged[key] = merged.get(key, 0) + int(t)
    return _pld_epsilon(tuple(sorted((s, q, t) for (s, q), t in merged.items())),
                        float(delta))


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(entries: tuple[HistoryEntry, ...], delta: float) -> float:
    if not entries:
        return 0.0
    if any(s <= 0.0 for s, _, _ in entries):
        return math.inf
    dx = pld_interval(list(entries))
    composed = None
    for s, q, t in entries:
        pld = _pld_per_step(s, q, dx).self_compose(t)
        composed = pld if composed is None else composed.compose(pld)
    assert composed is not None
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=64)
def _pld_per_step(noise_multiplier: float, sample_rate: float, interval: float) -> Any:
    """One step's PLD, as ``PLDAccountant`` builds it for a Poisson-sampled Gaussian."""
    # dp_accounting ships no type information (no py.typed).
    from dp_accounting.pld import privacy_loss_distribution  # type: ignore[import-untyped]
    from dp_accounting.privacy_accountant import (  # type: ignore[import-untyped]
        NeighboringRelation,
    )

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sample_rate,
        value_discretization_interval=interval, pessimistic_estimate=True,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """The smallest σ (to Opacus's tolerance) whose ``steps`` at rate ``sample_rate``
    spend at most ``target_epsilon`` at ``delta`` (cached: sites with the same sampling
    rate and step count share the search). ``rdp`` and ``prv`` use Opacus's
    ``get_noise_multiplier``; ``pld`` is :func:`_calibrate_pld`."""
    if accountant == "pld":
        return _calibrate_pld(target_epsilon, delta, sample_rate, steps)
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.005))


def _calibrate_pld(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                   tolerance: float = 0.005) -> float:
    """Bisection on σ for ``ε(σ) = epsilon_of([(σ, q, steps)], δ, "pld")``, which falls
    as σ grows: a bracket ``ε(lo) > target ≥ ε(hi)``, found by doubling or halving σ
    from 1, is bisected until ``target − ε(hi) ≤ tolerance`` (Opacus's stopping rule)
    or ``hi − lo ≤ 10⁻⁶·hi``. Returns ``hi``: its ε, the one the ledger computes for
    the same entry, is at most the target."""
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target ε must be a finite number > 0, got {target_epsilon}")

    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps)], delta, "pld")

    lo, hi = 0.0, 1.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError("the privacy budget is too low")
        eps_hi = eps(hi)
    while lo == 0.0 and hi > 1e-3 and eps(hi / 2.0) <= target_epsilon:
        hi /= 2.0
        eps_hi = eps(hi)
    if lo == 0.0:
        lo = hi / 2.0
    while target_epsilon - eps_hi > tolerance and hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2.0
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
