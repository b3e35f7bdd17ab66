"""Model registry: architectures of different families, each built from a :class:`DataSchema`.

Every model starts with a :class:`Standardize` layer whose mean/std buffers are set from
federated statistics, so a saved model takes raw features. No BatchNorm anywhere:
models must stay compatible with per-sample gradient clipping (DP-SGD).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfuse.data.datasets import DataSchema
from fedfuse.errors import ConfigError, FedfuseError
from fedfuse.models.factory import make_body
from fedfuse.models.scattering import front_end
from fedfuse.models.spec import BUILTINS, OWN_CODE, CodeAllowance, ModelSpec


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
    """Multinomial logistic regression: ``softmax(W z + b)`` over the input, ``z = x``,
    or with ``scattering`` = J > 0 over its fixed scattering features
    (``fedfuse.models.scattering.front_end``: Tramèr & Boneh's ScatterNet+linear)."""

    def __init__(self, schema: DataSchema, scattering: int = 0) -> None:
        super().__init__()
        self.front, shape = front_end(schema.input_shape, scattering)
        self.linear = nn.Linear(math.prod(shape), schema.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.front(x).flatten(1))


class MLP(nn.Module):
    """Tanh hidden layers of ``hidden`` units (one width, or a list of widths: one layer
    each); the default, one layer of 32, is kept narrow so DP-SGD's noise (which grows
    with the parameter count) stays small. ``scattering`` = J > 0: over the input's
    fixed scattering features, as :class:`LogisticRegression`."""

    def __init__(self, schema: DataSchema, hidden: int | list[int] = 32,
                 scattering: int = 0) -> None:
        super().__init__()
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths or any(not isinstance(n, int) or n < 1 for n in widths):
            raise ValueError(f"hidden must be a positive integer or a list of them, "
                             f"got {hidden!r}")
        self.front, shape = front_end(schema.input_shape, scattering)
        layers: list[nn.Module] = []
        width = math.prod(shape)
        for n in widths:
            layers += [nn.Linear(width, n), nn.Tanh()]
            width = n
        self.net = nn.Sequential(*layers, nn.Linear(width, schema.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.front(x).flatten(1))


class SmallCNN(nn.Module):
    """Convolutional blocks (3x3 convolution, tanh, 2x2 average pool) and a linear
    read-out, for (C, H, W) input; ``channels`` is one block's width or a list of widths,
    one block each (``[16, 32]``), and ``groups`` > 0 puts a GroupNorm of that many groups
    after each convolution (BatchNorm cannot be trained with DP-SGD).

    ``scattering`` = J > 0 puts a fixed scattering transform of J scales in front
    (``fedfuse.models.scattering.front_end``: 81 wavelet maps per channel at ``1/2^J``
    resolution for J = 2, normalised by a GroupNorm without parameters): Tramèr &
    Boneh's (2021) ScatterNet+CNN. Its filters are not trained, so they receive no DP
    noise; ``channels`` may then be empty (``[]``: a linear read-out over the
    scattering features, their ScatterNet+linear).

    The default on small images, one 8-channel block, is small on purpose: under DP-SGD
    every parameter receives noise, and on 8x8 digits this model beats wider ones at
    ε = 8. Tanh rather than ReLU for the same reason as the MLP's (bounded activations
    lose less to clipping; see docs/privacy.md)."""

    def __init__(self, schema: DataSchema, channels: int | list[int] = 8,
                 groups: int = 0, scattering: int = 0) -> None:
        super().__init__()
        widths = [channels] if isinstance(channels, int) else list(channels)
        if (not widths and not scattering) or any(not isinstance(n, int) or n < 1
                                                   for n in widths):
            raise ValueError(f"channels must be a positive integer or a list of them "
                             f"(empty only after a scattering), got {channels!r}")
        self.front, (c, h, w) = front_end(schema.input_shape, scattering)
        if len(widths) > 1 and min(h, w) >> len(widths) < 1:
            raise ValueError(f"{len(widths)} blocks halve a {h}x{w} input below one pixel")
        layers: list[nn.Module] = []
        for width in widths:
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if groups:
                if width % groups:
                    raise ValueError(f"groups = {groups} does not divide {width} channels")
                layers.append(nn.GroupNorm(groups, width))
            layers += [nn.Tanh(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, schema.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.front(x)))


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    build: Callable[..., nn.Module]
    """``build(schema, **params)``: the model body."""
    default_lr: float
    """Local SGD learning rate without DP (momentum 0.9, batch 16)."""
    dp_lr: float
    """Local learning rate under DP-SGD (no momentum, batch 32, clipping at 1.0)."""
    dp_lr_scattering: float
    """The same with a scattering front end (``params.scattering`` > 0)."""
    needs_image: bool = False

    def lr(self, private: bool, scattering: bool = False) -> float:
        if not private:
            return self.default_lr
        return self.dp_lr_scattering if scattering else self.dp_lr


REGISTRY: dict[str, Architecture] = {
    a.name: a for a in (
        Architecture("logreg", "linear", LogisticRegression, default_lr=0.05, dp_lr=0.5,
                     dp_lr_scattering=0.5),
        Architecture("mlp", "dense network", MLP, default_lr=0.05, dp_lr=1.0,
                     dp_lr_scattering=0.5),
        Architecture("cnn", "convolutional network", SmallCNN, default_lr=0.05, dp_lr=1.0,
                     dp_lr_scattering=0.5, needs_image=True),
    )
}
assert tuple(REGISTRY) == BUILTINS

def fitted_params(arch: str, schema: DataSchema) -> dict[str, Any]:
    """A built-in's default ``params`` for these data (a cohort's own ``params`` go on
    top). On images the built-ins put a fixed scattering front end before their trained
    layers (Tramèr & Boneh 2021; docs/models.md has the measurements): on images of at
    least 16 pixels a side 2 scales for all three, the ``cnn`` with one block of 16
    channels (ScatterNet+CNN); on smaller ones of at least 8 pixels only the ``cnn``
    gets one, 1 scale and a linear read-out (ScatterNet+linear: on 8x8 digits at ε = 8
    it beat the one trained block of 8 channels by 2.0 points fused, mean of seeds
    7-12), and ``mlp`` and ``logreg`` keep the pixels. Smaller images and other data
    keep the plain models."""
    side = min(schema.input_shape[1:]) if schema.is_image else 0
    if side >= 16:
        return {"scattering": 2, "channels": [16]} if arch == "cnn" else {"scattering": 2}
    if side >= 8 and arch == "cnn":
        return {"scattering": 1, "channels": []}
    return {}


def resolved(spec: ModelSpec, schema: DataSchema) -> ModelSpec:
    """``spec`` with a built-in's fitted defaults written out (what an artifact records,
    so that it loads the same model whatever later defaults become)."""
    if not spec.is_builtin:
        return spec
    return ModelSpec(spec.arch, {**fitted_params(spec.arch, schema), **spec.params}, spec.fix)


def as_recorded(spec: ModelSpec) -> ModelSpec:
    """A built-in ``spec`` read from an artifact, with every parameter its class takes
    and the record lacks set to the class's own default, never to a fitted default: an
    artifact records a built-in's resolved params, so a key missing from the record was
    not fitted when it was made (the ``cnn`` of artifacts before issue 24 has one block
    of 8 channels on any input; before the scattering front end, none). A user
    factory's spec is returned as it is."""
    if not spec.is_builtin:
        return spec
    signature = inspect.signature(REGISTRY[spec.arch].build)
    defaults = {name: p.default for name, p in list(signature.parameters.items())[1:]
                if p.default is not inspect.Parameter.empty}
    return ModelSpec(spec.arch, {**defaults, **spec.params}, spec.fix)


USER_LR = (0.05, 0.5)
"""A user factory's learning rates (without, with DP) when its cohort sets no ``lr``."""


def family(spec: ModelSpec) -> str:
    return REGISTRY[spec.arch].family if spec.is_builtin else f"user factory {spec.arch}"


def learning_rate(spec: ModelSpec, private: bool, schema: DataSchema) -> float:
    """The tuned default for a built-in as it is built for ``schema`` (under DP-SGD a
    front end of fixed scattering features takes its own rate); :data:`USER_LR` for a
    user factory."""
    if spec.is_builtin:
        scattering = bool(resolved(spec, schema).params.get("scattering"))
        return REGISTRY[spec.arch].lr(private, scattering)
    return USER_LR[1] if private else USER_LR[0]


def check_compatible(spec: ModelSpec | str, schema: DataSchema, key: str = "arch") -> None:
    """Refuse a reference that is neither a built-in nor an import path, and a built-in
    that cannot take inputs of ``schema.input_shape`` (a user factory is checked by
    building it: ``fedfuse.models.factory.check_body``)."""
    spec = as_spec(spec)
    problem = spec.problem()
    if problem:
        raise ConfigError(key, problem)
    if spec.is_builtin and REGISTRY[spec.arch].needs_image and not schema.is_image:
        raise ConfigError(key, f"architecture {spec.arch!r} needs image-shaped input "
                          f"(C, H, W); the data have shape {tuple(schema.input_shape)}")


def as_spec(spec: ModelSpec | str) -> ModelSpec:
    return ModelSpec(spec) if isinstance(spec, str) else spec


def build_model(spec: ModelSpec | str, schema: DataSchema, seed: int | None = None,
                code: CodeAllowance = OWN_CODE, key: str = "arch") -> nn.Sequential:
    """``Standardize`` followed by the architecture's body, with seeded initial weights;
    a built-in starts with a zero read-out layer, a user factory with its own
    initialisation. ``code`` says which user factories may be imported."""
    spec = as_spec(spec)
    if seed is not None:
        torch.manual_seed(seed)
    body = make_body(spec, schema, code, key)
    if spec.is_builtin:
        zero_readout(body)
    return nn.Sequential(Standardize(schema.input_shape), body)


def zero_readout(body: nn.Module) -> None:
    """Start the last linear layer (the one that outputs the logits) at zero, so every
    model first predicts the uniform distribution instead of a random one. On the default
    scenario at ε = 8 it raised each cohort by 0–2 points (docs/privacy.md). For
    ``logreg`` the read-out is the whole model, so its start no longer depends on the
    seed. A model without a linear layer is left as it is."""
    layer = readout(body)
    if layer is not None:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def readout(model: nn.Module) -> nn.Linear | None:
    """The model's read-out, its last linear layer (the one that outputs the logits), or
    ``None`` for a model without one."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def set_standardization(model: nn.Sequential, mean: np.ndarray, std: np.ndarray) -> None:
    layer = model[0]
    assert isinstance(layer, Standardize)
    layer.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).reshape(layer.mean.shape))
    layer.std.copy_(torch.as_tensor(std, dtype=torch.float32).reshape(layer.std.shape))


def shapes_digest(model: nn.Module) -> str:
    """``SHA-256`` of the model's state names and shapes, in order: two processes whose
    digests agree build models that take each other's weights."""
    layout = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(spec: ModelSpec | str, schema: DataSchema, state: Mapping[str, torch.Tensor],
               code: CodeAllowance = OWN_CODE, key: str = "arch") -> nn.Sequential:
    """``spec``'s model for ``schema`` with the weights and buffers of ``state``; refuses
    a state of other parameter names or shapes, naming the first difference."""
    model = build_model(spec, schema, code=code, key=key)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FedfuseError(f"{key}: the weights do not fit the model of "
                           f"{as_spec(spec).arch!r}: {str(exc).splitlines()[-1].strip()}"
                           ) from None
    return model
