"""The client's half of the protocol: four stages over the node's persistent state.

Every session has its own state record (``secagg/<session hex>``), at most
``MAX_SESSIONS`` of them at once (setting up one more forgets the oldest), so a site can
hold the session it masked for and the next one, whose stages ride on the same messages
(``answer``). Keys are fresh per session and never shared between sessions.

Session of one group (a cohort's sampled clients), as the client sees it:
1. setup: draw two X25519 key pairs, (c, c_pk) to encrypt shares and (s, s_pk) to agree
   pairwise masks; answer both public keys.
2. share: get every member's public keys (U1). Draw the self-mask seed b; Shamir-share b
   and s among U1 with threshold t; seal each member's two shares to it with the key
   agreed from c; answer the sealed shares and a commitment to every share and to b.
3. mask (inside the train handler): get the members that shared (U2); answer
   y = x + PRG(b) + sum_{v in U2, v after u} PRG(s_uv) - sum_{v before u} PRG(s_uv) mod 2^64.
   check (with a consistency check, ``fedfuse.secagg.consistency``): get U3 (who sent
   y); sign it, once.
4. unmask: get the survivors U3 and the dropped U2 \\ U3 among this client's neighbours,
   with the sealed shares addressed to it (and, after a check, more than 2/3 of U1's
   signatures of the U3 it signed); answer the shares of b for survivors and of s for
   the dropped, never both for one member, for at least ``MIN_SURVIVORS`` survivors;
   then forget the round's keys.
A request that contradicts what the client already saw, or a threshold that is not a
majority of the members, raises SecAggError, so the client
drops out instead of helping to unmask anyone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedfuse.errors import FedfuseError
from fedfuse.secagg import consistency, crypto, shamir
from fedfuse.secagg.messages import (
    CHECK_RECORD,
    FINISHED,
    FINISHED_KEPT,
    MASKED,
    MAX_SESSIONS,
    MIN_SURVIVORS,
    PAIR_MASK_LABEL,
    RECORD,
    REFUSED,
    SELF_MASK_LABEL,
    SESSION_BYTES,
    SETUP_RECORD,
    SHARE_KEY_LABEL,
    SHARE_RECORD,
    STAGES,
    UNMASK_RECORD,
    advertisement,
    associated_data,
    share_commitment,
)
from fedfuse.wire import WireError, as_bytes, as_int, as_list

__all__ = ["MASKED", "RECORD", "Identity", "SecAggError", "answer", "mask", "setup", "share",
           "unmask"]

T = TypeVar("T")


class SecAggError(FedfuseError):
    """A protocol request this client refuses to answer."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SecAggError(f"secure aggregation: {message}")


def state_key(session: bytes) -> str:
    """The node-state record of one session: ``secagg/<session hex>``."""
    return f"{RECORD}/{session.hex()}"


def _state(state: RecordDict, session: bytes) -> ConfigRecord:
    records = state.config_records
    key = state_key(session)
    _require(key in records and records[key].get("session") == session,
             "request for a session this client did not set up (or already finished)")
    return records[key]


def _sessions(state: RecordDict) -> list[str]:
    """This node's live session records, oldest first."""
    live = [k for k in state.config_records if k.startswith(f"{RECORD}/")]
    return sorted(live, key=lambda k: as_int(state.config_records[k], "serial"))


def _session(request: ConfigRecord) -> bytes:
    """The request's session id."""
    return _fields(as_bytes, request, "session")


def _finished(state: RecordDict) -> list[bytes]:
    """The ids of the sessions this node finished or abandoned (the newest ones)."""
    records = state.config_records
    return as_list(records[FINISHED], "ids", bytes) if FINISHED in records else []


def _finish(state: RecordDict, key: str) -> None:
    """Forget a session's state record and remember its id as finished."""
    done = _finished(state)
    done.append(as_bytes(state.config_records[key], "session"))
    state[FINISHED] = ConfigRecord({"ids": done[-FINISHED_KEPT:]})
    del state[key]


@dataclass(frozen=True)
class Identity:
    """A site's identity in secure aggregation: the key it signs its advertisements
    with, and what it demands of its peers' (its policy, ``fedfuse.site.policy``)."""

    key: bytes
    """The Ed25519 private key (``crypto.identity_key``)."""
    verify: bool = False
    """Verify every member's signed advertisement before sharing with it."""
    pinned: frozenset[bytes] = frozenset()
    """If not empty, the only identity public keys a member may have."""
    consistency: bool = False
    """Reveal only after a consistency check (``fedfuse.secagg.consistency``), and share
    only with a threshold above 2/3 of the members; without it, a session that had a
    check still needs its certificate to unmask."""


