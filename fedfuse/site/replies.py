"""What a site sends back: its trained weights and metrics in plaintext, or under
secure aggregation only its masked vector (``fedfuse.secagg``), and the answers to the
protocol stages that ride on the message."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fedfuse import wire
from fedfuse.data.sites import Site
from fedfuse.models.training import LoopResult
from fedfuse.privacy.dpsgd import noise_seed
from fedfuse.secagg import Quantizer, crypto, encode_update
from fedfuse.secagg import client as secagg


def train_reply(msg: Message, context: Context, site: Site, model: torch.nn.Module,
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
    request = wire.config(msg, secagg.RECORD)
    received = wire.arrays(msg, "arrays")
    trained = model.state_dict()
    delta = [trained[k].detach().cpu().numpy().astype(np.float64) - a.numpy()
             for k, a in received.items()]
    quantizer = Quantizer(wire.as_float(request, "clip-range"),
                          wire.as_int(request, "quantization-bits"))
    rng = np.random.default_rng([noise_seed(site.secret, seed), 1])  # rounding, not DP noise
    return masked_reply(msg, context,
                        encode_update(delta, n, result.loss, result.accuracy, quantizer, rng))


def masked_reply(msg: Message, context: Context, vector: np.ndarray) -> Message:
    """``vector`` under this node's masks for the session named in the message."""
    masked = secagg.mask(context.state, wire.config(msg, secagg.RECORD), str(context.node_id),
                         vector)
    return Message(RecordDict({secagg.MASKED: ArrayRecord({"vector": Array(masked)})}),
                   reply_to=msg)


def answered(msg: Message, context: Context, reply: Message, site: Site) -> Message:
    """``reply`` with the answers to the secure-aggregation stages riding on ``msg``
    (``fedfuse.secagg.client.answer``), given after the message's own work (its
    masking, for one session, comes before another session's setup)."""
    for name, record in secagg.answer(context.state, msg.content, str(context.node_id),
                                      identity_of(site)).config_records.items():
        reply.content[name] = record
    return reply


def identity_of(site: Site) -> secagg.Identity:
    """The site's identity in secure aggregation: its Ed25519 key (derived from its
    secret), and whether its policy verifies its peers' signed keys (and pins them)."""
    policy = site.policy
    return secagg.Identity(crypto.identity_key(site.secret),
                           verify=policy is not None and policy.verify_keys,
                           consistency=policy is not None and policy.require_consistency_check,
                           pinned=policy.pinned if policy is not None else frozenset())
