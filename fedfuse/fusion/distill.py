"""Ensemble distillation in the manner of FedDF (Lin et al., 2020): the fused ensemble
teaches one compact student on unlabeled inputs the coordinator holds.

The student is trained to match the teacher's class distribution ``t(x)`` on the
transfer inputs ``x_1..x_n`` (labels are never read), minimising

    L(θ) = T² · (1/n) Σ_i KL( t_T(x_i) || softmax(f_θ(x_i) / T) ),   t_T ∝ t^(1/T),

with Adam. A seeded share of the transfer inputs is held out, and the parameters of the
step with the lowest held-out KL are kept (early stopping without labels). The teacher
is built from models that are already differentially private, so distilling them on the
coordinator's own data is post-processing: it spends no site's privacy budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedfuse.models.device import model_device


@dataclass(frozen=True)
class DistillReport:
    steps: int
    """Adam steps taken."""
    best_step: int
    """The step whose parameters were kept (0: the starting model)."""
    holdout_kl: float
    """Mean KL(teacher || student) on the held-out transfer inputs at ``best_step``."""
    start_kl: float
    """The same for the starting model."""
    transfer_examples: int


def soften(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``t_T ∝ t^(1/T)``, row-normalised (``T = 1`` leaves ``t`` unchanged)."""
    logp = np.log(np.clip(proba, 1e-12, None)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def kl_to_teacher(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · mean_i KL(target_i || softmax(logits_i / T))``."""
    logq = torch.log_softmax(logits / temperature, dim=1)
    return temperature ** 2 * nn.functional.kl_div(logq, target, reduction="batchmean")


def distill(student: nn.Module, X: np.ndarray, teacher: np.ndarray, *, steps: int,
            lr: float, temperature: float, seed: int, batch_size: int = 64,
            holdout: float = 0.2) -> tuple[nn.Module, DistillReport]:
    """A copy of ``student`` trained towards ``teacher`` (probabilities, shape (n, K)) on
    ``X``; ``student`` itself is left unchanged."""
    if len(X) != len(teacher):
        raise ValueError(f"{len(X)} transfer inputs but {len(teacher)} teacher rows")
    if len(X) < 2:
        raise ValueError("distillation needs at least 2 transfer inputs")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(X), generator=gen).numpy()
    n_hold = min(max(1, int(round(holdout * len(X)))), len(X) - 1)
    hold, fit = order[:n_hold], order[n_hold:]
    device = model_device(student)
    target = torch.as_tensor(soften(teacher, temperature), dtype=torch.float32).to(device)
    inputs = torch.as_tensor(X, dtype=torch.float32).to(device)

    model = copy.deepcopy(student)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def held_out_kl() -> float:
        model.eval()
        with torch.no_grad():
            return float(kl_to_teacher(model(inputs[hold]), target[hold], temperature))

    best_kl = start_kl = held_out_kl()
    best_state, best_step = copy.deepcopy(model.state_dict()), 0
    batch = min(batch_size, len(fit))
    for step in range(1, steps + 1):
        idx = torch.as_tensor(fit)[torch.randint(len(fit), (batch,), generator=gen)].to(device)
        model.train()
        optimizer.zero_grad()
        kl_to_teacher(model(inputs[idx]), target[idx], temperature).backward()
        optimizer.step()
        if (kl := held_out_kl()) < best_kl:
            best_kl, best_step = kl, step
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, DistillReport(steps, best_step, best_kl, start_kl, len(X))