def setup(state: RecordDict, request: ConfigRecord, me: str = "",
          identity: Identity | None = None) -> ConfigRecord:
    """Stage 1: fresh key pairs for this session; answer their public halves (signed
    with ``identity``, as node ``me``, when there is one)."""
    session = _session(request)
    _require(len(session) == SESSION_BYTES, f"a session id is {SESSION_BYTES} bytes")
    _require(state_key(session) not in state.config_records,
             "setup for a session this client already set up")
    _require(session not in _finished(state), "setup for a session this client already "
             "finished")
    live = _sessions(state)
    serial = 1 + max((as_int(state.config_records[k], "serial") for k in live), default=0)
    for old in live[:max(0, len(live) - MAX_SESSIONS + 1)]:
        _finish(state, old)  # abandoned by the coordinator (an aborted or stale session)
    c, s = crypto.new_private_key(), crypto.new_private_key()
    c_pk, s_pk = crypto.public_key(c), crypto.public_key(s)
    state[state_key(session)] = ConfigRecord({"session": session, "serial": serial, "c": c,
                                              "s": s, "own-c-pk": c_pk, "own-s-pk": s_pk})
    keys = ConfigRecord({"c-pk": c_pk, "s-pk": s_pk})
    if identity is not None:
        keys["identity"] = crypto.identity_public(identity.key)
        keys["signature"] = crypto.sign(identity.key, advertisement(session, me, c_pk, s_pk))
    return keys


def check_advertisements(request: ConfigRecord, session: bytes, nodes: list[str],
                         c_pk: list[bytes], s_pk: list[bytes], identity: Identity) -> None:
    """Refuse unless every member's keys carry its identity's signature (and, with pins,
    the identity is a pinned one): a coordinator that substitutes a member's keys
    cannot sign them as that member."""
    ids = _fields(as_list, request, "identity", bytes)
    sigs = _fields(as_list, request, "signature", bytes)
    _require(len(ids) == len(sigs) == len(nodes), "the members' identities and signatures "
             "do not match the member list")
    for node, pid, sig, c, s in zip(nodes, ids, sigs, c_pk, s_pk, strict=True):
        _require(crypto.verifies(pid, sig, advertisement(session, node, c, s)),
                 f"member {node}'s key advertisement is not signed by its identity (keys "
                 "substituted?)")
        _require(not identity.pinned or pid in identity.pinned,
                 f"member {node}'s identity {pid.hex()[:16]}... is not one this site pins")


def share(state: RecordDict, request: ConfigRecord, me: str,
          identity: Identity | None = None) -> ConfigRecord:
    """Stage 2: share b and s among the members in ``request["nodes"]``, sealed to each
    (after checking their signed advertisements, if ``identity`` says so)."""
    session = _session(request)
    st = _state(state, session)
    _require("b" not in st, "a second share request in one session")
    nodes, members = _fields(as_list, request, "nodes", str), _fields(as_list, request,
                                                                       "members", str)
    c_pk, s_pk = _fields(as_list, request, "c-pk", bytes), _fields(as_list, request, "s-pk", bytes)
    t = _fields(as_int, request, "threshold")
    _require(len(members) == len(set(members)) and set(nodes) <= set(members),
             "the member's neighbourhood is not within the session's members")
    c_key, s_key = as_bytes(st, "c"), as_bytes(st, "s")
    _require(len(nodes) == len(set(nodes)) == len(c_pk) == len(s_pk),
             "the member list and key lists disagree")
    _require(me in nodes, "this client is not in the member list")
    mine = nodes.index(me)
    _require(c_pk[mine] == as_bytes(st, "own-c-pk") and s_pk[mine] == as_bytes(st, "own-s-pk"),
             "the coordinator relayed other public keys for this client")
    _require(len(set(c_pk)) == len(c_pk) and len(set(s_pk)) == len(s_pk),
             "two members advertise the same public key")
    _require(2 <= t <= len(nodes) and 2 * t > len(nodes),
             f"threshold {t} is not a majority of the {len(nodes)} members")
    _require(identity is None or not identity.consistency or 3 * t > 2 * len(nodes),
             f"threshold {t} of {len(nodes)} members is not above 2/3, which this site's "
             "policy requires (the consistency check assumes it)")
    if identity is not None and identity.verify:
        check_advertisements(request, session, nodes, c_pk, s_pk, identity)
    b = os.urandom(shamir.SECRET_BYTES)
    b_shares, s_shares = shamir.split_secrets([b, s_key], t, len(nodes))
    to, sealed = [], []
    keys = _agree_all(c_key, c_pk[:mine] + c_pk[mine + 1:], SHARE_KEY_LABEL + session)
    keys.insert(mine, b"")  # K_uv both ways: seals now, opens at unmask
    for j, node in enumerate(nodes):
        if j != mine:
            sealed.append(crypto.seal(keys[j], b_shares[j] + s_shares[j],
                                      associated_data(session, me, node, t, members)))
            to.append(node)
    ids = request.get("identity")
    st.update({"threshold": t, "nodes": nodes, "members": members, "share-keys": keys,
               "s-pk": s_pk, "b": b, "own-b": b_shares[mine], "own-s": s_shares[mine],
               "identities": ids if isinstance(ids, list) and len(ids) == len(nodes) else []})
    state[state_key(session)] = st
    return ConfigRecord({
        "to": to, "ciphertexts": sealed, "b-hash": crypto.digest(b),
        "commit-b": [share_commitment(session, b"b", me, j + 1, x)
                     for j, x in enumerate(b_shares)],
        "commit-s": [share_commitment(session, b"s", me, j + 1, x)
                     for j, x in enumerate(s_shares)],
    })


