"""The consistency check: every site that reveals shares agrees on who survived.

Bonawitz et al. 2017's active-security variant (its round "ConsistencyCheck"). Without
it, a coordinator that lies about who dropped can tell some holders of member v's shares
that v survived (they reveal shares of v's self-mask seed b_v) and the others that v
dropped (they reveal shares of v's masking key s_v), and with both secrets unmask v's
update. Between masked input and unmasking:

1. check: the coordinator sends U3 (the members that sent a masked vector) to each
   member of U3, which signs σ_u = Sign(identity_u, H(session, U3)), once per session.
2. unmask: the coordinator relays the signatures it got (from U4 ⊆ U3). A member reveals
   only if the U3 it signed is the one the request is built on and more than 2/3 of U1
   validly signed that same U3 with distinct identities (each neighbour with the
   identity it signed its keys with; only pinned identities where the site's policy
   pins them).

Honest members sign once per session, so two different U3 sets can both be certified
only if more than a third of U1 signed both: with fewer than |U1| / 3 corrupt members
(the coordinator's Sybils among them, which only pinning rules out) every honest member
reveals for the same U3, and so for each member either b or s, never both. The
threshold t must then exceed 2n/3 too (``SecureAggregationConfig``), so that a
certified U3 also holds enough shares to unmask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message

from fedfuse.secagg import crypto
from fedfuse.secagg.checks import SecAggAbort
from fedfuse.secagg.messages import SIGNED

if TYPE_CHECKING:
    from fedfuse.secagg.server import SecAggSession

log = logging.getLogger("fedfuse.secagg")


def needed(members: int) -> int:
    """Signatures that certify a U3: floor(2 |U1| / 3) + 1, more than two thirds of U1."""
    return 2 * members // 3 + 1


def statement(session: bytes, survivors: Iterable[str]) -> bytes:
    """H(session, U3), what a member signs (U3 sorted: its order carries nothing)."""
    return crypto.digest(b"fedfuse/secagg/survivors", session,
                         *(n.encode() for n in sorted(survivors)))


def certificate_problem(session: bytes, survivors: list[str], members: int,
                        certificate: tuple[list[str], list[bytes], list[bytes]],
                        known: dict[str, bytes], pinned: frozenset[bytes]) -> str | None:
    """Why (signers, identities, signatures) does not certify ``survivors`` as U3 of a
    session of ``members`` members, or None if it does: the signers are distinct members
    of U3 with distinct identities, and more than two thirds of U1 of them have a valid
    signature with the identity ``known`` for them (a neighbour's: the one its keys were
    signed with) and, if any are pinned, a pinned one. Signatures are checked only until
    enough are valid."""
    signers, identities, signatures = certificate
    if not len(signers) == len(identities) == len(signatures):
        return "the signers, identities and signatures do not match up"
    if len(set(signers)) != len(signers) or len(set(identities)) != len(identities):
        return "a signer or an identity appears twice"
    if not set(signers) <= set(survivors):
        return "a signer is not among the survivors"
    message, need = statement(session, survivors), needed(members)
    valid, problem = 0, ""
    for node, pid, sig in zip(signers, identities, signatures, strict=True):
        if valid >= need:
            break
        if node in known and known[node] != pid:
            problem = problem or f"member {node} signs with another identity than its keys'"
        elif pinned and pid not in pinned:
            problem = problem or f"member {node}'s identity is not one this site pins"
        elif not crypto.verifies(pid, sig, message):
            problem = problem or f"member {node}'s signature of the survivors does not verify"
        else:
            valid += 1
    if valid < need:
        return (f"{valid} members signed the survivors validly, fewer than {need} (more "
                f"than 2/3 of the {members} members)" + (f"; {problem}" if problem else ""))
    return None


# -- the coordinator's half -------------------------------------------------------------

def check_records(session: SecAggSession) -> dict[str, ConfigRecord]:
    """The check request to each member of U3: U3."""
    u3 = session.u3
    return {node: ConfigRecord({"session": session.session, "survivors": u3})
            for node in u3}


def receive_signatures(session: SecAggSession, replies: Iterable[Message]) -> None:
    """Keep each valid signature of U3 (a member that does not sign stays in the sum, but
    is not asked to unmask); abort unless enough members signed."""
    message = statement(session.session, session.u3)
    for node, rec in session.answers(replies, session.u3, "check", SIGNED, drop=False):
        sig, pid = rec.get("signature"), session.identities[node][0]
        if isinstance(sig, bytes) and pid and crypto.verifies(pid, sig, message):
            session.signatures[node] = sig
        else:
            log.warning("%s: node %s's signature of the survivors does not verify; it is "
                        "not asked to unmask", session.group, node)
    if len(session.signatures) < needed(len(session.u1)):
        raise SecAggAbort(f"{session.group}: {len(session.signatures)} members signed the "
                          f"survivors, {needed(len(session.u1))} are needed")


def certificate(session: SecAggSession) -> dict[str, Any]:
    """The unmask request's fields that carry the signatures of U3."""
    signers = [n for n in session.u3 if n in session.signatures]
    return {"signers": signers,
            "signer-identities": [session.identities[n][0] for n in signers],
            "signatures": [session.signatures[n] for n in signers]}
