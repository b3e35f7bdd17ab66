"""Differential privacy: DP-SGD around the plain training loop, and the ε ledger.

Record-level DP (``privacy.mode = "sample"``) follows Opacus's ``PrivacyEngine`` pattern:
:func:`make_private` wraps an ordinary model, optimiser and loader (Poisson sampling,
per-sample clipping to ``max_grad_norm``, Gaussian noise of std ``σ·max_grad_norm``),
and :func:`fedfuse.training.train_epochs` runs unchanged on the wrapped triple.

A :class:`PrivacyLedger` is one site's privacy account: the accountant's history of
``(σ, q, steps)`` entries across all rounds, so the cumulative ε after ``T`` DP-SGD steps
with sampling rate ``q`` and noise multiplier ``σ`` is the accountant's
``ε(δ) = min_α [ RDP_α(σ, q)·T + log(1/δ)/(α−1) ]`` (RDP) or the PRV bound (``prv``).
The ledger survives restarts (:class:`FileLedgerStore`) and refuses a round that would
take ε over the site's budget.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedfuse.atomic import atomic_write_json
from fedfuse.config.scenario import FedfuseConfig
from fedfuse.data.datasets import DataSchema
from fedfuse.models.device import model_device
from fedfuse.errors import ConfigError, FedfuseError
from fedfuse.models.registry import build_model

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


def check_dp_compatible(model: nn.Module, arch: str) -> None:
    """Refuse a model with layers that per-sample clipping cannot handle (BatchNorm, ...)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        found = "; ".join(sorted({str(e) for e in errors}))
        raise ConfigError("privacy.mode", f"architecture {arch!r} cannot be trained with "
                          f"DP-SGD: {found}. Replace BatchNorm with GroupNorm or LayerNorm "
                          "(opacus.validators.ModuleValidator.fix does this), or set "
                          "privacy.mode = \"off\"")


