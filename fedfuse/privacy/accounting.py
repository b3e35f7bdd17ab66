"""Privacy accounting, pure math: δ defaults, Poisson steps, ε of a history, σ for a target ε.

A history is the accountant's list of ``(σ, q, steps)`` entries; the cumulative ε after
``T`` DP-SGD steps with sampling rate ``q`` and noise multiplier ``σ`` is Opacus's
``ε(δ) = min_α [ RDP_α(σ, q)·T + log(1/δ)/(α−1) ]`` (RDP) or the PRV bound (``prv``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

HistoryEntry = tuple[float, float, int]
"""One accountant entry: (noise multiplier σ, sample rate q, number of steps)."""


def default_delta(n: int) -> float:
    """The largest power of ten strictly below ``1/(10·n)``: δ = 10^-(⌊log10(10n)⌋+1)."""
    return 10.0 ** -(math.floor(math.log10(10 * n)) + 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Opacus's Poisson loader draws ``⌈n/B⌉`` batches per epoch at rate ``q = 1/⌈n/B⌉``."""
    return math.ceil(n / batch_size)


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Cumulative ε at ``delta`` of the composed ``history`` under Opacus's ``accountant``.

    For RDP this is Opacus's ``RDPAccountant.get_epsilon`` computed from cached
    per-step RDP curves: ``RDP_α(history) = Σ steps·RDP_α(σ, q)`` is exact, and the
    per-step curve (slow in pure Python) is computed once per (σ, q).
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(int(t) * _rdp_per_step(float(s), float(q)) for s, q, t in history)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
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


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """The smallest σ (to Opacus's tolerance) whose ``steps`` at rate ``sample_rate``
    spend at most ``target_epsilon`` at ``delta`` (cached: sites with the same sampling
    rate and step count share the search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.005))
