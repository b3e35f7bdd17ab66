"""A site's local training for one train message, on one of three paths:

- plain SGD (no DP);
- client-level DP (``dp-mode = "user"``): plain SGD, then the update is clipped to the
  clipping norm and counts once (``fedfuse.privacy.client_level``); the site keeps its
  own lifetime account of the coordinator's releases it takes part in (across runs, like
  the record-level one) and declines one that would exceed its budget;
- record-level DP-SGD (``dp-mode = "sample"``): the site opens its own ledger, plans the
  round against its budget (``fedfuse.privacy.budget``), trains through Opacus
  (``fedfuse.privacy.dpsgd``) and charges the ledger before the update leaves; a repeated
  request is answered from the replay store without a second charge
  (``fedfuse.site.replay``), and a round over budget is declined.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message

from fedfuse import wire
from fedfuse.data.sites import Site
from fedfuse.models.device import resolve_device
from fedfuse.models.training import LoopResult, make_loader, make_optimizer, train_epochs
from fedfuse.privacy.budget import (
    PrivacyRequest,
    PrivateRound,
    checked_accountant,
    open_ledger,
    plan_round,
    report,
)
from fedfuse.privacy.client_level import clip_update
from fedfuse.privacy.dpsgd import make_private, noise_seed, request_noise_seed
from fedfuse.privacy.ledger import LedgerStore, PrivacyLedger, ledger_store_for
from fedfuse.site.members import trainee
from fedfuse.site.policy import capped_budget
from fedfuse.site.replay import ReplayStore, request_key
from fedfuse.wire import WireError

MAX_PROXIMAL_MU = 1000.0
"""The largest FedProx coefficient a site accepts (the step shrinks toward the received
weights by ``lr * mu``: beyond this it only overshoots)."""


@dataclass
class Trained:
    """What a site's training produced: the trained model and its loop figures, the
    reply's weight (None: its training examples), and its privacy figures under DP.
    ``model`` is None when the site declined (its budget would be exceeded)."""

    model: torch.nn.Module | None
    result: LoopResult | None
    seed: int
    weight: int | None = None
    privacy: dict[str, Any] | None = None


def train(msg: Message, context: Context, site: Site) -> Trained:
    """Train what ``msg`` asks on this site's data, on the path its config names."""
    cfg = wire.config(msg, "config")
    model, X = trainee(msg, site)
    seed = wire.as_int(cfg, "seed") + 7919 * site.index
    # CPU generator only: torch.manual_seed also queues a CUDA seeding call, with a
    # stack trace, on every call (about 0.75 ms each here)
    torch.random.default_generator.manual_seed(seed)
    loader = make_loader(X, site.train.y, wire.as_int(cfg, "batch-size"), seed=seed)
    optimizer = make_optimizer(model, wire.as_float(cfg, "lr"), wire.as_float(cfg, "momentum"),
                               wire.as_float(cfg, "weight-decay"))
    request = PrivacyRequest.from_config(cfg)
    if request is not None and site.policy is not None:  # the site's law caps the request
        request = replace(request, budget=capped_budget(site.policy, request.budget))
    if request is not None:
        return train_private(msg, context, site, request, model, loader, optimizer, seed)
    if cfg.get("dp-mode", "off") == "user" and \
            (declined := client_level_declined(context, site, cfg)) is not None:
        return declined
    result = train_epochs(model.to(resolve_device(site.device)), loader, optimizer,
                          wire.as_int(cfg, "local-epochs"), proximal_mu(cfg))
    model.cpu()
    if cfg.get("dp-mode", "off") == "user":
        clip_to(model, wire.arrays(msg, "arrays"), wire.as_float(cfg, "dp-clipping-norm"))
        return Trained(model, result, seed, weight=1)
    return Trained(model, result, seed)


def proximal_mu(cfg: Any) -> float:
    """FedProx's ``proximal-mu`` (0 when the request has none), a finite number in
    [0, 1000]; anything else is refused."""
    if "proximal-mu" not in cfg:
        return 0.0
    mu = wire.as_float(cfg, "proximal-mu")
    if not (math.isfinite(mu) and 0.0 <= mu <= MAX_PROXIMAL_MU):
        raise WireError(f"field 'proximal-mu' must be in [0, {MAX_PROXIMAL_MU:g}], got {mu}")
    return mu


