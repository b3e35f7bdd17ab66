"""The coordinator's half of the protocol: one ``SecAggSession`` per group per round.

A session builds the records of its stages (setup, share, masking request, unmask) and
reads the answers out of whatever replies carry them: each stage's records may ride on
another session's messages (``fedfuse.coordinator.sessions``).

The coordinator relays keys and sealed shares, collects masked vectors and, from the
survivors' shares, rebuilds exactly the secrets it needs: the self-mask seed b of every
survivor and the masking key s of every member that dropped after sharing. Every reply is
checked before it is used; a malformed one (wrong lengths, unknown node ids, shares that
do not match their sharer's commitment) drops that client from the session with a
logged reason, and the session goes on while at least ``threshold`` clients remain.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from fedfuse.secagg import consistency, crypto
from fedfuse.secagg.checks import (
    SecAggAbort,
    list_field,
    masked_vector,
    node_ids,
    rebuild,
    signed_identity,
    verified_shares,
)
from fedfuse.secagg.graph import neighbourhoods
from fedfuse.secagg.messages import (
    CIPHERTEXT_BYTES,
    COMMIT_BYTES,
    KEYS,
    MASKED,
    PAIR_MASK_LABEL,
    PUBLIC_KEY_BYTES,
    REFUSED,
    REVEAL,
    SELF_MASK_LABEL,
    SESSION_BYTES,
    SHARES,
)

log = logging.getLogger("fedfuse.secagg")


def threshold_for(fraction: float, selected: int) -> int:
    """t = max(2, ceil(fraction * n)) for n selected clients, at most n."""
    # - 1e-9: 0.6 * 5 is 3.0000000000000004 in floating point, and must give 3
    return min(selected, max(2, math.ceil(fraction * selected - 1e-9)))


class SecAggSession:
    """A secure sum over ``nodes`` of vectors with ``length`` uint64 entries; each member
    shares with and masks with its neighbourhood of ``neighbours`` peers (0: all of
    them; ``fedfuse.secagg.graph``)."""

    def __init__(self, group: str, nodes: Sequence[int], threshold_fraction: float,
                 length: int, neighbours: int = 0, consistency: bool = False) -> None:
        self.group = group
        self.session = os.urandom(SESSION_BYTES)
        self.selected = [str(n) for n in nodes]
        self.threshold = threshold_for(threshold_fraction, len(self.selected))
        """Members needed at every stage, and responders needed to unmask."""
        self.neighbours = neighbours
        planned = len(self.selected) if neighbours == 0 else min(neighbours + 1,
                                                                  len(self.selected))
        self.share_threshold = threshold_for(threshold_fraction, planned)
        """t_u: shares of a member's secrets needed to rebuild them. Taken of the planned
        neighbourhood (n, or k + 1), never of what is left after members fail setup: fewer
        members must not let fewer colluders rebuild a secret."""
        self.graph: dict[str, list[str]] = {}
        """U1 member -> its neighbourhood N(u) (itself included), in U1 order."""
        self.length = length
        self.dropped: dict[str, str] = {}
        """Node id -> why it left the session."""
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        """U1: node -> (c_pk, s_pk)."""
        self.identities: dict[str, tuple[bytes, bytes]] = {}
        """U1: node -> (identity public key, its signature of the keys), or b"" each."""
        self.sealed: dict[str, dict[str, bytes]] = {}
        """U2: sharer -> recipient -> sealed shares."""
        self.commitments: dict[str, dict[str, Any]] = {}
        self.vectors: dict[str, np.ndarray] = {}
        """U3: node -> masked vector."""
        self.consistency = consistency
        """Run the consistency check between masked input and unmasking
        (``fedfuse.secagg.consistency``)."""
        self.signatures: dict[str, bytes] = {}
        """U4: node -> its signature of U3."""

    @property
    def stage(self) -> str:
        """The next stage to open the session: ``setup``, ``share``, or ``ready`` for
        masked input."""
        return "setup" if not self.keys else "share" if not self.sealed else "ready"

    # -- stage 1 ------------------------------------------------------------------------

    def setup_record(self) -> ConfigRecord:
        """Stage 1's request, the same for every selected node."""
        return ConfigRecord({"session": self.session, "group": self.group})

    def receive_keys(self, replies: Iterable[Message]) -> None:
        seen: set[bytes] = set()
        for node, rec in self.answers(replies, self.selected, "setup", KEYS):
            c_pk, s_pk = rec.get("c-pk"), rec.get("s-pk")
            if not (isinstance(c_pk, bytes) and isinstance(s_pk, bytes)
                    and len(c_pk) == len(s_pk) == PUBLIC_KEY_BYTES):
                self._drop(node, "setup: public keys are not two 32-byte X25519 keys")
            elif not (crypto.usable_public_key(c_pk) and crypto.usable_public_key(s_pk)):
                self._drop(node, "setup: a public key of small order (no agreement with it "
                                 "would be secret)")
            elif c_pk in seen or s_pk in seen or c_pk == s_pk:
                self._drop(node, "setup: a public key already advertised in this session")
            elif (signed := signed_identity(self.session, node, rec, c_pk, s_pk)) is None:
                self._drop(node, "setup: the key advertisement's signature does not verify")
            else:
                seen.update((c_pk, s_pk))
                self.keys[node] = (c_pk, s_pk)
                self.identities[node] = signed
        self._require(len(self.keys), "advertised keys")
        self.graph = neighbourhoods(self.u1, self.neighbours, random.SystemRandom())

    # -- stage 2 ------------------------------------------------------------------------

    @property
    def u1(self) -> list[str]:
        return [n for n in self.selected if n in self.keys]

    def share_records(self) -> dict[str, ConfigRecord]:
        """Stage 2's request to each U1 member u: N(u) with its keys and signed
        advertisements, t_u, and U1 (which the sealed shares are bound to)."""
        return {u: ConfigRecord({
            "session": self.session, "threshold": self.share_threshold, "members": self.u1,
            "nodes": hood, "c-pk": [self.keys[n][0] for n in hood],
            "s-pk": [self.keys[n][1] for n in hood],
            "identity": [self.identities[n][0] for n in hood],
            "signature": [self.identities[n][1] for n in hood]})
            for u, hood in self.graph.items()}

    def receive_shares(self, replies: Iterable[Message]) -> None:
        for node, rec in self.answers(replies, self.u1, "share", SHARES):
            hood = self.graph[node]
            others = [n for n in hood if n != node]
            to, sealed = node_ids(rec.get("to")), list_field(rec.get("ciphertexts"))
            commit_b, commit_s = list_field(rec.get("commit-b")), list_field(rec.get("commit-s"))
            b_hash = rec.get("b-hash")
            if to is None or sealed is None or commit_b is None or commit_s is None:
                self._drop(node, "share: the reply's fields are not lists of the right types")
            elif sorted(to) != sorted(others) or len(sealed) != len(to):
                self._drop(node, "share: sealed shares are not addressed to exactly the "
                                 "member's neighbours")
            elif any(not isinstance(x, bytes) or len(x) != CIPHERTEXT_BYTES for x in sealed):
                self._drop(node, f"share: a sealed share is not {CIPHERTEXT_BYTES} bytes")
            elif any(len(c) != len(hood) or any(not isinstance(x, bytes) or len(x) != COMMIT_BYTES
                                              for x in c) for c in (commit_b, commit_s)) \
                    or not isinstance(b_hash, bytes) or len(b_hash) != COMMIT_BYTES:
                self._drop(node, "share: commitments are missing or malformed")
            else:
                self.sealed[node] = dict(zip(to, sealed, strict=True))
                self.commitments[node] = {"b": commit_b, "s": commit_s, "b-hash": b_hash}
        self._require(len(self.sealed), "shared their keys")

    # -- stage 3 ------------------------------------------------------------------------

    @property
    def u2(self) -> list[str]:
        return [n for n in self.u1 if n in self.sealed]

    def narrow(self, nodes: Iterable[str]) -> None:
        """Keep in U2 only ``nodes`` (those asked for masked input: a member retired
        since it shared gets no train message). The others leave before anyone masks
        with them, so nothing of theirs is ever revealed."""
        keep = set(nodes)
        for node in [n for n in self.u2 if n not in keep]:
            del self.sealed[node]
            self.dropped.setdefault(node, "not asked for masked input")
        self._require(len(self.u2), "asked for masked input")

    def mask_request(self, node: str, **settings: Any) -> ConfigRecord:
        """The record to attach to U2 member ``node``'s train message: its neighbours
        that shared (U2 within N(u))."""
        return ConfigRecord({"session": self.session,
                             "nodes": [n for n in self.graph[node] if n in self.sealed],
                             **settings})

    def receive_masked(self, replies: Iterable[Message],
                       declined: Iterable[int] = ()) -> None:
        """Masked vectors from the train replies; ``declined`` nodes answered without one
        on purpose (for example: privacy budget spent)."""
        refused = {str(n) for n in declined}
        u2 = self.u2
        answered = set()
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if node not in u2:
                log.warning("%s: masked input from node %s, which is not in the session",
                            self.group, node)
                continue
            answered.add(node)
            if reply.has_error():
                self._drop(node, f"mask: failed ({_reason(reply)})")
            elif node in refused:
                self._drop(node, "mask: declined to train")
            elif MASKED not in reply.content.array_records \
                    or "vector" not in reply.content.array_records[MASKED]:
                self._drop(node, "mask: the reply has no masked vector")
            else:
                vec = masked_vector(reply.content.array_records[MASKED]["vector"],
                                    self.length)
                if isinstance(vec, str):
                    self._drop(node, f"mask: {vec}")
                else:
                    self.vectors[node] = vec
        for node in set(u2) - answered:
            self._drop(node, "mask: no answer")
        self._require(len(self.vectors), "sent a masked vector")

    # -- stage 4 ------------------------------------------------------------------------

    @property
    def u3(self) -> list[str]:
        return [n for n in self.u2 if n in self.vectors]

    def unmask_records(self) -> dict[str, ConfigRecord]:
        """Stage 4's request to each survivor u (each that signed U3, after a
        consistency check): its neighbours in U3 and in U2 \\ U3, the shares they sealed
        to it, and the signatures of U3."""
        records = {}
        signed = consistency.certificate(self) if self.consistency else {}
        for node in self.u3 if not self.consistency else signed["signers"]:
            hood = [n for n in self.graph[node] if n in self.sealed]
            peers = [s for s in hood if s != node]
            records[node] = ConfigRecord({
                "session": self.session, "survivors": [n for n in hood if n in self.vectors],
                "dropped": [n for n in hood if n not in self.vectors], "from": peers,
                "ciphertexts": [self.sealed[s][node] for s in peers], **signed})
        return records

    def receive_unmask(self, replies: Iterable[Message]) -> np.ndarray:
        """The unmasked sum over U3 of the clients' vectors (mod 2^64)."""
        u2, u3 = self.u2, self.u3
        dropped = [n for n in u2 if n not in self.vectors]
        b_shares: dict[str, dict[int, bytes]] = {n: {} for n in u3}
        s_shares: dict[str, dict[int, bytes]] = {n: {} for n in dropped}
        responders = 0
        for node, rec in self.answers(replies, u3, "unmask", REVEAL, drop=False):
            got = verified_shares(self, node, rec, set(u3), set(dropped))
            if got is None:
                continue
            responders += 1
            for kind, src, share in got:
                (b_shares if kind == b"b" else s_shares)[src][self.share_index(src, node)] = share
        if responders < self.threshold:
            raise SecAggAbort(f"{self.group}: {responders} clients returned valid shares, "
                              f"the threshold is {self.threshold}")
        return remove_masks(self, b_shares, s_shares)

    def share_index(self, sharer: str, holder: str) -> int:
        """The Shamir x-coordinate of ``holder``'s share of ``sharer``'s secrets: its
        place in N(sharer), from 1."""
        return self.graph[sharer].index(holder) + 1

    # -- helpers ------------------------------------------------------------------------

    def answers(self, replies: Iterable[Message], expected: list[str], stage: str,
                 record: str, drop: bool = True) -> Iterable[tuple[str, ConfigRecord]]:
        """(node, answer ``record``) of the well-formed replies from ``expected`` nodes;
        the others are dropped (or only logged, ``drop=False``) with the reason."""
        expected_set = set(expected)
        answered = set()
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if node not in expected_set:
                log.warning("%s: %s reply from node %s, which is not in the session; ignored",
                            self.group, stage, node)
                continue
            answered.add(node)
            if reply.has_error():
                reason = f"{stage}: failed ({_reason(reply)})"
            elif record in reply.content.config_records:
                yield node, reply.content.config_records[record]
                continue
            else:
                reason = f"{stage}: {_missing(reply, record)}"
            self._drop(node, reason) if drop else log.warning("%s: node %s: %s", self.group,
                                                              node, reason)
        for node in expected_set - answered:
            self._drop(node, f"{stage}: no answer") if drop else None

    def _drop(self, node: str, reason: str) -> None:
        """Remove ``node`` from the session, logging why."""
        self.dropped.setdefault(node, reason)
        log.warning("%s: node %s leaves the secure aggregation: %s", self.group, node, reason)

    def _require(self, remaining: int, what: str) -> None:
        if remaining < self.threshold:
            raise SecAggAbort(f"{self.group}: only {remaining} clients {what}, the "
                              f"threshold is {self.threshold}")


