"""Federated stacking: a small meta-model over the members' class probabilities.

For M members with probabilities ``p_m(x)`` over K classes, the stacked predictor is

    s(x) = softmax( W z(x) + c ),   z(x) = [p_1(x); ...; p_M(x)]  (length M·K),

a multinomial logistic regression (the *head*, ``W`` of shape K × M·K) on the members'
outputs. The members stay fixed; only the head is trained, by FedAvg over every site's
training split, with each site computing ``z`` locally. Under DP the head is trained by
DP-SGD like the members: its steps are charged to the same ε ledger at the same σ, and
the noise is calibrated for the training and stacking rounds together.

The head starts at the soft vote: ``W = τ [w_1 I, ..., w_M I]``, ``c = 0`` gives logits
``τ q_w(x)``, the same argmax as ``q_w(x) = Σ w_m p_m(x)``. ``τ = ln(9 (K − 1))`` maps a
certain vote (``q_k = 1``) to probability 0.9 for that class.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fedfuse.models.training import predict_proba

HEAD = "stack"
"""The name the head travels under (``member/stack``) and the method's name."""


def build_head(num_members: int, num_classes: int) -> nn.Linear:
    """The meta-model: ``nn.Linear(M·K, K)``."""
    return nn.Linear(num_members * num_classes, num_classes)


def initial_head(weights: np.ndarray, num_classes: int) -> nn.Linear:
    """The head that reproduces the soft vote with ``weights``' decisions:
    ``W = τ [w_1 I, ..., w_M I]``, ``c = 0``, ``τ = ln(9 (K − 1))``."""
    k = num_classes
    tau = math.log(9 * max(k - 1, 1))
    head = build_head(len(weights), k)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(
            np.hstack([tau * float(w) * np.eye(k) for w in weights]), dtype=torch.float32))
        head.bias.zero_()
    return head


def load_head(state: dict[str, torch.Tensor]) -> nn.Linear:
    """A head from its state dict (its shape gives M·K and K)."""
    k, mk = state["weight"].shape
    head = nn.Linear(mk, k)
    head.load_state_dict(state)
    return head


def stack_features(members: list[nn.Module], X: np.ndarray) -> np.ndarray:
    """``z(x) = [p_1(x); ...; p_M(x)]`` for every row of ``X``: shape (n, M·K), float32."""
    return np.hstack([predict_proba(m, X) for m in members]).astype(np.float32)


class StackedModel(nn.Module):
    """The members and the head as one graph with logits ``W z(x) + c`` out, so that
    ``softmax`` of its output is ``s(x)``, as for any cohort model."""

    def __init__(self, members: list[nn.Module], head: nn.Linear) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([torch.softmax(m(x), dim=1) for m in self.members], dim=1)
        return self.head(z)


def member_shares(head_weight: np.ndarray, num_members: int) -> np.ndarray:
    """Each member's share of the head: ``‖W_m‖_F / Σ_m' ‖W_m'‖_F`` over the head's
    column blocks ``W = [W_1, ..., W_M]``. For the starting head these are the soft-vote
    weights ``w``."""
    norms = np.array([np.linalg.norm(block)
                      for block in np.split(np.asarray(head_weight), num_members, axis=1)])
    return norms / max(float(norms.sum()), 1e-12)
