"""Running the sessions of several groups (cohorts) side by side, and opening the next
ones on the same exchanges; turning a group's unmasked sum into the update its FedAvg
strategy applies.

A session is *expected* (``Openings.expect``) as soon as its members are known: a
cohort's sample for round r + 1 while round r's messages are built, or the fusion
statistics' sites during the last training round. From then on every exchange the
collector makes carries one stage of it on the messages that go to its members anyway
(``Openings.exchange``): its setup on round r's train messages (the keys come back in
the train replies), its share stage on round r's unmask messages (the sealed shares
come back with the reveals). A member that gets no other message in that exchange gets
a carrier (``query.secagg``). When round r + 1 starts, its session is ready for masked
input: a steady-state round is two exchanges, train and unmask. A session that is not
ready when it is needed (the first round, the first after a resume, one that aborted
while opening) is opened with exchanges of its own (``Openings.take``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedfuse.coordinator.grid import exchange
from fedfuse.secagg.consistency import check_records, receive_signatures
from fedfuse.secagg.encoding import UpdateSum
from fedfuse.secagg.messages import (
    CARRIER,
    CHECK_RECORD,
    MIN_SURVIVORS,
    RECORD,
    SETUP_RECORD,
    SHARE_RECORD,
    UNMASK_RECORD,
)
from fedfuse.secagg.server import SecAggAbort, SecAggSession

log = logging.getLogger("fedfuse.secagg")

CARRIERS = "+carriers"
"""The exchange group of the carrier messages (no cohort has this name)."""
OPENING_EXCHANGES = 4
"""Exchanges of its own a session may take to open before it counts as failed."""
Riders = dict[int, dict[str, ConfigRecord]]
"""Per node id, the stage records (record name -> record) riding on its message."""


class Openings:
    """The sessions being opened, by label (``"<tag>/<group>"``), in the order they
    were expected; each needs ``threshold`` of its sampled clients."""

    def __init__(self, threshold: float, neighbours: int = 0,
                 consistency: bool = False) -> None:
        self.threshold = threshold
        self.neighbours = neighbours
        self.consistency = consistency
        self.sessions: dict[str, SecAggSession] = {}
        self.failed: dict[str, str] = {}
        """Label -> why a session aborted while it was opening."""

    def expect(self, label: str, nodes: Sequence[int], length: int) -> None:
        """Open a session of ``nodes`` summing ``length`` entries on the next exchanges
        (a group of fewer than ``MIN_SURVIVORS`` has none: in a sum over two, each
        update is the sum minus the other)."""
        if len(nodes) >= MIN_SURVIVORS:
            self.sessions[label] = SecAggSession(label, nodes, self.threshold, length,
                                                 self.neighbours, self.consistency)

    def riders(self) -> tuple[Riders, list[SecAggSession]]:
        """One stage of every opening session, per node; a session whose stage record
        a node already carries for an earlier session waits for the next exchange."""
        riders: Riders = {}
        moving = []
        for session in self.sessions.values():
            stage = session.stage
            if stage == "ready":
                continue
            name, records = ((SETUP_RECORD, dict.fromkeys(session.selected,
                                                          session.setup_record()))
                             if stage == "setup" else (SHARE_RECORD, session.share_records()))
            if any(name in riders.get(int(n), {}) for n in records):
                continue
            for n, record in records.items():
                riders.setdefault(int(n), {})[name] = record
            moving.append(session)
        return riders, moving

    def exchange(self, grid: Grid, by_group: dict[str, list[Message]]
                 ) -> dict[str, list[Message]]:
        """``by_group``'s messages in one exchange, carrying a stage of every opening
        session; returns the replies by group (carriers' replies left out)."""
        riders, moving = self.riders()
        replies = exchange(grid, carry(by_group, riders))
        everything = [r for group in replies.values() for r in group]
        for session in moving:
            members = set(session.selected)
            mine = [r for r in everything if str(r.metadata.src_node_id) in members]
            try:
                (session.receive_keys if session.stage == "setup"
                 else session.receive_shares)(mine)
            except SecAggAbort as exc:
                log.warning("secure aggregation of %s could not open: %s", session.group, exc)
                self.failed[session.group] = str(exc)
                del self.sessions[session.group]
        replies.pop(CARRIERS, None)
        return replies

    def take(self, grid: Grid, wanted: dict[str, tuple[Sequence[int], int]]
             ) -> tuple[dict[str, SecAggSession], dict[str, str]]:
        """For each label -> (nodes, length): its session, ready for masked input (the
        expected one if it still holds every node, else a fresh one opened now, all
        side by side), and why the others failed. A site that failed while the session
        opened (so it lost its place) thus costs two exchanges, not its participation."""
        for label, (nodes, length) in wanted.items():
            have = self.sessions.get(label)
            if have is None or have.length != length or not covers(have, nodes):
                self.expect(label, nodes, length)
        # the sessions needed now go first, so a later one's stage waits for them
        self.sessions = {**{lb: self.sessions[lb] for lb in wanted if lb in self.sessions},
                         **self.sessions}
        for _ in range(OPENING_EXCHANGES):
            if all(self.sessions[lb].stage == "ready" for lb in wanted if lb in self.sessions):
                break
            self.exchange(grid, {})
        ready = {lb: self.sessions.pop(lb) for lb in wanted
                 if lb in self.sessions and self.sessions[lb].stage == "ready"}
        failed = {lb: self.failed.pop(lb, f"{lb}: the session did not open")
                  for lb in wanted if lb not in ready}
        return ready, failed


def covers(session: SecAggSession, nodes: Iterable[int]) -> bool:
    """Whether every node in ``nodes`` is still a member of ``session``: of U2 once it
    is ready, of U1 once its keys are in, else of its selection."""
    held = set({"ready": session.u2, "share": session.u1}.get(session.stage,
                                                               session.selected))
    return {str(n) for n in nodes} <= held


def carry(by_group: dict[str, list[Message]], riders: Riders) -> dict[str, list[Message]]:
    """``by_group`` with each node's riders added to its message (on a copy of the
    content: a strategy's messages share one), plus a carrier for every node with
    riders and no message."""
    out: dict[str, list[Message]] = {}
    addressed = set()
    for group, msgs in by_group.items():
        out[group] = []
        for m in msgs:
            node = m.metadata.dst_node_id
            addressed.add(node)
            if node in riders:
                m.content = RecordDict({**dict(m.content), **riders[node]})
            out[group].append(m)
    carriers = [Message(RecordDict(dict(records)), dst_node_id=node, message_type=CARRIER)
                for node, records in riders.items() if node not in addressed]
    if carriers:
        out[CARRIERS] = carriers
    return out


def collect_masked(sessions: dict[str, SecAggSession], failed: dict[str, str],
                   replies: dict[str, list[Message]], declined: dict[str, set[int]]) -> None:
    """Stage 3: the masked vectors from each group's train replies."""
    advance(sessions, failed,
            lambda g, s: s.receive_masked(replies[g], declined.get(g, set())))


def close_sessions(grid: Grid, openings: Openings, sessions: dict[str, SecAggSession],
                   failed: dict[str, str], culprits: set[int] | None = None
                   ) -> dict[str, np.ndarray]:
    """Stage 4 for every session, in one exchange that also carries a stage of every
    opening session (after one more for the consistency check, where sessions have
    it): the unmasked sums, by group (failures go to ``failed``, the nodes proven at
    fault to ``culprits``)."""
    checked = {g: s for g, s in sessions.items() if s.consistency}
    if checked:
        replies = openings.exchange(grid, {g: carriers(CHECK_RECORD, check_records(s))
                                           for g, s in checked.items()})
        advance(sessions, failed, lambda g, s: receive_signatures(s, replies.get(g, []))
                if s.consistency else None)
    replies = openings.exchange(grid, {g: carriers(UNMASK_RECORD, s.unmask_records())
                                       for g, s in sessions.items()})
    sums: dict[str, np.ndarray] = {}
    advance(sessions, failed, lambda g, s: sums.__setitem__(g, s.receive_unmask(replies[g])),
            culprits)
    return sums


def carriers(name: str, records: dict[str, ConfigRecord]) -> list[Message]:
    """One carrier message per node with its stage record ``name``."""
    return [Message(RecordDict({name: rec}), dst_node_id=int(node), message_type=CARRIER)
            for node, rec in records.items()]


def sizes(arrays: ArrayRecord) -> list[int]:
    """Element counts of a model's arrays, in record order (the vector's layout)."""
    return [int(np.prod(a.shape)) for a in arrays.values()]


def with_session(msgs: list[Message], session: SecAggSession | None,
                 **settings: Any) -> list[Message]:
    """The messages to a session's U2 members, each carrying its masking request (plus
    ``settings`` for the client, such as the quantiser's)."""
    if session is None:
        return []
    keep = [m for m in msgs if str(m.metadata.dst_node_id) in session.u2]
    for m in keep:  # on a copy of the content: a strategy's messages share one
        m.content = RecordDict({**dict(m.content), RECORD: session.mask_request(
            str(m.metadata.dst_node_id), **settings)})
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


def advance(sessions: dict[str, SecAggSession], failed: dict[str, str],
            step: Callable[[str, SecAggSession], None],
            culprits: set[int] | None = None) -> None:
    """Apply ``step(group, session)``; a session that aborts is removed and logged, and
    the node proven at fault, if any, goes to ``culprits``."""
    for group in list(sessions):
        try:
            step(group, sessions[group])
        except SecAggAbort as exc:
            log.warning("secure aggregation of %s failed this round: %s", group, exc)
            failed[group] = str(exc)
            del sessions[group]
            if exc.culprit is not None and culprits is not None:
                culprits.add(int(exc.culprit))


def members(msgs: Iterable[Message]) -> list[int]:
    """The destination node ids of ``msgs``, in order."""
    return [m.metadata.dst_node_id for m in msgs]
