"""Update gates: what the coordinator checks in every plaintext update before it is
aggregated. An update that fails a gate is dropped from the round with its reason.

For client i with weights ``w_i`` replying to a round that sent ``w``:

- structure: the same tensor names, shapes and dtypes as ``w``;
- finiteness: every coordinate of ``w_i`` is finite;
- norm: ``||w_i - w||_2 <= max_norm`` (when a bound is set), so a scaled update
  (``w + 100 (w_i - w)``) cannot drag the average;
- weight: ``0 < num-examples <= n_i``, the training-set size the client gave at
  discovery, so a client cannot inflate its FedAvg weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


def check_update(received: ArrayRecord, reply: Message, max_examples: int,
                 max_norm: float | None) -> str | None:
    """Why ``reply`` (a train reply to a message carrying ``received``) must not be
    aggregated, or None when it passes every gate."""
    content = reply.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "the reply carries no weights or no metrics"
    arrays = content.array_records["arrays"]
    if list(arrays.keys()) != list(received.keys()):
        return (f"its tensors are {sorted(arrays.keys())[:4]}…, the model's are "
                f"{sorted(received.keys())[:4]}…" if set(arrays) != set(received)
                else "its tensors are in another order than the model's")
    squared = 0.0
    for name, sent in received.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(sent.shape) or got.dtype != sent.dtype:
            return (f"tensor {name!r} is {got.dtype}{list(got.shape)}, the model's is "
                    f"{sent.dtype}{list(sent.shape)}")
        value = got.numpy()
        if not np.isfinite(value).all():
            return f"tensor {name!r} has NaN or infinite values"
        squared += float(np.sum((value.astype(np.float64) - sent.numpy()) ** 2))
    norm = math.sqrt(squared)
    if max_norm is not None and norm > max_norm:
        return (f"its update norm {norm:.4g} exceeds robustness.max_update_norm = "
                f"{max_norm:g}")
    n = content.metric_records["metrics"].get("num-examples")
    if not isinstance(n, (int, float)) or not math.isfinite(n) or not 0 < n <= max_examples:
        return (f"it claims {n} training examples; it reported {max_examples} at "
                "discovery")
    return None


def gate_updates(received: ArrayRecord, replies: list[Message], max_examples: dict[int, int],
                 max_norm: float | None) -> tuple[list[Message], list[Rejection]]:
    """The replies that pass every gate, and a rejection (node, reason) for each other
    reply that is not an error (errors are counted as failures elsewhere)."""
    accepted, rejected = [], []
    for reply in replies:
        if reply.has_error():
            accepted.append(reply)  # left to the strategy, which counts it as a failure
            continue
        node = reply.metadata.src_node_id
        reason = check_update(received, reply, max_examples.get(node, 0), max_norm)
        if reason is None:
            accepted.append(reply)
        else:
            rejected.append(Rejection(node, reason))
    return accepted, rejected
