"""Plain local training and evaluation loops (no federation, no privacy in here).

Privacy wraps these loops from the outside (Opacus's ``PrivacyEngine`` replaces the
model, optimiser and loader); the loops themselves stay ordinary PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedfuse.models.device import model_device


@dataclass(frozen=True)
class LoopResult:
    loss: float
    accuracy: float
    num_examples: int


def make_loader(X: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None,
                shuffle: bool = True) -> DataLoader:
    """A loader over in-memory tensors; ``seed`` fixes the shuffling order."""
    ds = InMemoryDataset(torch.as_tensor(X), torch.as_tensor(y))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=batched)


class InMemoryDataset(TensorDataset):
    """A :class:`TensorDataset` that hands a loader a whole batch with one indexing
    operation (``__getitems__``) instead of one ``__getitem__`` per example."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def batched(batch: Any) -> Any:
    """The loader's collate function for :class:`InMemoryDataset`: its batches arrive
    already stacked."""
    return batch


def make_optimizer(model: nn.Module, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def train_epochs(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 epochs: int, proximal_mu: float = 0.0) -> LoopResult:
    """Minimise cross-entropy for ``epochs`` passes; returns the mean loss/accuracy seen.
    Batches move to the model's device; the loader stays on the CPU. With
    ``proximal_mu`` (FedProx) each step is followed by the proximal step of
    ``mu/2 * ||w - w0||^2`` toward the weights ``w0`` training started from,
    ``w <- w0 + (w - w0) / (1 + lr * mu)`` (the implicit step: stable for any ``lr * mu``,
    where the explicit ``w - lr * mu * (w - w0)`` overshoots once ``lr * mu > 1``). It
    does not depend on the data, so under DP-SGD it comes after the clipping and noise
    and costs no privacy."""
    loss_fn = nn.CrossEntropyLoss()
    device = model_device(model)
    model.train()
    anchors = [p.detach().clone() for p in model.parameters()] if proximal_mu else []
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            if len(yb) == 0:  # Poisson sampling can draw an empty batch
                continue
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            if anchors:
                proximal_step(model, anchors, optimizer.param_groups[0]["lr"] * proximal_mu)
            total_loss += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
    return LoopResult(total_loss / max(seen, 1), correct / max(seen, 1), seen)


@torch.no_grad()
def proximal_step(model: nn.Module, anchors: list[torch.Tensor], rate: float) -> None:
    """``w <- w0 + (w - w0) / (1 + rate)`` for every parameter ``w`` and its anchor
    ``w0``: the proximal operator of ``rate/2 * ||w - w0||^2``."""
    for weight, anchor in zip(model.parameters(), anchors, strict=True):
        weight.sub_(anchor).div_(1.0 + rate).add_(anchor)


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax class probabilities, shape (n, K), computed on the model's device."""
    model.eval()
    device = model_device(model)
    out = [torch.softmax(model(torch.as_tensor(X[i:i + batch_size]).to(device)), dim=1)
           for i in range(0, len(X), batch_size)]
    return torch.cat(out).cpu().numpy()


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> LoopResult:
    """Mean cross-entropy and accuracy of ``model`` on (X, y)."""
    proba = predict_proba(model, X)
    eps = 1e-12
    loss = float(-np.log(proba[np.arange(len(y)), y] + eps).mean())
    acc = float((proba.argmax(1) == y).mean())
    return LoopResult(loss, acc, len(y))