def mask(state: RecordDict, request: ConfigRecord, me: str, vector: np.ndarray) -> np.ndarray:
    """Stage 3: ``vector`` (uint64) masked with PRG(b) and the pairwise masks of U2."""
    session = _session(request)
    st = _state(state, session)
    _require("b" in st, "masking requested before shares were made")
    _require("masked-with" not in st, "a second masked vector requested in one session")
    nodes, u2 = as_list(st, "nodes", str), _fields(as_list, request, "nodes", str)
    threshold = as_int(st, "threshold")
    _require(me in u2 and set(u2) <= set(nodes) and len(u2) == len(set(u2)),
             "the members that shared are not a subset of the members")
    _require(len(u2) >= threshold,
             f"only {len(u2)} members shared, fewer than the threshold {threshold}")
    out = vector.astype(np.uint64) + crypto.mask_words(
        crypto.derive(as_bytes(st, "b"), SELF_MASK_LABEL + session), vector.size)
    s_key, s_pk = as_bytes(st, "s"), as_list(st, "s-pk", bytes)
    mine = nodes.index(me)
    peers = [nodes.index(node) for node in u2 if node != me]
    pair_keys = _agree_all(s_key, [s_pk[j] for j in peers], PAIR_MASK_LABEL + session)
    for j, key in zip(peers, pair_keys, strict=True):
        words = crypto.mask_words(key, vector.size)
        out = out + words if mine < j else out - words
    st["masked-with"] = u2
    state[state_key(session)] = st
    return out


def check(state: RecordDict, request: ConfigRecord, me: str,
          identity: Identity | None) -> ConfigRecord:
    """The consistency check: sign the survivors U3, once (``fedfuse.secagg.consistency``)."""
    session = _session(request)
    st = _state(state, session)
    if identity is None:
        raise SecAggError("secure aggregation: a consistency check, and this client has no "
                          "identity to sign with")
    _require("masked-with" in st, "a consistency check before this client masked")
    _require("checked" not in st, "a second consistency check in one session")
    u3 = _fields(as_list, request, "survivors", str)
    members, nodes = as_list(st, "members", str), as_list(st, "nodes", str)
    _require(me in u3 and len(set(u3)) == len(u3) and set(u3) <= set(members),
             "the survivors are not distinct members with this client among them")
    _require(set(u3) & set(nodes) <= set(as_list(st, "masked-with", str)),
             "a survivor this client did not mask with")
    _require(len(u3) >= consistency.needed(len(members)),
             f"{len(u3)} survivors cannot be certified by more than 2/3 of the "
             f"{len(members)} members")
    st["checked"] = u3
    state[state_key(session)] = st
    return ConfigRecord({"signature": crypto.sign(identity.key,
                                                  consistency.statement(session, u3))})


def certified(st: ConfigRecord, request: ConfigRecord, session: bytes,
              survivors: list[str], identity: Identity | None) -> None:
    """Refuse to unmask unless a consistency check this client took part in certifies
    the request's survivors, where the session had one or the policy requires one."""
    if "checked" not in st:
        _require(identity is None or not identity.consistency, "unmasking without a "
                 "consistency check of the survivors, which this site's policy requires")
        return
    u3 = as_list(st, "checked", str)
    _require(set(survivors) == set(as_list(st, "masked-with", str)) & set(u3),
             "the survivors are not those this client signed")
    nodes, ids = as_list(st, "nodes", str), as_list(st, "identities", bytes)
    problem = consistency.certificate_problem(
        session, u3, len(as_list(st, "members", str)),
        (_fields(as_list, request, "signers", str),
         _fields(as_list, request, "signer-identities", bytes),
         _fields(as_list, request, "signatures", bytes)),
        dict(zip(nodes, ids, strict=False)),
        identity.pinned if identity is not None else frozenset())
    _require(problem is None, f"the survivors are not certified: {problem}")


