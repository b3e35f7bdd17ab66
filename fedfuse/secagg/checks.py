"""Checks of what clients send the coordinator: masked vectors, revealed shares, and the
secrets rebuilt from them. A malformed reply is reported, so that it drops its sender,
not the session or the run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ConfigRecord

from fedfuse.errors import FedfuseError
from fedfuse.secagg import crypto, shamir
from fedfuse.secagg.messages import advertisement, share_commitment

if TYPE_CHECKING:
    from fedfuse.secagg.server import SecAggSession

log = logging.getLogger("fedfuse.secagg")


class SecAggAbort(FedfuseError):
    """The session cannot produce a sum (too few clients left, or a sharer's shares do
    not rebuild its committed secret); the group's round fails without revealing anyone's
    update. ``culprit``: the node at fault, where one is proven (a sharer whose shares,
    each matching its own commitment, do not make the secret it committed to)."""

    def __init__(self, message: str, culprit: str | None = None) -> None:
        super().__init__(message)
        self.culprit = culprit


def verified_shares(session: SecAggSession, node: str, rec: ConfigRecord,
                    survivors: set[str], dropped: set[str]
                    ) -> list[tuple[bytes, str, bytes]] | None:
    """A responder's shares, each checked against its sharer's commitment; None (and
    the responder's shares discarded) if any is malformed, foreign or forged (of
    ``session``)."""
    out = []
    for kind, wanted, key in ((b"b", survivors, "b"), (b"s", dropped, "s")):
        sources = node_ids(rec.get(f"{key}-from"))
        shares = list_field(rec.get(f"{key}-shares"))
        if sources is None or shares is None or len(sources) != len(shares) \
                or len(set(sources)) != len(sources):
            log.warning("%s: node %s's %s-shares are malformed; ignored", session.group,
                        node, key)
            return None
        for src, share in zip(sources, shares):
            if src not in wanted or node not in session.graph[src]:
                log.warning("%s: node %s returned a %s-share of %s, which was not asked "
                            "for; its shares are ignored", session.group, node, key, src)
                return None
            index = session.share_index(src, node)
            expected = session.commitments[src][key][index - 1]
            if not isinstance(share, bytes) or share_commitment(
                    session.session, kind, src, index, share) != expected:
                log.warning("%s: node %s returned a %s-share of %s that does not match "
                            "the sharer's commitment; its shares are ignored",
                            session.group, node, key, src)
                return None
            out.append((kind, src, share))
    return out


def masked_vector(array: Array, length: int) -> np.ndarray | str:
    """A client's masked vector from its record, or why it is not one: checked before it
    is decoded, and decoded without trusting the bytes (a client's ``Array`` is its own
    serialisation; a malformed one must drop that client, not end the run)."""
    expected = f"expected uint64[{length}]"
    if array.dtype != "uint64" or list(array.shape) != [length]:
        return f"vector is {array.dtype}{list(array.shape)}, {expected}"
    try:
        vec = array.numpy()
    except Exception as exc:  # any decoding failure is the sender's
        return f"vector does not decode ({type(exc).__name__}), {expected}"
    if vec.dtype != np.uint64 or vec.shape != (length,):
        return f"vector is {vec.dtype}{list(vec.shape)}, {expected}"
    return vec


def signed_identity(session: bytes, node: str, rec: ConfigRecord, c_pk: bytes,
                    s_pk: bytes) -> tuple[bytes, bytes] | None:
    """A member's (identity public key, signature of its advertisement) from its setup
    answer, (b"", b"") without them; None if they are there and do not verify."""
    pid, sig = rec.get("identity", b""), rec.get("signature", b"")
    if not (isinstance(pid, bytes) and isinstance(sig, bytes)):
        return None
    if pid and not crypto.verifies(pid, sig, advertisement(session, node, c_pk, s_pk)):
        return None
    return pid, sig


def rebuild(what: str, shares: dict[int, bytes], threshold: int, sharer: str) -> bytes:
    """The secret ``what`` of ``sharer`` from its first ``threshold`` Shamir shares (by
    index; each already matched the sharer's commitment, so shares that combine to no
    secret are the sharer's doing)."""
    if len(shares) < threshold:
        raise SecAggAbort(f"{what}: {len(shares)} shares, the threshold is {threshold}")
    try:
        return shamir.combine_shares(dict(sorted(shares.items())[:threshold]))
    except ValueError as exc:
        raise SecAggAbort(f"{what}: {exc}", culprit=sharer) from None




def list_field(value: Any) -> list[Any] | None:
    """A record field that must be a list (``None`` if it is missing or is not)."""
    return list(value) if isinstance(value, list) else None


def node_ids(value: Any) -> list[str] | None:
    """A record field that must be a list of node ids (strings)."""
    items = list_field(value)
    return items if items is not None and all(isinstance(x, str) for x in items) else None
