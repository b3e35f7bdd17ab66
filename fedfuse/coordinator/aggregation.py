"""How replies become what the coordinator aggregates: in plaintext, or through secure
aggregation, behind one interface (:class:`Collector`).

A collector sends a batch of messages whose answers will be summed (a round's training
in every cohort, or the fusion statistics), then turns the answers into
- the updates each cohort's strategy aggregates (:meth:`Collector.updates`): in
  plaintext every site's reply, through the update gates (``fedfuse.coordinator.gates``);
  with secure aggregation one reply per cohort carrying the unmasked, decoded sum
  (as Flower's SecAgg+ workflow hands its strategy a single aggregated result);
- or the summed Brier statistics of the fusion round (:meth:`Collector.statistics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedfuse import wire
from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.cohorts import Cohort
from fedfuse.coordinator.gates import gate_updates
from fedfuse.coordinator.grid import exchange
from fedfuse.coordinator.records import Participant, RoundRecord
from fedfuse.coordinator.sessions import (
    Openings,
    advance,
    aggregate_reply,
    close_sessions,
    collect_masked,
    members,
    with_session,
)
from fedfuse.coordinator.validation import fold, split
from fedfuse.secagg import Quantizer, SecAggSession, decode_sum
from fedfuse.secagg.encoding import decode_fixed
from fedfuse.secagg.messages import MIN_SURVIVORS

log = logging.getLogger("fedfuse.coordinator")

Statistics = tuple[np.ndarray, np.ndarray, int, int]
"""Summed Brier statistics A, b, the validation examples and the sites behind them."""
FUSION = "fusion"
"""The tag and group of the fusion statistics' batch."""


def bounded_statistics(flat: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, b, n) from the decoded sum of the sites' [A, b, n] vectors, range-checked: n
    is a whole number >= 1 of examples, and, since each example adds p_j . p_k in [0, 1]
    to A_jk and p_j(y) in [0, 1] to b_j, 0 <= A, b <= n (up to the fixed point's
    rounding). Raises ValueError naming what is out of range."""
    A, b, n = flat[:m * m].reshape(m, m), flat[m * m:m * m + m], float(flat[-1])
    if not (n >= 1 and abs(n - round(n)) < 1e-3):
        raise ValueError(f"the example count {n:.6g} is not a whole number >= 1")
    slack = 1e-6 * (1 + n)
    for name, values in (("A", A), ("b", b)):
        if not np.all((values >= -slack) & (values <= n + slack)):
            raise ValueError(f"{name} has entries outside [0, {round(n)}]")
    return A, b, int(round(n))


def statistics_length(num_members: int) -> int:
    """Entries of a site's fusion statistics vector [A, b, n]: m² + m + 1."""
    return num_members * num_members + num_members + 1


@dataclass
class Batch:
    """One batch of messages whose answers are summed: what went out, what came back,
    and (secure aggregation) each group's session and why the others failed."""

    sent: dict[str, list[Message]]
    replies: dict[str, list[Message]]
    validation: dict[str, list[Message]] = field(default_factory=dict)
    """Per group, the sites' validation figures as evaluate replies
    (``fedfuse.coordinator.validation``)."""
    sessions: dict[str, SecAggSession] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class Collector(Protocol):
    secure: bool
    secure_sums: int
    """Cohort updates that came out of secure sums so far."""
    culprits: set[int]
    """Nodes proven to have broken a secure sum (``SecAggAbort.culprit``); the cohorts
    stop sampling them."""

    def send(self, grid: Grid, msgs: dict[str, list[Message]], lengths: dict[str, int],
             tag: str, clip: dict[str, float | None],
             evaluate: dict[str, list[Message]] | None = None) -> Batch:
        """Send every group's messages (``lengths``: the payload each group sums;
        ``clip``: each group's own per-coordinate clip, None for the configured one),
        with ``evaluate``'s messages folded into the same exchange, and collect their
        answers."""

    def expect(self, tag: str, nodes: dict[str, list[int]], lengths: dict[str, int]) -> None:
        """The next batch sent with ``tag`` goes to (some of) each group's ``nodes`` and
        sums ``lengths`` entries: prepare for it on the exchanges until then."""

    def updates(self, grid: Grid, batch: Batch, accepted: dict[str, list[Message]],
                cohorts: dict[str, Cohort], record: RoundRecord
                ) -> dict[str, list[Message]]:
        """What each cohort's strategy aggregates, from the ``accepted`` replies (those
        that carry an update, see ``SiteReports.collect``); counts go into ``record``."""

    def statistics(self, grid: Grid, msgs: list[Message], participants: list[Participant],
                   num_members: int) -> Statistics | None:
        """The fusion statistics of ``num_members`` models summed over the sites that
        answer ``msgs``; None when no site does."""


