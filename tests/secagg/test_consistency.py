"""The consistency check (``fedfuse.secagg.consistency``) against a coordinator that lies
about who dropped: the attack run in process between real client handlers, first on the
semi-honest protocol (where it reads a member's input) and then with the check (where no
honest member reveals for the lie)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedfuse.secagg import SecAggAbort, client, consistency, crypto, shamir
from fedfuse.secagg.messages import (
    CHECK_RECORD,
    PAIR_MASK_LABEL,
    REFUSED,
    REVEAL,
    SELF_MASK_LABEL,
    SHARE_KEY_LABEL,
    SIGNED,
    UNMASK_RECORD,
    associated_data,
)
from tests.helpers import SecAggHarness as Harness

pytestmark = pytest.mark.usefixtures("task_identity")


def test_with_the_check_the_survivors_sum_is_unmasked_and_every_reveal_is_certified():
    h = Harness(9, 0.7, consistency=True)  # t = 7; 7 > 2/3 * 9 signatures certify U3
    h.keys()
    h.shares()
    h.masked(skip=h.nodes[:2])
    h.check()
    assert sorted(h.session.signatures) == h.session.u3 and len(h.session.u3) == 7
    requests = h.requests("unmask")
    assert all(len(r.config_records[UNMASK_RECORD]["signatures"]) == 7
               for r in requests.values())
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[2:]))


def test_too_few_signatures_of_the_survivors_abort_before_anything_is_revealed():
    h = Harness(9, 0.7, consistency=True)
    h.keys()
    h.shares()
    h.masked(skip=h.nodes[:2])  # 7 survivors, 7 signatures needed
    with pytest.raises(SecAggAbort, match="6 members signed the survivors, 7 are needed"):
        h.check(skip=h.nodes[2:3])


# -- the attack: a split view of who dropped ---------------------------------------------

def held_share(h: Harness, holder: int, victim: int, kind: int) -> tuple[int, bytes]:
    """What a colluding member ``holder`` holds of ``victim``'s b (kind 0) or s (kind 1):
    its own sealed share, opened with its own keys."""
    session = h.session.session
    st = h.states[holder][client.state_key(session)]
    key = crypto.agree(st["c"], h.session.keys[str(victim)][0], SHARE_KEY_LABEL + session)
    plain = crypto.unseal(key, h.session.sealed[str(victim)][str(holder)],
                          associated_data(session, str(victim), str(holder),
                                          h.session.share_threshold, h.session.u1))
    half = shamir.SHARE_BYTES
    return h.session.share_index(str(victim), str(holder)), plain[kind * half:(kind + 1) * half]


def lie(h: Harness, holder: int, victim: int) -> ConfigRecord:
    """An unmask request telling ``holder`` that ``victim`` dropped (it sent its vector)."""
    rec = ConfigRecord(dict(honest_unmask(h)[str(holder)]))
    rec["survivors"] = [n for n in rec["survivors"] if n != str(victim)]
    rec["dropped"] = [*rec["dropped"], str(victim)]
    return rec


def honest_unmask(h: Harness) -> dict[str, ConfigRecord]:
    """The unmask requests as an honest coordinator would build them, without
    signatures."""
    checked, h.session.consistency = h.session.consistency, False
    try:
        return h.session.unmask_records()
    finally:
        h.session.consistency = checked


def revealed(h: Harness, holder: int, request: ConfigRecord) -> RecordDict:
    return client.answer(h.states[holder], RecordDict({UNMASK_RECORD: request}), str(holder),
                         h.identities[holder])


def unmask_one(h: Harness, victim: int, b: bytes, s: bytes) -> np.ndarray:
    """The victim's input from its masked vector, its b and its s."""
    session = h.session.session
    x = h.received[victim] - crypto.mask_words(crypto.derive(b, SELF_MASK_LABEL + session),
                                               len(h.received[victim]))
    order = h.session.graph[str(victim)]
    for other in order:
        if other == str(victim):
            continue
        key = crypto.agree(s, h.session.keys[other][1], PAIR_MASK_LABEL + session)
        words = crypto.mask_words(key, len(x))
        x = x - words if order.index(str(victim)) < order.index(other) else x + words
    return x


def test_a_split_view_of_who_dropped_reads_one_input_without_the_check():
    # semi-honest protocol, 10 members, t = 6; the coordinator and 3 colluding members
    h = Harness(10, 0.51)
    victim, colluders = h.nodes[0], h.nodes[1:4]
    told_alive, told_dropped = h.nodes[4:7], h.nodes[7:10]
    h.keys()
    h.shares()
    h.masked()  # everyone sent its masked vector, the victim too
    b_shares = dict(held_share(h, c, victim, 0) for c in colluders)
    s_shares = dict(held_share(h, c, victim, 1) for c in colluders)
    for holder in told_alive:  # "everyone survived": shares of the victim's b
        got = revealed(h, holder, honest_unmask(h)[str(holder)])[REVEAL]
        b_shares[h.session.share_index(str(victim), str(holder))] = \
            got["b-shares"][got["b-from"].index(str(victim))]
    for holder in told_dropped:  # "the victim dropped": shares of its masking key s
        got = revealed(h, holder, lie(h, holder, victim))[REVEAL]
        s_shares[h.session.share_index(str(victim), str(holder))] = \
            got["s-shares"][got["s-from"].index(str(victim))]
    b, s = shamir.combine_shares(b_shares), shamir.combine_shares(s_shares)
    assert crypto.digest(b) == h.session.commitments[str(victim)]["b-hash"]
    assert np.array_equal(unmask_one(h, victim, b, s), h.inputs[victim])  # read


