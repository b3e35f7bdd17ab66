"""The fedfuse ClientApp: answers the coordinator's query, train and evaluate messages.

Message layout (all keys fixed):
- query   -> ConfigRecord "site" {arch, name, input-shape, num-classes},
             MetricRecord "metrics" {num-examples, num-val, index},
             ArrayRecord "moments" {sum, sumsq} (feature sums of the training split)
- train   <- ArrayRecord "arrays", ConfigRecord "config" {lr, local-epochs, batch-size,
             momentum, weight-decay, seed, server-round}
          -> ArrayRecord "arrays", MetricRecord "metrics" {num-examples, train-loss,
             train-accuracy}
- evaluate <- ArrayRecord "arrays" -> MetricRecord "metrics" {num-examples, val-loss,
             val-accuracy}
- query.fusion <- ArrayRecord "member/<arch>" per member, ConfigRecord "fusion" {members}
             -> ArrayRecord "stats" {A, b} (Brier sufficient statistics of the members on
             the validation split, see ``fedfuse.fusion``), MetricRecord "metrics"
             {num-examples}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp

from fedfuse.fusion import brier_statistics
from fedfuse.models import load_model
from fedfuse.sites import Site
from fedfuse.stats import local_moments
from fedfuse.training import evaluate, make_loader, make_optimizer, predict_proba, train_epochs

SiteProvider = Callable[[Context], Site]


def build_client_app(site_of: SiteProvider, threads: int = 1) -> ClientApp:
    """A ClientApp whose local data and architecture come from ``site_of(context)``."""
    app = ClientApp()

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
        model = load_model(site.arch, site.train.schema,
                           msg.content["arrays"].to_torch_state_dict())
        seed = int(cfg["seed"]) + 7919 * site.index
        torch.manual_seed(seed)
        loader = make_loader(site.train.X, site.train.y, int(cfg["batch-size"]), seed=seed)
        optimizer = make_optimizer(model, float(cfg["lr"]), float(cfg["momentum"]),
                                   float(cfg["weight-decay"]))
        result = train_epochs(model, loader, optimizer, int(cfg["local-epochs"]))
        content = RecordDict({
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(site.train),
                                     "train-loss": result.loss,
                                     "train-accuracy": result.accuracy}),
        })
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        model = load_model(site.arch, site.train.schema,
                           msg.content["arrays"].to_torch_state_dict())
        result = evaluate(model, site.val.X, site.val.y)
        content = RecordDict({"metrics": MetricRecord({
            "num-examples": result.num_examples, "val-loss": result.loss,
            "val-accuracy": result.accuracy})})
        return Message(content=content, reply_to=msg)

    @app.query("fusion")
    def fusion_statistics(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        site = site_of(context)
        probas = []
        for arch in msg.content["fusion"]["members"]:
            model = load_model(str(arch), site.train.schema,
                               msg.content[f"member/{arch}"].to_torch_state_dict())
            probas.append(predict_proba(model, site.val.X))
        A, b = brier_statistics(probas, site.val.y)
        content = RecordDict({"stats": ArrayRecord({"A": Array(A), "b": Array(b)}),
                              "metrics": MetricRecord({"num-examples": len(site.val)})})
        return Message(content=content, reply_to=msg)

    return app