class PlaintextCollector:
    """Every site's reply seen by the coordinator; updates pass the update gates."""

    secure = False
    secure_sums = 0

    def __init__(self, max_update_norm: float | None) -> None:
        self.max_update_norm = max_update_norm
        self.culprits: set[int] = set()

    def send(self, grid: Grid, msgs: dict[str, list[Message]], lengths: dict[str, int],
             tag: str, clip: dict[str, float | None],
             evaluate: dict[str, list[Message]] | None = None) -> Batch:
        out = fold(msgs, evaluate or {})
        replies, validation = split(out, exchange(grid, out))
        return Batch(msgs, replies, validation)

    def expect(self, tag: str, nodes: dict[str, list[int]], lengths: dict[str, int]) -> None:
        """Nothing to prepare: a plaintext batch needs no session."""

    def updates(self, grid: Grid, batch: Batch, accepted: dict[str, list[Message]],
                cohorts: dict[str, Cohort], record: RoundRecord
                ) -> dict[str, list[Message]]:
        """The accepted replies that pass every gate; a rejected site is dropped from the
        round with its reason logged, and counted in ``rejected``."""
        gated = {}
        for arch, cohort in cohorts.items():
            names = {p.node_id: p.name for p in cohort.participants}
            gated[arch], rejected = gate_updates(
                cohort.arrays, accepted[arch],
                {p.node_id: p.num_train for p in cohort.participants}, self.max_update_norm)
            record.cohort(arch).rejected = len(rejected)
            for r in rejected:
                log.warning("round %s: cohort %s: update of %s rejected: %s", record.round,
                            arch, names.get(r.node_id, r.node_id), r.reason)
        return gated

    def statistics(self, grid: Grid, msgs: list[Message], participants: list[Participant],
                   num_members: int) -> Statistics | None:
        """The sites' statistics in plaintext, summed in site order."""
        rank = {p.node_id: p.index for p in participants}
        replies = sorted((r for r in grid.send_and_receive(msgs) if not r.has_error()),
                         key=lambda r: rank.get(r.metadata.src_node_id, -1))
        if not replies:
            return None
        A = np.sum([wire.as_array(wire.arrays(r, "stats"), "A") for r in replies], axis=0)
        b = np.sum([wire.as_array(wire.arrays(r, "stats"), "b") for r in replies], axis=0)
        n = sum(wire.as_int(wire.metrics(r), "num-examples") for r in replies)
        return A, b, n, len(replies)