def remove_masks(session: SecAggSession, b_shares: dict[str, dict[int, bytes]],
                 s_shares: dict[str, dict[int, bytes]]) -> np.ndarray:
    """sum_{u in U3} y_u - PRG(b_u), plus or minus the pairwise masks of every dropped v
    with its neighbours in U3 (mod 2^64): the survivors' sum, once b of each survivor
    and s of each dropped member are rebuilt from their shares (and verified against
    the committed H(b) and the advertised s_pk)."""
    dropped = [n for n in session.u2 if n not in session.vectors]
    total = np.zeros(session.length, dtype=np.uint64)
    for node in session.u3:
        total = total + session.vectors[node]
        b = rebuild(f"{session.group}: node {node}'s b", b_shares[node],
                    session.share_threshold, node)
        if crypto.digest(b) != session.commitments[node]["b-hash"]:
            raise SecAggAbort(f"{session.group}: node {node}'s shares do not rebuild the "
                              "mask seed it committed to", culprit=node)
        total = total - crypto.mask_words(
            crypto.derive(b, SELF_MASK_LABEL + session.session), session.length)
    order = {n: i for i, n in enumerate(session.u1)}
    for gone in dropped:
        s = rebuild(f"{session.group}: node {gone}'s s", s_shares[gone],
                    session.share_threshold, gone)
        if crypto.public_key(s) != session.keys[gone][1]:
            raise SecAggAbort(f"{session.group}: node {gone}'s shares do not rebuild the "
                              "masking key it advertised", culprit=gone)
        masked_with = [n for n in session.graph[gone] if n in session.vectors]
        pair_keys = crypto.agree_all(s, [session.keys[node][1] for node in masked_with],
                                     PAIR_MASK_LABEL + session.session)
        for node, key in zip(masked_with, pair_keys, strict=True):
            words = crypto.mask_words(key, session.length)
            # node added +words if it comes before `gone`, else -words
            total = total - words if order[node] < order[gone] else total + words
    return total


def _reason(reply: Message) -> str:
    """The first line of a failed reply's error, shortened."""
    return (reply.error.reason or "no reason given").splitlines()[0][:200]


def _missing(reply: Message, record: str) -> str:
    """Why a reply has no ``record``: the site's stated refusal, or its absence."""
    refused = reply.content.config_records.get(REFUSED, ConfigRecord()).get(record)
    return (f"refused ({str(refused)[:200]})" if refused is not None
            else f"the reply has no {record!r} record")
