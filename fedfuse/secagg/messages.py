"""Names shared by the client and coordinator halves of the protocol."""

from __future__ import annotations

from fedfuse.secagg.crypto import NONCE_BYTES, TAG_BYTES, digest
from fedfuse.secagg.shamir import SHARE_BYTES

RECORD = "secagg"
"""The ConfigRecord of a masking request (in a train or query.fusion message); also the
prefix of a site's per-session state records (``secagg/<session hex>``)."""
MASKED = "masked"
"""The ArrayRecord of a client's masked vector (key ``vector``) in its train reply."""

SETUP_RECORD = "secagg-setup"
KEYS = "secagg-keys"
SHARE_RECORD = "secagg-share"
SHARES = "secagg-shares"
CHECK_RECORD = "secagg-check"
SIGNED = "secagg-signed"
UNMASK_RECORD = "secagg-unmask"
REVEAL = "secagg-reveal"
REFUSED = "secagg-refused"
"""A reply's ConfigRecord {answer record name: why the site refused that stage}."""
STAGES = ((UNMASK_RECORD, REVEAL), (CHECK_RECORD, SIGNED), (SHARE_RECORD, SHARES),
          (SETUP_RECORD, KEYS))
"""(request, answer) record names of the stages that ride on any message, in the order a
site answers them: finish a session before it shares or sets up the next one."""
CARRIER = "query.secagg"
"""The message type that carries stage records alone, to a node that gets no other
message in that exchange."""
MAX_SESSIONS = 2
"""Sessions a site keeps at once: the one it masked for and the next one; setting up
another forgets the oldest."""

FINISHED = "secagg-finished"
"""A site's state record of the session ids it finished or abandoned (the newest
``FINISHED_KEPT``): a finished session is never set up again."""
FINISHED_KEPT = 64
MIN_SURVIVORS = 3
"""The fewest survivors whose sum a site helps to unmask: in a sum over two, each
member's update is the sum minus its own."""

SESSION_BYTES = 16
PUBLIC_KEY_BYTES = 32
COMMIT_BYTES = 32
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
"""A sealed pair (share of b, share of the masking key)."""

SHARE_KEY_LABEL = b"fedfuse/secagg/share-key/"
PAIR_MASK_LABEL = b"fedfuse/secagg/pair-mask/"
SELF_MASK_LABEL = b"fedfuse/secagg/self-mask/"


def associated_data(session: bytes, src: str, dst: str, threshold: int,
                    members: list[str]) -> bytes:
    """Binds a sealed share to its session, sender, recipient, the threshold t it was
    made for and the session's members U1 as the sharer saw them (no replay elsewhere,
    nor into a session run with another t, nor opened by a member shown another U1);
    the sealing key itself is bound to the two members' public keys (``crypto.agree``)."""
    return b"|".join([session, src.encode(), dst.encode(), str(threshold).encode(),
                      member_digest(members)])


def member_digest(members: list[str]) -> bytes:
    """H(U1), the members in the coordinator's order."""
    return digest(b"fedfuse/secagg/members", *(m.encode() for m in members))


def share_commitment(session: bytes, kind: bytes, src: str, index: int, share: bytes) -> bytes:
    """The sharer's public commitment to one share; shares are uniform in GF(p), so the
    digest hides them, and a recipient who returns another value is caught."""
    return digest(b"fedfuse/secagg/share", session, kind, src.encode(),
                  index.to_bytes(4, "big"), share)


def advertisement(session: bytes, node: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a member signs with its identity key at setup: its two public keys for this
    session, as node ``node``."""
    return digest(b"fedfuse/secagg/advertisement", session, node.encode(), c_pk, s_pk)
