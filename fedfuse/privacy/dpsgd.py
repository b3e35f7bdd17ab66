"""DP-SGD around the plain training loop, following Opacus's ``PrivacyEngine`` pattern.

:func:`make_private` wraps an ordinary model, optimiser and loader (Poisson sampling,
per-sample clipping to ``max_grad_norm``, Gaussian noise of std ``σ·max_grad_norm``),
and :func:`fedfuse.models.training.train_epochs` runs unchanged on the wrapped triple.
The noise is seeded from the site's secret (:func:`noise_seed`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedfuse.models.device import model_device
from fedfuse.privacy.accounting import HistoryEntry


def noise_seed(secret: bytes, round_seed: int) -> int:
    """A 63-bit seed for a round's sampling and noise, ``SHA-256(secret ‖ round_seed)``.

    The site's secret never leaves the site, so the coordinator (which chose
    ``round_seed``) cannot regenerate the noise and subtract it.
    """
    digest = hashlib.sha256(secret + round_seed.to_bytes(8, "big", signed=True)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def request_noise_seed(secret: bytes, request: str) -> int:
    """A 63-bit seed for a round's sampling and noise, ``HMAC-SHA256(secret, request)``,
    where ``request`` is the key of the whole train request (its received weights and
    configuration, ``fedfuse.site.replay.request_key``).

    The same request gets the same noise (a replayed or resumed round is bit-exact, and
    the replay store answers it without a second charge); any other request gets noise
    unrelated to it, whatever seed the coordinator names. So a coordinator that sends
    two requests with one seed and different weights cannot subtract the noise out
    (with ``noise_seed``, seeded by the round's seed alone, it could).
    """
    digest = hmac.new(secret, request.encode(), hashlib.sha256).digest()
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

    Opacus has no ``pld`` accountant: for it the engine gets an ``rdp`` one, used only
    to record the ``(σ, q, steps)`` history (same format); ε is ``epsilon_of``'s.
    """
    from opacus import PrivacyEngine

    device = model_device(model)
    noise = (generator if device.type == "cpu" else
             torch.Generator(device=device).manual_seed(generator.initial_seed()))
    engine = PrivacyEngine(accountant="rdp" if accountant == "pld" else accountant)
    engine.accountant.history = [tuple(h) for h in history]
    loader = DataLoader(loader.dataset, batch_size=loader.batch_size, generator=generator,
                        collate_fn=loader.collate_fn)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, noise_generator=noise, grad_sample_mode="ew")
    return model, optimizer, loader, engine