def client_level_declined(context: Context, site: Site, cfg: Any) -> Trained | None:
    """Charge this site's client-level account with the release its update goes into,
    (σ, q = 1, 1): a release it is not in does not depend on its data. None if charged;
    the decline (with its report) if the release would exceed the budget (the policy's
    lifetime ε, else the request's)."""
    sigma = wire.as_float(cfg, "dp-noise-multiplier")
    if not (math.isfinite(sigma) and sigma > 0):
        raise WireError(f"client-level DP with noise multiplier {sigma}: no noise")
    requested = None if cfg.get("dp-budget") is None else wire.as_float(cfg, "dp-budget")
    budget = requested if site.policy is None else capped_budget(site.policy, requested)
    store = ledger_store_for(site.state_dir, context, "client-level-ledger")
    with store.held():
        accountant = checked_accountant(str(cfg.get("dp-accountant", "rdp")))
        ledger = store.load() or PrivacyLedger(accountant,
                                               wire.as_float(cfg, "dp-delta"), budget)
        if budget is not None:
            ledger.budget = min(budget, ledger.budget or math.inf)
        if ledger.would_exceed(sigma, 1.0, 1):
            ledger.refused_rounds.append(wire.as_int(cfg, "server-round"))
            store.save(ledger)
            return Trained(None, None, 0, privacy=report(
                ledger, PrivateRound(sigma, 1.0, 1, exhausted=True), "budget-exhausted"))
        ledger.history.append((sigma, 1.0, 1))
        store.save(ledger)  # spent before the update leaves the site
    return None


def train_private(msg: Message, context: Context, site: Site, request: PrivacyRequest,
                  model: torch.nn.Module, loader: torch.utils.data.DataLoader,
                  optimizer: torch.optim.Optimizer, seed: int) -> Trained:
    """Record-level DP-SGD under the site's own ledger, or the stored answer to this
    very request, or a refusal when the round would exceed the budget."""
    store = ledger_store_for(site.state_dir, context)
    with store.held():  # from reading the balance to charging it
        return charged_round(msg, site, request, model, loader, optimizer, seed, store)


def charged_round(msg: Message, site: Site, request: PrivacyRequest, model: torch.nn.Module,
                  loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                  seed: int, store: LedgerStore) -> Trained:
    """``train_private``'s round, with the ledger held."""
    cfg = wire.config(msg, "config")
    batch_size, epochs = wire.as_int(cfg, "batch-size"), wire.as_int(cfg, "local-epochs")
    ledger = open_ledger(store, request, len(site.train))
    plan = plan_round(ledger, request, len(site.train), batch_size, epochs)
    replays, key = None, request_key(wire.arrays(msg, "arrays"), cfg)
    if site.state_dir is not None:  # without a state directory nothing outlives a crash
        replays = ReplayStore(site.state_dir / "replay")
    stored = replays.load(key) if replays is not None else None
    if stored is not None and {"loop", "privacy"} <= set(stored[1]):
        state, saved = stored  # this very request was trained and charged before
        model.load_state_dict(state)
        # the same answer as the first time, privacy figures included (the ledger may
        # have been charged for later rounds since; it stays as it is)
        return Trained(model, LoopResult(**saved["loop"]), seed, privacy=saved["privacy"])
    if plan.exhausted:
        ledger.refused_rounds.append(wire.as_int(cfg, "server-round"))
        store.save(ledger)
        return Trained(None, None, seed, privacy=report(ledger, plan, "budget-exhausted"))
    generator = torch.Generator().manual_seed(
        request_noise_seed(site.secret, key) if site.noise == "request"
        else noise_seed(site.secret, seed))
    dp_model, dp_optimizer, dp_loader, engine = make_private(
        model.to(resolve_device(site.device)), optimizer, loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=request.max_grad_norm,
        accountant=ledger.accountant, history=ledger.history, generator=generator)
    result = train_epochs(dp_model, dp_loader, dp_optimizer, epochs, proximal_mu(cfg))
    model.cpu()
    ledger.history = [tuple(h) for h in engine.accountant.history]
    store.save(ledger)  # spent before the update leaves the site
    privacy = report(ledger, plan, "trained")
    if replays is not None:
        replays.save(key, model.state_dict(), {"loop": asdict(result), "privacy": privacy})
    return Trained(model, result, seed, privacy=privacy)


def clip_to(model: torch.nn.Module, received: ArrayRecord, clip: float) -> None:
    """Set ``model`` to ``w + clip_update(w_trained - w)`` (norm at most ``clip``)."""
    state = model.state_dict()
    delta = [state[k].detach().cpu().numpy().astype(np.float64) - a.numpy()
             for k, a in received.items()]
    clipped, _ = clip_update(delta, clip)
    model.load_state_dict({k: torch.as_tensor(a.numpy() + d, dtype=state[k].dtype)
                           for (k, a), d in zip(received.items(), clipped, strict=True)})
