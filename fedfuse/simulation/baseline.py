"""``fedfuse baseline``: what centralised training would have reached, the reference
that measures the cost of federation and of privacy.

Each cohort's architecture is trained on the pooled training data of the scenario's
sites (the union of their train splits, as ``plan_federation`` draws them) and scored on
the same test split the federated run is scored on. The privacy setting is translated
to one pooled run: without DP, SGD for the passes the federation makes over each site's
data (``rounds × local_epochs``); with DP (record- or client-level), one DP-SGD run of as
many epochs at the scenario's target ε and δ (δ as the sites' rule gives it for the
pooled ``n``, ``default_delta(n)``, unless ``privacy.delta`` is set; the batch, unless
``train.batch_size`` is set, by the sites' rule for the pooled ``n`` too,
``dp_batch_size(n)``), with
``σ = calibrate_noise(ε, δ, q = 1/⌈n/B⌉, epochs·⌈n/B⌉)`` under the scenario's accountant.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedfuse.config import FedfuseConfig
from fedfuse.data.datasets import Dataset, split_transfer
from fedfuse.data.sites import plan_federation
from fedfuse.data.stats import local_moments, pooled_mean_std
from fedfuse.models.registry import build_model, learning_rate, set_standardization
from fedfuse.models.training import evaluate, make_loader, make_optimizer, train_epochs
from fedfuse.privacy.accounting import (
    calibrate_noise,
    default_delta,
    epsilon_of,
    steps_per_epoch,
)
from fedfuse.privacy.dpsgd import make_private


@dataclass(frozen=True)
class CentralResult:
    """One architecture trained centrally: its test accuracy and what it spent."""

    cohort: str
    arch: str
    test_accuracy: float
    epochs: int
    train_examples: int
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    seconds: float


def pooled_data(cfg: FedfuseConfig) -> tuple[Dataset, Dataset]:
    """The union of the sites' training splits, and the federated run's test split (the
    coordinator's held-out data less any distillation transfer share)."""
    plan = plan_federation(cfg)
    train = plan.dataset.subset(np.concatenate([c.train for c in plan.federation.clients]))
    test = split_transfer(plan.test, cfg.fusion.unlabeled_fraction, cfg.seed)[0]
    return train, test


def central_epochs(cfg: FedfuseConfig) -> int:
    """The passes a federation makes over each site's data: ``rounds × local_epochs``."""
    private = cfg.privacy.mode != "off"
    local = cfg.train.resolved(private).local_epochs
    assert local is not None
    return cfg.rounds * local


def train_central(cfg: FedfuseConfig, index: int, train: Dataset, test: Dataset,
                  epochs: int | None = None) -> CentralResult:
    """Cohort ``index``'s architecture trained on ``train`` as the module docstring says,
    scored on ``test``."""
    started = time.perf_counter()
    cohort = cfg.cohorts[index]
    private = cfg.privacy.mode != "off"
    settings = cfg.train.resolved(private, len(train))
    assert settings.batch_size is not None and settings.momentum is not None
    epochs = epochs or central_epochs(cfg)
    model = build_model(cohort.model, train.schema, seed=cfg.seed * 1000 + index,
                        code=cfg.own_code, key=f"cohorts[{index}].arch")
    n, sums, sumsqs = local_moments(train.X)
    set_standardization(model, *pooled_mean_std(
        [n], [sums], [sumsqs], by_channel=cfg.data.by_channel(train.schema.is_image)))
    lr = (cohort.lr if cohort.lr is not None
          else learning_rate(cohort.model, private, train.schema))
    loader = make_loader(train.X, train.y, settings.batch_size, seed=cfg.seed)
    optimizer = make_optimizer(model, lr, settings.momentum, settings.weight_decay)
    epsilon = delta = sigma = None
    trained: torch.nn.Module = model  # DP-SGD trains Opacus's wrapper of the same weights
    engine = None
    if private:
        p = cfg.privacy
        delta = p.delta if p.delta is not None else default_delta(n)
        per_epoch = steps_per_epoch(n, settings.batch_size)
        sigma = p.noise_multiplier
        if sigma is None:
            assert p.target_epsilon is not None
            sigma = calibrate_noise(p.target_epsilon, delta, 1.0 / per_epoch,
                                    epochs * per_epoch, p.accountant)
        trained, optimizer, loader, engine = make_private(
            model, optimizer, loader, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
            accountant=p.accountant, history=[],
            generator=torch.Generator().manual_seed(cfg.seed))
    train_epochs(trained, loader, optimizer, epochs)
    if engine is not None:
        assert delta is not None
        epsilon = epsilon_of([tuple(h) for h in engine.accountant.history], delta,
                             cfg.privacy.accountant)
    accuracy = evaluate(model, test.X, test.y).accuracy
    return CentralResult(cohort.name, cohort.arch, accuracy, epochs, len(train), epsilon,
                         delta, sigma, time.perf_counter() - started)


def baseline(cfg: FedfuseConfig, epochs: int | None = None) -> dict[str, Any]:
    """Every cohort's centralised result, by cohort name, and the best accuracy: the
    ``baseline`` section of a run's summary."""
    train, test = pooled_data(cfg)
    results = [train_central(cfg, i, train, test, epochs) for i in range(len(cfg.cohorts))]
    return {"privacy": cfg.privacy.mode, "test_examples": len(test),
            "cohorts": {r.cohort: asdict(r) for r in results},
            "best_test_accuracy": max(r.test_accuracy for r in results)}


def comparison_rows(base: dict[str, Any], summary: dict[str, Any] | None
                    ) -> list[tuple[str, str, str, str]]:
    """(cohort, centralised, federated, gap) rows: each cohort, then the best
    centralised architecture against the fused model (``summary``: a run's, or None)."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    def gap(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{100 * (b - a):+.1f} pt"

    fed = (summary or {}).get("cohorts", {})
    rows = []
    for name, r in base["cohorts"].items():
        mine = fed.get(name, {}).get("test_accuracy")
        rows.append((name, pct(r["test_accuracy"]), pct(mine), gap(r["test_accuracy"], mine)))
    fused = (summary or {}).get("fused", {}).get("test_accuracy")
    best = base["best_test_accuracy"]
    rows.append(("best / fused", pct(best), pct(fused), gap(best, fused)))
    return rows