def signatures(h: Harness, signers, u3: list[str]) -> dict[str, list]:
    """Certificate fields with ``signers``' signatures of ``u3`` (colluders sign whatever
    the coordinator asks)."""
    message = consistency.statement(h.session.session, u3)
    return {"signers": [str(n) for n in signers],
            "signer-identities": [crypto.identity_public(h.identities[n].key)
                                  for n in signers],
            "signatures": [crypto.sign(h.identities[n].key, message) for n in signers]}


def test_with_the_check_the_split_view_is_refused_and_the_input_stays_hidden():
    # the same attack with the check: t = 7 of 10, more than 2/3 (7 signatures) certify
    h = Harness(10, 0.7, consistency=True)
    victim, colluders = h.nodes[0], h.nodes[1:4]
    told_alive, told_dropped = h.nodes[4:7], h.nodes[7:10]
    h.keys()
    h.shares()
    h.masked()
    everyone = h.session.u3
    without = [n for n in everyone if n != str(victim)]
    for group, u3 in ((told_alive, everyone), (told_dropped, without)):
        for holder in group:  # each honest member signs the view it is shown, once
            got = client.answer(h.states[holder], RecordDict({CHECK_RECORD: ConfigRecord(
                {"session": h.session.session, "survivors": u3})}), str(holder),
                h.identities[holder])
            assert SIGNED in got.config_records
    # the told-dropped group has its own 3 signatures and the colluders' 3: 6 of 7
    for holder in told_dropped:
        request = lie(h, holder, victim)
        request.update(signatures(h, [*told_dropped, *colluders], without))
        got = revealed(h, holder, request)
        assert REVEAL not in got.config_records
        assert "fewer than 7" in got[REFUSED][REVEAL]
    # nor can the coordinator show them a certificate of the other view
    request = ConfigRecord(dict(honest_unmask(h)[str(told_dropped[0])]))
    request.update(signatures(h, [*told_alive, *colluders, victim], everyone))
    got = revealed(h, told_dropped[0], request)
    assert "not those this client signed" in got[REFUSED][REVEAL]
    # a member signs one view only: asked again with the other, it refuses
    again = client.answer(h.states[told_alive[0]], RecordDict({CHECK_RECORD: ConfigRecord(
        {"session": h.session.session, "survivors": without})}), str(told_alive[0]),
        h.identities[told_alive[0]])
    assert "second consistency check" in again[REFUSED][SIGNED]


def test_a_forged_duplicated_or_unpinned_signature_does_not_certify():
    h = Harness(7, 0.7, consistency=True)  # t = 5, 5 signatures needed
    h.keys()
    h.shares()
    h.masked()
    h.check()
    u3 = h.session.u3
    base = h.requests("unmask")
    node = h.nodes[0]

    def refusal(**fields) -> str:
        rec = ConfigRecord(dict(base[node].config_records[UNMASK_RECORD]))
        rec.update(fields)
        return client.answer(h.states[node], RecordDict({UNMASK_RECORD: rec}), str(node),
                             h.identities[node])[REFUSED][REVEAL]

    good = signatures(h, h.nodes[:5], u3)
    forged = [*good["signatures"][:4], bytes(64)]
    assert "does not verify" in refusal(**{**good, "signatures": forged})
    assert "appears twice" in refusal(
        signers=[*good["signers"][:4], good["signers"][0]],
        **{"signer-identities": [*good["signer-identities"][:4], good["signer-identities"][0]],
           "signatures": [*good["signatures"][:4], good["signatures"][0]]})
    sybil = crypto.identity_key(b"\x99" * 32)  # a coordinator-made identity for member 5
    swapped = {**good, "signer-identities": [*good["signer-identities"][:4],
                                             crypto.identity_public(sybil)],
               "signatures": [*good["signatures"][:4], crypto.sign(
                   sybil, consistency.statement(h.session.session, u3))]}
    assert "another identity than its keys'" in refusal(**swapped)
    assert "fewer than 5" in refusal(**signatures(h, h.nodes[:4], u3))
    # the honest request still unmasks (the refusals above left the state untouched)
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes))


def test_a_site_that_requires_the_check_refuses_to_unmask_or_share_without_it():
    h = Harness(5, 0.8, consistency=True)  # t = 4 of 5, above 2/3
    h.keys()
    h.shares()
    h.masked()
    node = h.nodes[0]
    skipped = honest_unmask(h)[str(node)]  # a coordinator that leaves the check out
    got = revealed(h, node, skipped)
    assert "without a consistency check" in got[REFUSED][REVEAL]
    low = Harness(6, 0.6, consistency=True)  # t = 4 of 6: not above 2/3
    low.keys()
    rec = low.session.share_records()[low.session.u1[0]]
    member = int(low.session.u1[0])
    with pytest.raises(client.SecAggError, match="not above 2/3"):
        client.share(low.states[member], rec, str(member), low.identities[member])


def test_a_sum_over_fewer_than_three_survivors_is_not_revealed():
    h = Harness(3, 0.6)  # t = 2 of 3
    h.keys()
    h.shares()
    h.masked(skip=h.nodes[:1])  # two survivors, enough for t: each would learn the other's
    node = h.nodes[1]
    got = revealed(h, node, honest_unmask(h)[str(node)])
    assert "only 2 survivors" in got[REFUSED][REVEAL]