@dataclass
class PrivacyLedger:
    """One site's privacy account across rounds (and restarts)."""

    accountant: str
    delta: float
    budget: float | None
    noise_multiplier: float | None = None
    """σ fixed at the first private round (calibrated once from the target ε)."""
    history: list[HistoryEntry] = field(default_factory=list)
    refused_rounds: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.history)

    @property
    def sample_rate(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε if ``steps`` more steps at (σ, q) were spent."""
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], self.delta,
                          self.accountant)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        if self.budget is None:
            return False
        return self.epsilon_after(noise_multiplier, sample_rate, steps) > self.budget * 1.0001

    def to_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "delta": self.delta, "budget": self.budget,
                "noise_multiplier": self.noise_multiplier,
                "history": [list(h) for h in self.history],
                "refused_rounds": list(self.refused_rounds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        return cls(str(d["accountant"]), float(d["delta"]),
                   None if d.get("budget") is None else float(d["budget"]),
                   None if d.get("noise_multiplier") is None else float(d["noise_multiplier"]),
                   [(float(s), float(q), int(t)) for s, q, t in d.get("history", [])],
                   [int(r) for r in d.get("refused_rounds", [])])


class LedgerStore(Protocol):
    def load(self) -> PrivacyLedger | None: ...

    def save(self, ledger: PrivacyLedger) -> None: ...


class FileLedgerStore:
    """The ledger as a JSON file in a site's state directory, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> PrivacyLedger | None:
        if not self.path.exists():
            return None
        try:
            return PrivacyLedger.from_dict(json.loads(self.path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            # Never start a fresh (empty) account over an unreadable one: that would
            # silently reset the spent budget.
            raise FedfuseError(f"privacy ledger {self.path} is unreadable ({exc}); "
                               "restore it from backup before training again") from None

    def save(self, ledger: PrivacyLedger) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, ledger.to_dict())


class RecordLedgerStore:
    """The ledger in a Flower ``Context.state`` (kept per node across rounds)."""

    KEY = "privacy-ledger"

    def __init__(self, state: Any) -> None:
        self.state = state

    def load(self) -> PrivacyLedger | None:
        if self.KEY not in self.state:
            return None
        return PrivacyLedger.from_dict(json.loads(str(self.state[self.KEY]["json"])))

    def save(self, ledger: PrivacyLedger) -> None:
        from flwr.app import ConfigRecord

        self.state[self.KEY] = ConfigRecord({"json": json.dumps(ledger.to_dict())})


def noise_seed(secret: bytes, round_seed: int) -> int:
    """A 63-bit seed for a round's sampling and noise, ``SHA-256(secret ‖ round_seed)``.

    The site's secret never leaves the site, so the coordinator (which chose
    ``round_seed``) cannot regenerate the noise and subtract it.
    """
    digest = hashlib.sha256(secret + round_seed.to_bytes(8, "big", signed=True)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
                 noise_multiplier: float, max_grad_norm: float, accountant: str,
                 history: list[HistoryEntry], generator: torch.Generator,
                 ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Any]:
    """Opacus's ``PrivacyEngine.make_private`` with the accountant resumed from ``history``.

    Per-sample gradients come from PyTorch's ExpandedWeights (``grad_sample_mode="ew"``);
    ``simulations/bench/privacy.py`` measures the DP epoch against a plain one.

    ``generator`` draws the Poisson batches; the noise comes from it too on the CPU, and
    from a generator with the same seed on the model's device otherwise.

    Returns the wrapped (model, optimiser, Poisson loader) and the engine, whose
    ``accountant.history`` is the updated history after training.
    """
    from opacus import PrivacyEngine

    device = model_device(model)
    noise = (generator if device.type == "cpu" else
             torch.Generator(device=device).manual_seed(generator.initial_seed()))
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [tuple(h) for h in history]
    loader = DataLoader(loader.dataset, batch_size=loader.batch_size, generator=generator,
                        collate_fn=loader.collate_fn)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, noise_generator=noise, grad_sample_mode="ew")
    return model, optimizer, loader, engine


# ---------------------------------------------------------------------------------------
# What the coordinator asks of a site, and the site's side of a private round


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
        return cls(mode="sample", accountant=str(config["dp-accountant"]),
                   max_grad_norm=float(config["dp-max-grad-norm"]),
                   planned_rounds=int(config["dp-planned-rounds"]), **optional)


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
        ledger.noise_multiplier = (
            request.noise_multiplier if request.noise_multiplier is not None else
            calibrate_noise(float(request.target_epsilon), ledger.delta, q,
                            request.planned_rounds * steps, ledger.accountant))
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


def ledger_store_for(state_dir: Path | None, context: Any) -> LedgerStore:
    """A site's ledger store: ``<state_dir>/privacy-ledger.json`` when the site has a
    state directory (a deployed site; a simulated one whose run keeps checkpoints), else
    the node's Flower ``Context.state``."""
    if state_dir is not None:
        return FileLedgerStore(state_dir / "privacy-ledger.json")
    return RecordLedgerStore(context.state)


def check_privacy_settings(cfg: FedfuseConfig, train_sizes: list[int],
                           schema: DataSchema) -> None:
    """Refuse, before anything runs, settings that no site could honour: a δ not below
    1/n for some site's n training records, or a cohort model DP-SGD cannot train."""
    p = cfg.privacy
    if p.mode != "sample":
        return
    smallest = min(train_sizes)
    if p.delta is not None and p.delta >= 1.0 / smallest:
        raise ConfigError("privacy.delta", f"must be below 1/n for every client; the "
                          f"smallest client has n = {smallest} training records, so δ must "
                          f"be < {1.0 / smallest:.3g} (got {p.delta:g}); leave it unset "
                          "for the default 1/(10·n) rule")
    for cohort in cfg.cohorts:
        check_dp_compatible(build_model(cohort.arch, schema), cohort.arch)