class SecureCollector:
    """Only each group's sum is unmasked (``fedfuse.secagg``; the sessions of all
    groups run side by side, ``fedfuse.coordinator.sessions``)."""

    secure = True

    def __init__(self, threshold: float, clip_range: float, quantization_bits: int,
                 neighbours: int = 0, consistency: bool = False) -> None:
        self.threshold = threshold
        self.clip_range = clip_range
        self.bits = quantization_bits
        self.secure_sums = 0
        self.culprits: set[int] = set()
        self.openings = Openings(threshold, neighbours, consistency)

    def expect(self, tag: str, nodes: dict[str, list[int]], lengths: dict[str, int]) -> None:
        """Open each group's session for that batch on the exchanges until then: its
        setup rides on the next exchange, its share stage on the one after."""
        for group, members_ in nodes.items():
            self.openings.expect(f"{tag}/{group}", members_, lengths[group])

    def send(self, grid: Grid, msgs: dict[str, list[Message]], lengths: dict[str, int],
             tag: str, clip: dict[str, float | None],
             evaluate: dict[str, list[Message]] | None = None) -> Batch:
        """Each group's session, ready (opened on earlier exchanges, see ``expect``) or
        opened now (stages 1-2, keys and sealed shares); then its messages to the
        members that shared, each asking for a masked vector (stage 3), in one exchange
        that carries a stage of every session being opened."""
        nodes = {g: members(group) for g, group in msgs.items()}
        failed = {g: f"{tag}/{g}: {len(n)} client(s) sampled; a secure sum needs at least "
                     f"{MIN_SURVIVORS} (over two, each update is the sum minus the other)"
                  for g, n in nodes.items() if len(n) < MIN_SURVIVORS}
        for reason in failed.values():
            log.warning("secure aggregation skipped: %s", reason)
        ready, why = self.openings.take(grid, {f"{tag}/{g}": (n, lengths[g])
                                               for g, n in nodes.items()
                                               if len(n) >= MIN_SURVIVORS})
        sessions = {g: ready[f"{tag}/{g}"] for g in nodes if f"{tag}/{g}" in ready}
        failed.update({g: why[f"{tag}/{g}"] for g in nodes if f"{tag}/{g}" in why})
        advance(sessions, failed, lambda g, s: s.narrow(str(n) for n in nodes[g]))
        settings = {g: {"clip-range": self.clip_for(c), "quantization-bits": self.bits}
                    for g, c in clip.items()}
        sent = {g: with_session(group, sessions.get(g), **settings.get(g, {}))
                for g, group in msgs.items()}
        out = fold(sent, evaluate or {})
        replies, validation = split(out, self.openings.exchange(grid, out))
        return Batch(sent, replies, validation, sessions, failed)

    def updates(self, grid: Grid, batch: Batch, accepted: dict[str, list[Message]],
                cohorts: dict[str, Cohort], record: RoundRecord
                ) -> dict[str, list[Message]]:
        """Stages 3-4: each cohort's sum of masked vectors, unmasked and decoded into one
        FedAvg update carrying the cohort's total weight; a sum whose count disagrees
        with the sites in it is rejected and the cohort keeps its model."""
        declined = {a: {r.metadata.src_node_id for r in batch.replies[a]}
                    - {r.metadata.src_node_id for r in accepted[a]} for a in cohorts}
        collect_masked(batch.sessions, batch.failed, batch.replies, declined)
        sums = close_sessions(grid, self.openings, batch.sessions, batch.failed,
                              self.culprits)
        out: dict[str, list[Message]] = {}
        for arch, cohort in cohorts.items():
            entry = record.cohort(arch)
            entry.secagg_failed = arch in batch.failed
            out[arch] = []
            if arch not in sums:
                continue
            session = batch.sessions[arch]
            entry.secagg_clients, entry.secagg_dropped = len(session.u3), len(session.dropped)
            expected = sum(cohort.weight(p) for p in cohort.participants
                           if str(p.node_id) in session.u3)
            try:
                total = decode_sum(sums[arch], [tuple(a.shape) for a in cohort.arrays.values()],
                                   Quantizer(self.clip_for(cohort.clip_range), self.bits))
                if total.num_examples != expected:
                    raise ValueError(f"it counts {total.num_examples} training examples, the "
                                     f"{len(session.u3)} clients in it reported {expected}")
            except ValueError as exc:
                log.warning("round %s: cohort %s: the secure sum is rejected (%s): a client "
                            "sent a dishonest or malformed vector; the cohort keeps its model",
                            record.round, arch, exc)
                entry.secagg_failed = True
                continue
            entry.secagg_clipped = total.clipped
            if total.clipped:
                log.warning("cohort %s: %d update coordinates exceeded "
                            "secure_aggregation.clip_range and were clipped", arch,
                            total.clipped)
            like = next(m for m in batch.sent[arch]
                        if str(m.metadata.dst_node_id) in session.u3)
            out[arch] = [aggregate_reply(cohort.arrays, total, like)]
            self.secure_sums += 1
        return out

    def statistics(self, grid: Grid, msgs: list[Message], participants: list[Participant],
                   num_members: int) -> Statistics | None:
        """The same sums through one session over all sites: each site masks the
        fixed-point vector [A, b, n] and only the total is unmasked."""
        m = num_members
        summed = self.secure_sum(grid, FUSION, msgs, statistics_length(m))
        if summed is None:
            return None
        try:
            A, b, n = bounded_statistics(decode_fixed(summed[0]), m)
        except ValueError as exc:
            log.warning("the secure sum of the fusion statistics is rejected (%s): a site "
                        "sent a dishonest or malformed vector", exc)
            return None
        return A, b, n, len(summed[1].u3)

    def secure_sum(self, grid: Grid, tag: str, msgs: list[Message], length: int
                   ) -> tuple[np.ndarray, SecAggSession] | None:
        """The sum of the masked ``length``-entry vectors that ``msgs``' nodes answer
        with, through one session over them, and that session; None if it failed."""
        batch = self.send(grid, {tag: msgs}, {tag: length}, tag, {})
        collect_masked(batch.sessions, batch.failed, batch.replies, {})
        sums = close_sessions(grid, self.openings, batch.sessions, batch.failed,
                              self.culprits)
        return (sums[tag], batch.sessions[tag]) if tag in sums else None

    def clip_for(self, clip_range: float | None) -> float:
        """A group's per-coordinate clip: its own, else the configured one."""
        return clip_range or self.clip_range


def make_collector(cfg: FedfuseConfig) -> PlaintextCollector | SecureCollector:
    s = cfg.secure_aggregation
    if s.enabled:
        return SecureCollector(s.threshold, s.clip_range, s.quantization_bits, s.neighbours,
                               s.consistency_check)
    return PlaintextCollector(cfg.robustness.max_update_norm)
