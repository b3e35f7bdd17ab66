"""Names shared by the client and coordinator halves of the protocol."""

from __future__ import annotations

from fedfuse.secagg.crypto import NONCE_BYTES, TAG_BYTES, digest
from fedfuse.secagg.shamir import SHARE_BYTES

RECORD = "secagg"
"""The ConfigRecord that carries the protocol's fields in every stage."""
MASKED = "masked"
"""The ArrayRecord of a client's masked vector (key ``vector``) in its train reply."""

SETUP = "query.secagg_setup"
SHARE = "query.secagg_share"
UNMASK = "query.secagg_unmask"

SESSION_BYTES = 16
PUBLIC_KEY_BYTES = 32
COMMIT_BYTES = 32
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
"""A sealed pair (share of b, share of the masking key)."""

SHARE_KEY_LABEL = b"fedfuse/secagg/share-key/"
PAIR_MASK_LABEL = b"fedfuse/secagg/pair-mask/"
SELF_MASK_LABEL = b"fedfuse/secagg/self-mask/"


def associated_data(session: bytes, src: str, dst: str) -> bytes:
    """Binds a sealed share to its session, sender and recipient (no replay elsewhere)."""
    return b"|".join([session, src.encode(), dst.encode()])


def share_commitment(session: bytes, kind: bytes, src: str, index: int, share: bytes) -> bytes:
    """The sharer's public commitment to one share; shares are uniform in GF(p), so the
    digest hides them, and a recipient who returns another value is caught."""
    return digest(b"fedfuse/secagg/share", session, kind, src.encode(),
                  index.to_bytes(4, "big"), share)
