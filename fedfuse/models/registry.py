"""Model registry: architectures of different families, each built from a :class:`DataSchema`.

Every model starts with a :class:`Standardize` layer whose mean/std buffers are set from
federated statistics, so a saved model takes raw features. No BatchNorm anywhere:
models must stay compatible with per-sample gradient clipping (DP-SGD).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedfuse.data.datasets import DataSchema
from fedfuse.errors import ConfigError


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed, non-trainable per-feature statistics."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_shape))
        self.register_buffer("std", torch.ones(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``softmax(W x + b)``."""

    def __init__(self, schema: DataSchema) -> None:
        super().__init__()
        self.linear = nn.Linear(schema.num_features, schema.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """One hidden tanh layer; kept narrow so DP-SGD's noise (which grows with the
    parameter count) stays small."""

    def __init__(self, schema: DataSchema, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(schema.num_features, hidden), nn.Tanh(),
            nn.Linear(hidden, schema.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """One 3x3 convolution, tanh, a 2x2 average pool and a linear read-out; for (C, H, W)
    input.

    Small on purpose: under DP-SGD every parameter receives noise, and on 8x8 digits this
    model beats wider ones at ε = 8. Tanh rather than ReLU for the same reason as the MLP's
    (bounded activations lose less to clipping; see docs/privacy.md)."""

    def __init__(self, schema: DataSchema, channels: int = 8) -> None:
        super().__init__()
        c, h, w = schema.input_shape
        self.features = nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.Tanh(),
                                      nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(),
                                  nn.Linear(channels * (h // 2) * (w // 2), schema.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    build: Callable[[DataSchema], nn.Module]
    default_lr: float
    """Local SGD learning rate without DP (momentum 0.9, batch 16)."""
    dp_lr: float
    """Local learning rate under DP-SGD (no momentum, batch 32, clipping at 1.0)."""
    needs_image: bool = False

    def lr(self, private: bool) -> float:
        return self.dp_lr if private else self.default_lr


REGISTRY: dict[str, Architecture] = {
    a.name: a for a in (
        Architecture("logreg", "linear", LogisticRegression, default_lr=0.05, dp_lr=0.5),
        Architecture("mlp", "dense network", MLP, default_lr=0.05, dp_lr=1.0),
        Architecture("cnn", "convolutional network", SmallCNN, default_lr=0.05, dp_lr=1.0,
                     needs_image=True),
    )
}


def get_architecture(name: str, key: str = "arch") -> Architecture:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(key, f"unknown architecture {name!r}; "
                          f"known: {', '.join(sorted(REGISTRY))}") from None


def check_compatible(name: str, schema: DataSchema, key: str = "arch") -> None:
    """Refuse an architecture that cannot take inputs of ``schema.input_shape``."""
    arch = get_architecture(name, key)
    if arch.needs_image and not schema.is_image:
        raise ConfigError(key, f"architecture {name!r} needs image-shaped input (C, H, W); "
                          f"the data have shape {tuple(schema.input_shape)}")


def build_model(name: str, schema: DataSchema, seed: int | None = None) -> nn.Sequential:
    """``Standardize`` followed by the architecture's body, with seeded initial weights and
    a zero read-out layer."""
    arch = get_architecture(name)
    if seed is not None:
        torch.manual_seed(seed)
    body = arch.build(schema)
    zero_readout(body)
    return nn.Sequential(Standardize(schema.input_shape), body)


def zero_readout(body: nn.Module) -> None:
    """Start the last linear layer (the one that outputs the logits) at zero, so every
    model first predicts the uniform distribution instead of a random one. On the default
    scenario at ε = 8 it raised each cohort by 0–2 points (docs/privacy.md). For
    ``logreg`` the read-out is the whole model, so its start no longer depends on the
    seed."""
    layer = readout(body)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def readout(model: nn.Module) -> nn.Linear:
    """The model's read-out: its last linear layer, the one that outputs the logits."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def set_standardization(model: nn.Sequential, mean: np.ndarray, std: np.ndarray) -> None:
    layer = model[0]
    assert isinstance(layer, Standardize)
    layer.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).reshape(layer.mean.shape))
    layer.std.copy_(torch.as_tensor(std, dtype=torch.float32).reshape(layer.std.shape))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(name: str, schema: DataSchema, state: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """Architecture ``name`` for ``schema`` with the weights and buffers of ``state``."""
    model = build_model(name, schema)
    model.load_state_dict(state)
    return model
