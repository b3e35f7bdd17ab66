"""Running the sessions of several groups (cohorts) side by side, one batch per stage,
and turning a group's unmasked sum into the update its FedAvg strategy applies."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedfuse.coordinator.grid import exchange
from fedfuse.secagg.encoding import UpdateSum
from fedfuse.secagg.messages import RECORD
from fedfuse.secagg.server import SecAggAbort, SecAggSession

log = logging.getLogger("fedfuse.secagg")


def open_sessions(grid: Grid, nodes: dict[str, Sequence[int]], threshold: float,
                  lengths: dict[str, int], tag: str) -> tuple[dict[str, SecAggSession],
                                                             dict[str, str]]:
    """Stages 1 and 2 (keys, sealed shares) for every group with nodes. Returns the
    sessions ready for masked input, and why the others failed."""
    failed = {g: f"{tag}/{g}: {len(n)} client sampled; a sum over one client is its update"
              for g, n in nodes.items() if len(n) == 1}
    for reason in failed.values():
        log.warning("secure aggregation skipped: %s", reason)
    sessions = {g: SecAggSession(f"{tag}/{g}", n, threshold, lengths[g])
                for g, n in nodes.items() if len(n) >= 2}
    replies = exchange(grid, {g: s.setup_messages() for g, s in sessions.items()})
    _advance(sessions, failed, lambda g, s: s.receive_keys(replies[g]))
    replies = exchange(grid, {g: s.share_messages() for g, s in sessions.items()})
    _advance(sessions, failed, lambda g, s: s.receive_shares(replies[g]))
    return sessions, failed


def collect_masked(sessions: dict[str, SecAggSession], failed: dict[str, str],
                   replies: dict[str, list[Message]], declined: dict[str, set[int]]) -> None:
    """Stage 3: the masked vectors from each group's train replies."""
    _advance(sessions, failed,
             lambda g, s: s.receive_masked(replies[g], declined.get(g, set())))


def close_sessions(grid: Grid, sessions: dict[str, SecAggSession],
                   failed: dict[str, str]) -> dict[str, np.ndarray]:
    """Stage 4 for every session: the unmasked sums, by group (failures go to ``failed``)."""
    replies = exchange(grid, {g: s.unmask_messages() for g, s in sessions.items()})
    sums: dict[str, np.ndarray] = {}
    _advance(sessions, failed, lambda g, s: sums.__setitem__(g, s.receive_unmask(replies[g])))
    return sums


def sizes(arrays: ArrayRecord) -> list[int]:
    """Element counts of a model's arrays, in record order (the vector's layout)."""
    return [int(np.prod(a.shape)) for a in arrays.values()]


def with_session(msgs: list[Message], session: SecAggSession | None,
                 **settings: Any) -> list[Message]:
    """The messages to a session's U2 members, carrying its masking request (plus
    ``settings`` for the client, such as the quantiser's)."""
    if session is None:
        return []
    request = session.mask_request(**settings)
    keep = [m for m in msgs if str(m.metadata.dst_node_id) in session.u2]
    for m in keep:
        m.content[RECORD] = request
    return keep


def aggregate_reply(arrays: ArrayRecord, total: UpdateSum, like: Message) -> Message:
    """A train reply carrying w_global + mean delta and the group's total example count,
    as FedAvg's ``aggregate_train`` expects (``like``: a train message of a survivor)."""
    weights = [a.numpy() for a in arrays.values()]
    new = ArrayRecord({k: Array((w + d).astype(w.dtype))
                       for k, w, d in zip(arrays.keys(), weights, total.mean_delta)})
    return Message(RecordDict({"arrays": new, "metrics": MetricRecord({
        "num-examples": total.num_examples, "train-loss": total.loss,
        "train-accuracy": total.accuracy})}), reply_to=like)


def _advance(sessions: dict[str, SecAggSession], failed: dict[str, str],
             step: Callable[[str, SecAggSession], None]) -> None:
    """Apply ``step(group, session)``; a session that aborts is removed and logged."""
    for group in list(sessions):
        try:
            step(group, sessions[group])
        except SecAggAbort as exc:
            log.warning("secure aggregation of %s failed this round: %s", group, exc)
            failed[group] = str(exc)
            del sessions[group]
