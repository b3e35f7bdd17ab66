"""The fedfuse ClientApp: answers the coordinator's query, train and evaluate messages.

Message layout (all keys fixed):
- query   -> ConfigRecord "site" {arch, name, input-shape, num-classes},
             MetricRecord "metrics" {num-examples, num-val, index},
             ArrayRecord "moments" {sum, sumsq} (feature sums of the training split)
- train   <- ArrayRecord "arrays", ConfigRecord "config" {lr, local-epochs, batch-size,
             momentum, weight-decay, seed, server-round}
             (+ dp-* keys under DP, see ``fedfuse.privacy.PrivacyRequest``; under
             client-level DP only dp-mode = "user" and dp-clipping-norm: the update is
             clipped to that norm and weighted 1, see ``fedfuse.user_dp``)
          -> ArrayRecord "arrays", MetricRecord "metrics" {num-examples, train-loss,
             train-accuracy}; under DP also ConfigRecord "privacy" {status, epsilon,
             delta, noise-multiplier, sample-rate, steps, accountant, budget}. A site
             whose next round would exceed its ε budget answers with only the "privacy"
             record, status "budget-exhausted".
          With secure aggregation the train message also carries ConfigRecord "secagg"
          {session, nodes, clip-range, quantization-bits}, and the reply carries
          ArrayRecord "masked" {vector} (uint64) instead of "arrays" and "metrics":
          see ``fedfuse.secagg.encoding`` for the vector's layout.
- query.secagg_setup / query.secagg_share / query.secagg_unmask <-> ConfigRecord
          "secagg": the protocol stages of ``fedfuse.secagg.client``.
- evaluate <- ArrayRecord "arrays" -> MetricRecord "metrics" {num-examples, val-loss,
             val-accuracy}
- train with ConfigRecord "stack" {members} and ArrayRecord "member/<arch>" per member:
             the same, for the stacking head in "arrays" on the members' probabilities
             (``fedfuse.stacking``)
- query.fusion <- ArrayRecord "member/<arch>" per member, ConfigRecord "fusion" {members}
             (a member "stack" is the stacking head over the members in "stack")
             -> ArrayRecord "stats" {A, b} (Brier sufficient statistics of the members on
             the validation split, see ``fedfuse.fusion``), MetricRecord "metrics"
             {num-examples}; under secure aggregation (a "secagg" record in the
             message) only "masked" {vector}: fixed-point [A, b, num-examples]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedfuse.models.device import resolve_device
from fedfuse.fusion.soft_vote import brier_statistics
from fedfuse.secagg import Quantizer, encode_update
from fedfuse.secagg import client as secagg
from fedfuse.secagg.encoding import encode_fixed
from fedfuse.models.registry import load_model
from fedfuse.site.replay import ReplayStore, request_key
from fedfuse.privacy.budget import PrivacyRequest, open_ledger, plan_round, report
from fedfuse.privacy.ledger import ledger_store_for
from fedfuse.privacy.dpsgd import make_private, noise_seed
from fedfuse.data.sites import Site
from fedfuse.fusion.stacking import HEAD, StackedModel, load_head, stack_features
from fedfuse.data.stats import local_moments
from fedfuse.models.training import (LoopResult, evaluate, make_loader, make_optimizer, predict_proba,
                              train_epochs)
from fedfuse.privacy.client_level import clip_update

SiteProvider = Callable[[Context], Site]


class RecipeClientApp(ClientApp):
    """A ClientApp that pickles as the arguments it was built from.

    Flower's simulation engine sends the ClientApp to a Ray actor with every message,
    and cloudpickle serialises its handlers (closures) by value, scanning ``sys.modules``
    for each of them: with torch loaded, that is most of the engine's per-message cost.
    Pickled as ``build_client_app`` (by reference) and its arguments, the same app costs
    a few hundred bytes and is rebuilt on arrival."""

    def __init__(self, recipe: tuple[SiteProvider, int, list[Mod] | None]) -> None:
        super().__init__(mods=recipe[2])
        self._recipe = recipe

    def __reduce__(self) -> tuple[Callable[..., ClientApp], tuple[Any, ...]]:
        return build_client_app, self._recipe


def build_client_app(site_of: SiteProvider, threads: int = 1,
                     mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp whose local data and architecture come from ``site_of(context)``;
    ``mods`` are Flower client mods wrapped around every handler. It pickles as these
    arguments, so ``site_of`` should be picklable by reference (a module-level function,
    or a ``functools.partial`` of one) to keep messages in simulation cheap."""
    app = RecipeClientApp((site_of, threads, mods))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        site = site_of(context)
        n, s, q = local_moments(site.train.X)
        schema = site.train.schema
        content = RecordDict({
            "site": ConfigRecord({"arch": site.arch, "name": site.name,
                                  "input-shape": list(schema.input_shape),
                                  "num-classes": schema.num_classes}),
            "metrics": MetricRecord({"num-examples": n, "num-val": len(site.val),
                                     "index": site.index}),
            "moments": ArrayRecord({"sum": Array(s), "sumsq": Array(q)}),
        })
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        cfg = msg.content["config"]
        model, X = _trainee(msg, site)
        seed = int(cfg["seed"]) + 7919 * site.index
        # CPU generator only: torch.manual_seed also queues a CUDA seeding call, with a
        # stack trace, on every call (about 0.75 ms each here)
        torch.random.default_generator.manual_seed(seed)
        batch_size, epochs = int(cfg["batch-size"]), int(cfg["local-epochs"])
        loader = make_loader(X, site.train.y, batch_size, seed=seed)
        optimizer = make_optimizer(model, float(cfg["lr"]), float(cfg["momentum"]),
                                   float(cfg["weight-decay"]))
        request = PrivacyRequest.from_config(cfg)
        device = resolve_device(site.device)
        if request is None:
            result = train_epochs(model.to(device), loader, optimizer, epochs)
            model.cpu()
            if str(cfg.get("dp-mode", "off")) == "user":  # client-level DP (fedfuse.user_dp)
                _clip_to(model, msg.content["arrays"], float(cfg["dp-clipping-norm"]))
                return _train_reply(msg, context, site, model, result, seed, weight=1)
            return _train_reply(msg, context, site, model, result, seed)
        store = ledger_store_for(site.state_dir, context)
        ledger = open_ledger(store, request, len(site.train))
        plan = plan_round(ledger, request, len(site.train), batch_size, epochs)
        replays, key = None, ""
        if site.state_dir is not None:  # without a state directory nothing outlives a crash
            replays = ReplayStore(site.state_dir / "replay")
            key = request_key(msg.content["arrays"], cfg)
        if replays is not None and (stored := replays.load(key)) is not None:
            state, metrics = stored  # this very request was trained and charged before
            model.load_state_dict(state)
            reply = _train_reply(msg, context, site, model, LoopResult(**metrics), seed)
            reply.content["privacy"] = ConfigRecord(report(ledger, plan, "trained"))
            return reply
        if plan.exhausted:
            ledger.refused_rounds.append(int(cfg["server-round"]))
            store.save(ledger)
            return Message(RecordDict({"privacy": ConfigRecord(
                report(ledger, plan, "budget-exhausted"))}), reply_to=msg)
        generator = torch.Generator().manual_seed(noise_seed(site.secret, seed))
        dp_model, dp_optimizer, dp_loader, engine = make_private(
            model.to(device), optimizer, loader, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=request.max_grad_norm, accountant=ledger.accountant,
            history=ledger.history, generator=generator)
        result = train_epochs(dp_model, dp_loader, dp_optimizer, epochs)
        model.cpu()
        ledger.history = [tuple(h) for h in engine.accountant.history]
        store.save(ledger)  # spent before the update leaves the site
        if replays is not None:
            replays.save(key, model.state_dict(), asdict(result))
        reply = _train_reply(msg, context, site, model, result, seed)
        reply.content["privacy"] = ConfigRecord(report(ledger, plan, "trained"))
        return reply

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        model = load_model(site.arch, site.train.schema,
                           msg.content["arrays"].to_torch_state_dict())
        result = evaluate(model.to(resolve_device(site.device)), site.val.X, site.val.y)
        content = RecordDict({"metrics": MetricRecord({
            "num-examples": result.num_examples, "val-loss": result.loss,
            "val-accuracy": result.accuracy})})
        return Message(content=content, reply_to=msg)

    @app.query("fusion")
    def fusion_statistics(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        device = resolve_device(site.device)
        probas = [predict_proba(model.to(device), site.val.X) for model in _member_models(
            msg, site, [str(a) for a in msg.content["fusion"]["members"]])]
        A, b = brier_statistics(probas, site.val.y)
        if secagg.RECORD in msg.content:
            return _masked_reply(msg, context, encode_fixed(
                np.concatenate([A.ravel(), b, [len(site.val)]])))
        content = RecordDict({"stats": ArrayRecord({"A": Array(A), "b": Array(b)}),
                              "metrics": MetricRecord({"num-examples": len(site.val)})})
        return Message(content=content, reply_to=msg)

    @app.query("secagg_setup")
    def secagg_setup(msg: Message, context: Context) -> Message:
        return _secagg_reply(msg, secagg.setup(context.state, msg.content[secagg.RECORD]))

    @app.query("secagg_share")
    def secagg_share(msg: Message, context: Context) -> Message:
        return _secagg_reply(msg, secagg.share(context.state, msg.content[secagg.RECORD],
                                               str(context.node_id)))

    @app.query("secagg_unmask")
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return _secagg_reply(msg, secagg.unmask(context.state, msg.content[secagg.RECORD],
                                                str(context.node_id)))

    return app


def _member_models(msg: Message, site: Site, names: list[str]) -> list[torch.nn.Module]:
    """The models named ``names`` from the message's ``member/<name>`` records; the
    stacking head (``stack``) comes with the members listed in its "stack" record."""
    models = []
    for name in names:
        state = msg.content[f"member/{name}"].to_torch_state_dict()
        if name == HEAD:
            models.append(StackedModel(_head_members(msg, site), load_head(state)))
        else:
            models.append(load_model(name, site.train.schema, state))
    return models


def _trainee(msg: Message, site: Site) -> tuple[torch.nn.Module, np.ndarray]:
    """What a train message trains, and on which inputs: the site's cohort model on its
    training split; or, when the message carries a "stack" record, the stacking head
    on the members' probabilities for that split (``fedfuse.stacking``)."""
    state = msg.content["arrays"].to_torch_state_dict()
    if HEAD not in msg.content:
        return load_model(site.arch, site.train.schema, state), site.train.X
    return load_head(state), stack_features(_head_members(msg, site), site.train.X)


def _head_members(msg: Message, site: Site) -> list[torch.nn.Module]:
    """The members the stacking head combines, in its "stack" record's order."""
    return _member_models(msg, site, [str(a) for a in msg.content[HEAD]["members"]])


def _secagg_reply(msg: Message, record: ConfigRecord) -> Message:
    return Message(RecordDict({secagg.RECORD: record}), reply_to=msg)


def _clip_to(model: torch.nn.Module, received: ArrayRecord, clip: float) -> None:
    """Set ``model`` to ``w + clip_update(w_trained - w)`` (norm at most ``clip``)."""
    state = model.state_dict()
    delta = [state[k].detach().cpu().numpy().astype(np.float64) - a.numpy()
             for k, a in received.items()]
    clipped, _ = clip_update(delta, clip)
    model.load_state_dict({k: torch.as_tensor(a.numpy() + d, dtype=state[k].dtype)
                           for (k, a), d in zip(received.items(), clipped, strict=True)})


def _train_reply(msg: Message, context: Context, site: Site, model: torch.nn.Module,
                 result: LoopResult, seed: int, weight: int | None = None) -> Message:
    """The trained weights and metrics, weighted by ``weight`` (default: the training
    examples); under secure aggregation only the masked vector of (weights - received
    weights, weight, metrics)."""
    n = len(site.train) if weight is None else weight
    if secagg.RECORD not in msg.content:
        return Message(RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": n, "train-loss": result.loss,
                                     "train-accuracy": result.accuracy}),
        }), reply_to=msg)
    request = msg.content[secagg.RECORD]
    received = msg.content["arrays"]
    trained = model.state_dict()
    delta = [trained[k].detach().cpu().numpy().astype(np.float64) - a.numpy()
             for k, a in received.items()]
    quantizer = Quantizer(float(request["clip-range"]), int(request["quantization-bits"]))
    rng = np.random.default_rng([noise_seed(site.secret, seed), 1])  # rounding, not DP noise
    return _masked_reply(msg, context,
                         encode_update(delta, n, result.loss, result.accuracy, quantizer, rng))


def _masked_reply(msg: Message, context: Context, vector: np.ndarray) -> Message:
    """``vector`` under this node's masks for the session named in the message."""
    masked = secagg.mask(context.state, msg.content[secagg.RECORD], str(context.node_id),
                         vector)
    return Message(RecordDict({secagg.MASKED: ArrayRecord({"vector": Array(masked)})}),
                   reply_to=msg)