def unmask(state: RecordDict, request: ConfigRecord, me: str,
           identity: Identity | None = None) -> ConfigRecord:
    """Stage 4: shares of b for the survivors and of s for the dropped; then forget."""
    session = _session(request)
    st = _state(state, session)
    _require("masked-with" in st, "unmasking requested before this client masked")
    u2 = set(as_list(st, "masked-with", str))
    survivors = _fields(as_list, request, "survivors", str)
    dropped = _fields(as_list, request, "dropped", str)
    senders = _fields(as_list, request, "from", str)
    blobs = _fields(as_list, request, "ciphertexts", bytes)
    threshold = as_int(st, "threshold")
    _require(not set(survivors) & set(dropped), "a member is listed as survivor and dropped")
    _require(set(survivors) | set(dropped) == u2 and len(survivors) + len(dropped) == len(u2),
             "survivors and dropped do not make up the members that shared")
    _require(me in survivors, "this client is listed as dropped")
    _require(len(survivors) >= max(threshold, MIN_SURVIVORS),
             f"only {len(survivors)} survivors, fewer than the threshold {threshold} (or "
             f"{MIN_SURVIVORS}: a sum over two reveals each to the other)")
    certified(st, request, session, survivors, identity)
    nodes, share_keys = as_list(st, "nodes", str), as_list(st, "share-keys", bytes)
    members = as_list(st, "members", str)
    b_from, b_shares = [me], [as_bytes(st, "own-b")]
    s_from: list[str] = []
    s_shares: list[bytes] = []
    unreadable: list[str] = []
    for src, blob in zip(senders, blobs, strict=False):
        if src not in u2 or src == me:
            unreadable.append(src)
            continue
        key = share_keys[nodes.index(src)]
        try:
            plain = crypto.unseal(key, blob, associated_data(session, src, me, threshold,
                                                             members))
        except crypto.CryptoError:
            unreadable.append(src)
            continue
        half = shamir.SHARE_BYTES
        if len(plain) != 2 * half:
            unreadable.append(src)
            continue
        if src in survivors:
            b_from.append(src)
            b_shares.append(plain[:half])
        else:
            s_from.append(src)
            s_shares.append(plain[half:])
    _finish(state, state_key(session))
    return ConfigRecord({"b-from": b_from, "b-shares": b_shares, "s-from": s_from,
                         "s-shares": s_shares, "unreadable": unreadable})


def answer(state: RecordDict, content: RecordDict, me: str,
           identity: Identity | None = None) -> RecordDict:
    """The answers to every stage request riding in ``content`` (``STAGES`` order), one
    record each; a refused stage answers nothing and its reason goes to ``REFUSED``, so
    the message's other stages (and its training) still count."""
    out = RecordDict()
    refused: dict[str, str] = {}
    stages = {UNMASK_RECORD: lambda st, rq: unmask(st, rq, me, identity),
              CHECK_RECORD: lambda st, rq: check(st, rq, me, identity),
              SHARE_RECORD: lambda st, rq: share(st, rq, me, identity),
              SETUP_RECORD: lambda st, rq: setup(st, rq, me, identity)}
    for request, reply in STAGES:
        if request in content.config_records:
            try:
                out[reply] = stages[request](state, content.config_records[request])
            except SecAggError as exc:
                refused[reply] = str(exc)
    if refused:
        out[REFUSED] = ConfigRecord(dict(refused.items()))
    return out


def _agree_all(private: bytes, peers: list[bytes], label: bytes) -> list[bytes]:
    """``crypto.agree_all``, an unusable peer key refused like any other bad request (so
    a message's other stages are still answered)."""
    try:
        return crypto.agree_all(private, peers, label)
    except crypto.CryptoError as exc:
        raise SecAggError(f"secure aggregation: a member's {exc}") from None


def _fields(read: Callable[..., T], request: ConfigRecord, *args: Any) -> T:
    """``read(request, *args)``, a malformed request refused like any other."""
    try:
        return read(request, *args)
    except WireError as exc:
        raise SecAggError(f"secure aggregation: {exc}") from None
