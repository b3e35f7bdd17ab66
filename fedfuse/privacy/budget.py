"""The site's side of a private round: what the coordinator asks (``dp-*`` keys), the
site's ledger opened under its own budget rule, and the round planned against it.

The site enforces its budget itself: a later request can lower the budget stored in its
ledger, never raise it; a round that would take ε over the budget is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedfuse.errors import FedfuseError
from fedfuse.privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise,
    default_delta,
    steps_per_epoch,
)
from fedfuse.privacy.ledger import LedgerStore, PrivacyLedger


@dataclass(frozen=True)
class PrivacyRequest:
    """The privacy settings a coordinator sends with every train message (``dp-*`` keys).

    The site enforces its budget itself: a later request can lower the budget stored
    in its ledger, never raise it.
    """

    mode: str
    accountant: str
    max_grad_norm: float
    planned_rounds: int
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    budget: float | None = None
    delta: float | None = None

    _KEYS = {"target_epsilon": "dp-target-epsilon", "noise_multiplier": "dp-noise-multiplier",
             "budget": "dp-budget", "delta": "dp-delta"}

    def to_config(self) -> dict[str, Any]:
        items: dict[str, Any] = {"dp-mode": self.mode, "dp-accountant": self.accountant,
                                 "dp-max-grad-norm": self.max_grad_norm,
                                 "dp-planned-rounds": self.planned_rounds}
        for attr, key in self._KEYS.items():
            if getattr(self, attr) is not None:
                items[key] = float(getattr(self, attr))
        return items

    @classmethod
    def from_config(cls, config: Any) -> PrivacyRequest | None:
        """The request in a train message's ConfigRecord; ``None`` when DP is off."""
        if str(config.get("dp-mode", "off")) != "sample":
            return None
        optional = {attr: float(config[key]) for attr, key in cls._KEYS.items()
                    if key in config}
        return cls(mode="sample", accountant=checked_accountant(str(config["dp-accountant"])),
                   max_grad_norm=float(config["dp-max-grad-norm"]),
                   planned_rounds=int(config["dp-planned-rounds"]), **optional)


def checked_accountant(name: str) -> str:
    """``name`` if it bounds ε from above (:data:`ACCOUNTANTS`); a site refuses any other
    (Opacus's ``gdp`` approximates, so it could release more than the budget)."""
    if name not in ACCOUNTANTS:
        raise FedfuseError(f"the request's accountant {name!r} gives no upper bound on ε; "
                           f"this site accounts with {', '.join(ACCOUNTANTS)}")
    return name


def open_ledger(store: LedgerStore, request: PrivacyRequest, n: int) -> PrivacyLedger:
    """The site's ledger (created on first use); its budget only ever goes down."""
    ledger = store.load()
    if ledger is None:
        delta = request.delta if request.delta is not None else default_delta(n)
        ledger = PrivacyLedger(request.accountant, delta, request.budget)
    elif request.budget is not None:
        ledger.budget = min(request.budget, ledger.budget or math.inf)
    if ledger.delta >= 1.0 / n:
        raise FedfuseError(f"privacy.delta = {ledger.delta:g} is not below 1/n = {1.0 / n:g} "
                           f"for this site's {n} training records")
    return ledger


@dataclass(frozen=True)
class PrivateRound:
    """One site's planned round under DP-SGD: σ, q, steps, and whether they would take
    ε over the budget."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    exhausted: bool


def plan_round(ledger: PrivacyLedger, request: PrivacyRequest, n: int, batch_size: int,
               epochs: int) -> PrivateRound:
    """σ (calibrated once, on the first private round, for all planned rounds), the
    Poisson rate ``q = 1/⌈n/B⌉``, this round's ``epochs·⌈n/B⌉`` steps, and whether they
    would take ε over the budget."""
    per_epoch = steps_per_epoch(n, batch_size)
    q, steps = 1.0 / per_epoch, epochs * per_epoch
    if ledger.noise_multiplier is None:
        if request.noise_multiplier is not None:
            ledger.noise_multiplier = request.noise_multiplier
        elif request.target_epsilon is not None:
            ledger.noise_multiplier = calibrate_noise(request.target_epsilon, ledger.delta, q,
                                                      request.planned_rounds * steps,
                                                      ledger.accountant)
        else:
            raise FedfuseError("the privacy request names neither a target ε nor a noise "
                               "multiplier")
    sigma = ledger.noise_multiplier
    return PrivateRound(sigma, q, steps, ledger.would_exceed(sigma, q, steps))


def report(ledger: PrivacyLedger, plan: PrivateRound, status: str) -> dict[str, Any]:
    """A site's privacy figures as sent to the coordinator after each round (the sample
    rate is the planned one when no step has been spent yet)."""
    return {"status": status, "epsilon": ledger.epsilon(), "delta": ledger.delta,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": float(ledger.sample_rate or plan.sample_rate),
            "steps": ledger.steps,
            "accountant": ledger.accountant,
            "budget": -1.0 if ledger.budget is None else float(ledger.budget)}
