"""The fedfuse ClientApp: answers the coordinator's query, train and evaluate messages,
and the secure-aggregation stages riding on any of them.

The handlers only route: training is ``fedfuse.site.training``, the models a message
names ``fedfuse.site.members``, the replies ``fedfuse.site.replies``.

Message layout (all keys fixed):
- query   <- ConfigRecord "discovery" {moments: "plain" or "secure"}
          -> ConfigRecord "site" {arch, name, input-shape, num-classes},
             MetricRecord "metrics" {num-examples, num-val, index}, and unless "secure"
             was asked or the site's policy requires secure aggregation ArrayRecord
             "moments" {sum, sumsq} (feature sums of the training split)
- query.moments <- ArrayRecord "reference" {center, scale}, ConfigRecord "moments"
             {bound}, ConfigRecord "secagg" -> only "masked" {vector}: fixed-point
             [n, sum z, sum z^2], z = clip((x - center) / scale, -bound, bound)
             (``fedfuse.data.stats``, ``fedfuse.coordinator.moments``)
- train   <- ArrayRecord "arrays", ConfigRecord "config" {lr, local-epochs, batch-size,
             momentum, weight-decay, seed, server-round, validate (optional)}
             (+ dp-* keys under DP, see ``fedfuse.privacy.budget.PrivacyRequest``; under
             client-level DP only dp-mode = "user" and dp-clipping-norm: the update is
             clipped to that norm and weighted 1, see ``fedfuse.privacy.client_level``)
          -> ArrayRecord "arrays", MetricRecord "metrics" {num-examples, train-loss,
             train-accuracy}; under DP also ConfigRecord "privacy" {status, epsilon,
             delta, noise-multiplier, sample-rate, steps, accountant, budget}. A site
             whose next round would exceed its ε budget answers with only the "privacy"
             record, status "budget-exhausted". With validate = true (the site is
             sampled for evaluation) the site first scores the model it received and
             adds MetricRecord "validation" {num-examples (validation examples),
             val-loss, val-accuracy}, also when it declines to train.
          With secure aggregation the train message also carries ConfigRecord "secagg"
          {session, nodes, clip-range, quantization-bits}, and the reply carries
          ArrayRecord "masked" {vector} (uint64) instead of "arrays" and "metrics"
          (see ``fedfuse.secagg.encoding`` for the vector's layout); "validation" stays
          in plaintext beside it, outside the masked sum.
- evaluate <- ArrayRecord "arrays" -> MetricRecord "metrics" {num-examples, val-loss,
             val-accuracy}: to a site sampled for evaluation that gets no train
             message in that exchange.
- any message (train, evaluate, query.fusion, query.secagg) may carry the stages of
             other secure-aggregation sessions, one ConfigRecord each: "secagg-setup"
             {session, group}, "secagg-share" {session, threshold, nodes, c-pk, s-pk},
             "secagg-unmask" {session, survivors, dropped, from, ciphertexts}; the reply
             adds "secagg-keys", "secagg-shares", "secagg-reveal" (and
             "secagg-refused" {answer record: reason} for a stage the site refuses);
             see ``fedfuse.secagg.client.answer``. query.secagg carries stages only.
- train with ConfigRecord "stack" {members} and ArrayRecord "member/<arch>" per member:
             the same, for the stacking head in "arrays" on the members' probabilities
             (``fedfuse.fusion.stacking``)
- query.fusion <- ArrayRecord "member/<arch>" per member, ConfigRecord "fusion" {members}
             (a member "stack" is the stacking head over the members in "stack")
             -> ArrayRecord "stats" {A, b} (Brier sufficient statistics of the members on
             the validation split, see ``fedfuse.fusion.soft_vote``), MetricRecord "metrics"
             {num-examples}; under secure aggregation (a "secagg" record in the
             message) only "masked" {vector}: fixed-point [A, b, num-examples]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedfuse import wire
from fedfuse.data.sites import Site
from fedfuse.data.stats import local_moments, standardised_sums
from fedfuse.fusion.soft_vote import brier_statistics
from fedfuse.models.device import resolve_device
from fedfuse.models.registry import shapes_digest
from fedfuse.models.training import evaluate, predict_proba
from fedfuse.secagg import client as secagg
from fedfuse.secagg.encoding import encode_fixed
from fedfuse.site import training
from fedfuse.site.members import member_models, own_model, site_model
from fedfuse.site.policy import check_masking, check_train
from fedfuse.site.replies import answered, masked_reply, train_reply
from fedfuse.wire import VALIDATE, VALIDATION, WireError

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
                                  "num-classes": schema.num_classes,
                                  "model-shapes": shapes_digest(own_model(site))}),
            "metrics": MetricRecord({"num-examples": n, "num-val": len(site.val),
                                     "index": site.index}),
        })
        asked = msg.content.config_records.get("discovery", ConfigRecord()).get("moments")
        if asked != "secure" and (site.policy is None
                                  or not site.policy.require_secure_aggregation):
            content["moments"] = ArrayRecord({"sum": Array(s), "sumsq": Array(q)})
        return Message(content=content, reply_to=msg)

    @app.query("moments")
    def moments(msg: Message, context: Context) -> Message:
        site = site_of(context)
        masking = msg.content.config_records.get(secagg.RECORD)
        if site.policy is not None:
            check_masking(site.policy, masking)
        if masking is None:
            raise WireError("query.moments: feature sums leave only in a secure sum")
        return answered(msg, context, masked_reply(msg, context, encode_fixed(
            standardised_moments(msg, site.train.X))), site)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        if site.policy is not None:  # before anything is computed from the data
            check_train(site.policy, wire.config(msg, "config"),
                        msg.content.config_records.get(secagg.RECORD))
        checked = validation(msg, site) if wire.config(msg, "config").get(
            VALIDATE, False) is True else None  # the received model, before training
        done = training.train(msg, context, site)
        if done.model is None or done.result is None:  # declined: over its budget
            reply = Message(RecordDict({"privacy": ConfigRecord(done.privacy or {})}),
                            reply_to=msg)
        else:
            reply = train_reply(msg, context, site, done.model, done.result, done.seed,
                                weight=done.weight)
        if done.privacy is not None:
            reply.content["privacy"] = ConfigRecord(done.privacy)
        if checked is not None:
            reply.content[VALIDATION] = checked
        return answered(msg, context, reply, site)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        return answered(msg, context, Message(
            RecordDict({"metrics": validation(msg, site)}), reply_to=msg), site)

    @app.query("fusion")
    def fusion_statistics(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        if site.policy is not None:
            check_masking(site.policy, msg.content.config_records.get(secagg.RECORD))
        device = resolve_device(site.device)
        probas = [predict_proba(model.to(device), site.val.X) for model in member_models(
            msg, site, wire.as_list(wire.config(msg, "fusion"), "members", str))]
        A, b = brier_statistics(probas, site.val.y)
        if secagg.RECORD in msg.content:
            return answered(msg, context, masked_reply(msg, context, encode_fixed(
                np.concatenate([A.ravel(), b, [len(site.val)]]))), site)
        content = RecordDict({"stats": ArrayRecord({"A": Array(A), "b": Array(b)}),
                              "metrics": MetricRecord({"num-examples": len(site.val)})})
        return Message(content=content, reply_to=msg)

    @app.query("secagg")
    def secagg_stages(msg: Message, context: Context) -> Message:
        return answered(msg, context, Message(RecordDict(), reply_to=msg), site_of(context))

    return app


def validation(msg: Message, site: Site) -> MetricRecord:
    """The figures of the model in ``msg`` on ``site``'s validation split: mean
    cross-entropy, accuracy and the example count they average over."""
    model = site_model(site, site.arch, wire.arrays(msg, "arrays").to_torch_state_dict())
    result = evaluate(model.to(resolve_device(site.device)), site.val.X, site.val.y)
    return MetricRecord({"num-examples": result.num_examples, "val-loss": result.loss,
                         "val-accuracy": result.accuracy})


def standardised_moments(msg: Message, X: np.ndarray) -> np.ndarray:
    """The site's ``standardised_sums`` for the reference centre, scale and bound in
    ``msg``, each checked: finite, of the inputs' shape, scales and bound positive."""
    ref = wire.arrays(msg, "reference")
    center, scale = wire.as_array(ref, "center"), wire.as_array(ref, "scale")
    bound = wire.as_float(wire.config(msg, "moments"), "bound")
    shape = X.shape[1:]
    if center.shape != shape or scale.shape != shape:
        raise WireError(f"query.moments: a reference of shape {center.shape} and "
                        f"{scale.shape}, the inputs are {shape}")
    if not (np.all(np.isfinite(center)) and np.all(np.isfinite(scale))
            and np.all(scale > 0) and math.isfinite(bound) and bound > 0):
        raise WireError("query.moments: the reference is not finite with positive scales "
                        "and bound")
    return standardised_sums(X, center, scale, bound)
