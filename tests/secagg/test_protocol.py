"""Secure aggregation: the protocol run in process between real client handlers and a
real coordinator session (no Flower transport; tests/secagg/test_secagg_e2e.py adds it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedfuse.secagg import SecAggAbort, client, crypto, shamir
from fedfuse.secagg.messages import (
    KEYS,
    MASKED,
    MAX_SESSIONS,
    REFUSED,
    REVEAL,
    SHARE_RECORD,
    SHARES,
    UNMASK_RECORD,
    advertisement,
    associated_data,
)
from fedfuse.secagg.server import threshold_for
from tests.helpers import SecAggHarness as Harness
from tests.helpers import reply_from

pytestmark = pytest.mark.usefixtures("task_identity")


# -- the protocol, in process -----------------------------------------------------------

def test_secure_sum_equals_the_plaintext_sum():
    h = Harness(5)
    assert np.array_equal(h.run(), h.plain_sum(h.nodes))
    assert h.session.dropped == {}


def test_threshold_is_a_majority_of_the_sampled_clients():
    assert [threshold_for(0.6, n) for n in (2, 3, 5, 10, 100)] == [2, 2, 3, 6, 60]
    assert threshold_for(1.0, 7) == 7


@pytest.mark.parametrize("dropped", [1, 2])
def test_clients_dropping_after_sharing_leave_the_survivors_sum(dropped):
    h = Harness(5)  # t = 3: up to 2 may drop
    gone = set(h.nodes[1:1 + dropped])
    total = h.run(drop_after_shares=gone)
    assert np.array_equal(total, h.plain_sum([n for n in h.nodes if n not in gone]))
    assert set(h.session.dropped) == {str(n) for n in gone}


def test_too_many_dropouts_abort_the_session():
    h = Harness(5)
    h.keys()
    h.shares()
    with pytest.raises(SecAggAbort, match="threshold is 3"):
        h.masked(skip=set(h.nodes[:3]))


def test_a_masked_vector_looks_unrelated_to_its_input():
    h = Harness(4, length=4096)
    ramp = np.arange(4096, dtype=np.uint64) * np.uint64(1000)
    h.inputs[h.nodes[0]] = ramp
    h.run()
    seen = h.received[h.nodes[0]]
    top = (seen >> np.uint64(32)).astype(np.float64)
    assert abs(np.corrcoef(top, ramp.astype(np.float64))[0, 1]) < 0.06
    assert 0.45 < np.mean(seen >> np.uint64(63)) < 0.55  # uniform over the ring
    # the same input in a new session is masked differently
    h2 = Harness(4, length=4096)
    h2.inputs[h2.nodes[0]] = ramp
    h2.run()
    assert np.mean(h2.received[h2.nodes[0]] == seen) < 0.001


def test_one_vector_cannot_be_unmasked_with_fewer_than_threshold_shares():
    h = Harness(5)  # t = 3
    h.keys()
    h.shares()
    h.masked()
    target = str(h.nodes[0])
    session = h.session.session

    def b_share(holder: int) -> tuple[int, bytes]:
        """What ``holder`` would reveal of node 0's self-mask seed b."""
        st = h.states[holder][client.state_key(session)]
        key = crypto.agree(st["c"], h.session.keys[target][0],
                           b"fedfuse/secagg/share-key/" + session)
        plain = crypto.unseal(key, h.session.sealed[target][str(holder)],
                              associated_data(session, target, str(holder),
                                              h.session.share_threshold, h.session.u1))
        return h.session.u1.index(str(holder)) + 1, plain[:shamir.SHARE_BYTES]

    with pytest.raises(ValueError):
        shamir.combine_shares(dict(b_share(n) for n in h.nodes[1:3]))  # t - 1 shares
    b = shamir.combine_shares(dict(b_share(n) for n in h.nodes[1:4]))  # t shares
    assert crypto.digest(b) == h.session.commitments[target]["b-hash"]


def test_malformed_keys_and_shares_drop_only_their_sender(caplog):
    h = Harness(8)  # t = 5
    nodes = h.nodes

    def bad_keys(replies):
        replies[0].content[KEYS]["c-pk"] = b"short"
        return replies
    replies = h.answer(h.requests("setup"))
    # a reply from a node that is not in the session is ignored
    replies.append(reply_from(999, RecordDict({KEYS: ConfigRecord({"c-pk": b"x" * 32,
                                                                    "s-pk": b"y" * 32})})))
    with caplog.at_level(logging.WARNING, logger="fedfuse.secagg"):
        h.session.receive_keys(bad_keys(replies))
    assert "not in the session" in caplog.text
    assert list(h.session.dropped) == [str(nodes[0])]

    def bad_shares(replies):
        rec = replies[0].content[SHARES]
        rec["ciphertexts"] = [c[:-1] for c in rec["ciphertexts"]]  # wrong length
        rec = replies[1].content[SHARES]
        rec["to"] = [*rec["to"][:-1], "424242"]  # an unknown node id
        return replies
    h.shares(edit=bad_shares)
    assert set(h.session.dropped) == {str(n) for n in nodes[:3]}
    assert "not addressed to exactly" in h.session.dropped[str(nodes[2])]
    h.masked()
    assert np.array_equal(h.unmask(), h.plain_sum(nodes[3:]))


SMALL_ORDER = [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]
"""X25519 points of order 4, 1 and 8: every agreement with them is the zero secret."""


def test_a_small_order_key_drops_only_its_sender():
    h = Harness(9)  # t = 6
    replies = h.answer(h.requests("setup"))
    for reply, point in zip(replies, SMALL_ORDER[:2]):
        reply.content[KEYS]["s-pk"] = point
    replies[2].content[KEYS]["c-pk"] = SMALL_ORDER[2]
    h.session.receive_keys(replies)
    assert sorted(h.session.dropped) == [str(n) for n in h.nodes[:3]]
    assert all("small order" in why for why in h.session.dropped.values())
    h.shares()  # the others share among themselves, unhindered
    h.masked()
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[3:]))  # 6 remain


@pytest.mark.parametrize("neighbours", [0, 4])
def test_members_failing_setup_do_not_lower_the_share_threshold(neighbours):
    # 10 sampled, t = 6; 4 fail setup. The other 6 must still share with t = 6 (or, with
    # neighbourhoods of 4, t_u of 5 planned members): were t taken of the 6 left (t = 4),
    # 5 colluders (fewer than 6) could open the shares sealed to them and rebuild a
    # member's b and s, and so read its update (helper review of issue 22)
    h = Harness(10, neighbours=neighbours)
    h.keys(skip=set(h.nodes[:4]))
    planned = 10 if neighbours == 0 else neighbours + 1
    records = h.session.share_records()
    assert {rec["threshold"] for rec in records.values()} == {threshold_for(0.6, planned)}
    h.shares()
    target = h.nodes[4]  # the others in its neighbourhood, all but one: t - 1 colluders
    colluders = [int(v) for v in h.session.graph[str(target)] if v != str(target)]
    colluders = colluders[:h.session.share_threshold - 1]
    session = h.session.session

    def shares_held(kind: int) -> dict[int, bytes]:
        out = {}
        for holder in colluders:
            if str(holder) not in h.session.sealed[str(target)]:
                continue
            st = h.states[holder][client.state_key(session)]
            key = crypto.agree(st["c"], h.session.keys[str(target)][0],
                               b"fedfuse/secagg/share-key/" + session)
            plain = crypto.unseal(key, h.session.sealed[str(target)][str(holder)],
                                  associated_data(session, str(target), str(holder),
                                                  h.session.share_threshold, h.session.u1))
            half = shamir.SHARE_BYTES
            out[h.session.share_index(str(target), str(holder))] = \
                plain[kind * half:(kind + 1) * half]
        return out
    with pytest.raises(ValueError):  # too few shares: no secret comes out
        shamir.combine_shares(shares_held(1))
    h.masked()
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[4:]))


def test_wrongly_typed_fields_drop_the_sender_instead_of_crashing():
    h = Harness(5)  # t = 3
    h.keys()

    def mistyped(replies):
        replies[0].content[SHARES]["to"] = [1, 2, 3, 4]  # ints, not node ids
        replies[1].content[SHARES]["commit-b"] = b"not a list"
        return replies
    h.shares(edit=mistyped)
    assert "not lists of the right types" in h.session.dropped[str(h.nodes[0])]
    assert "not lists of the right types" in h.session.dropped[str(h.nodes[1])]

    def mistyped_unmask(replies):
        replies[0].content[REVEAL]["b-from"] = 7
        return replies
    h = Harness(6)  # t = 4: five valid responders remain
    assert np.array_equal(h.run(edit_unmask=mistyped_unmask), h.plain_sum(h.nodes))


def test_forged_share_at_unmask_is_caught_and_ignored(caplog):
    h = Harness(6)  # t = 4, five honest responders remain

    def forge(replies):
        rec = replies[0].content[REVEAL]
        rec["b-shares"] = [bytes(shamir.SHARE_BYTES)] + list(rec["b-shares"][1:])
        return replies
    with caplog.at_level(logging.WARNING, logger="fedfuse.secagg"):
        total = h.run(edit_unmask=forge)
    assert "does not match the sharer's commitment" in caplog.text
    assert np.array_equal(total, h.plain_sum(h.nodes))


def test_share_replayed_from_another_session_is_unreadable():
    h1, h2 = Harness(4), Harness(4)
    for h in (h1, h2):
        h.keys()
        h.shares()
        h.masked()
    node, rec = next(iter(h2.session.unmask_records().items()))
    foreign = h1.session.sealed[rec["from"][0]][node]
    rec["ciphertexts"] = [foreign, *rec["ciphertexts"][1:]]
    node = int(node)
    answer = client.unmask(h2.states[node], rec, str(node))
    assert answer["unreadable"] == [rec["from"][0]]


def test_a_share_sealed_for_another_threshold_or_key_pair_does_not_open():
    a, b = crypto.new_private_key(), crypto.new_private_key()
    A, B = crypto.public_key(a), crypto.public_key(b)
    k = crypto.agree(a, B, b"l")
    assert k == crypto.agree(b, A, b"l")  # symmetric
    u1 = ["1", "2", "3"]
    blob = crypto.seal(k, b"share", associated_data(b"s" * 16, "1", "2", 3, u1))
    assert crypto.unseal(k, blob, associated_data(b"s" * 16, "1", "2", 3, u1)) == b"share"
    with pytest.raises(crypto.CryptoError):  # the recipient runs the session with t = 2
        crypto.unseal(k, blob, associated_data(b"s" * 16, "1", "2", 2, u1))
    with pytest.raises(crypto.CryptoError):  # ... or was shown another U1
        crypto.unseal(k, blob, associated_data(b"s" * 16, "1", "2", 3, ["1", "2", "4"]))
    # k = HKDF(X25519(a, B), info = l ‖ min(A, B) ‖ max(A, B)): bound to the two
    # advertised keys, not only to the shared point (equivalent encodings of a point
    # reach the same X25519 output)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = X25519PrivateKey.from_private_bytes(a).exchange(X25519PublicKey.from_public_bytes(B))
    assert k == HKDF(hashes.SHA256(), 32, salt=None,
                     info=b"l" + min(A, B) + max(A, B)).derive(shared)


def test_client_refuses_a_substituted_key_and_contradictory_requests():
    h = Harness(3)
    h.keys()
    me = h.session.u1[0]
    rec = h.session.share_records()[me]
    forged = ConfigRecord(dict(rec))
    forged["c-pk"] = [crypto.public_key(crypto.new_private_key()), *rec["c-pk"][1:]]
    with pytest.raises(client.SecAggError, match="other public keys"):
        client.share(h.states[int(me)], forged, me)
    h.shares()
    h.masked()
    node, rec = next(iter(h.session.unmask_records().items()))
    node = int(node)
    both = ConfigRecord(dict(rec))
    both["dropped"] = [rec["survivors"][1]]
    with pytest.raises(client.SecAggError, match="survivor and dropped"):
        client.unmask(h.states[node], both, str(node))
    client.unmask(h.states[node], rec, str(node))
    with pytest.raises(client.SecAggError, match="did not set up"):  # keys already forgotten
        client.unmask(h.states[node], rec, str(node))


def test_wrong_length_masked_vector_counts_as_a_dropout():
    h = Harness(4)  # t = 3
    h.keys()
    h.shares()
    replies = []
    for i, node in enumerate(h.nodes):
        vec = client.mask(h.states[node], h.session.mask_request(str(node)), str(node),
                          h.inputs[node])
        if i == 0:
            vec = vec[:-1]
        replies.append(reply_from(node, RecordDict({MASKED: ArrayRecord({"vector": Array(vec)})})))
    h.session.receive_masked(replies)
    assert "expected uint64[64]" in h.session.dropped[str(h.nodes[0])]
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[1:]))


def test_a_masked_vector_that_does_not_decode_drops_only_its_sender():
    h = Harness(6)  # t = 4
    h.keys()
    h.shares()
    replies = []
    forged = {h.nodes[0]: Array(dtype="uint64", shape=(64,), stype="numpy.ndarray",
                                data=b"garbage"),  # np.load: "pickled data"
              h.nodes[1]: Array(dtype="uint64", shape=(64,), stype="torch.raw",
                                data=bytes(512))}
    for node in h.nodes:
        vec = client.mask(h.states[node], h.session.mask_request(str(node)), str(node),
                          h.inputs[node])
        replies.append(reply_from(node, RecordDict({MASKED: ArrayRecord(
            {"vector": forged.get(node, Array(vec))})})))
    h.session.receive_masked(replies)
    assert "does not decode" in h.session.dropped[str(h.nodes[0])]
    assert "does not decode" in h.session.dropped[str(h.nodes[1])]
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[2:]))


def test_client_refuses_a_minority_threshold():
    h = Harness(4)
    h.keys()
    rec = ConfigRecord(dict(h.session.share_records()[h.session.u1[0]]))
    rec["threshold"] = 2  # half of 4: two disjoint pairs could each rebuild secrets
    node = int(h.session.u1[0])
    with pytest.raises(client.SecAggError, match="not a majority"):
        client.share(h.states[node], rec, str(node))


# -- two sessions live at once (issue 22: the next session rides on this one) -----------

def test_two_sessions_live_at_one_site_each_sum_correctly_and_keep_their_own_keys():
    now = Harness(5)
    now.keys()
    now.shares()
    now.masked()
    following = Harness(5, states=now.states)  # the same sites open the next session
    following.keys()
    following.shares()
    node = now.nodes[0]
    keys = {k: now.states[node][k] for k in now.states[node].config_records}
    assert len(keys) == 2  # one state record per session
    a, b = (client.state_key(h.session.session) for h in (now, following))
    assert keys[a]["c"] != keys[b]["c"] and keys[a]["s"] != keys[b]["s"]  # fresh keys
    assert np.array_equal(now.unmask(), now.plain_sum(now.nodes))
    following.masked()
    assert np.array_equal(following.unmask(), following.plain_sum(following.nodes))


def live_pair(n: int = 4) -> tuple[Harness, Harness]:
    """A session its members masked for, and the next one set up at the same sites."""
    now = Harness(n)
    now.keys()
    now.shares()
    now.masked()
    following = Harness(n, states=now.states)
    following.keys()
    return now, following


def test_revealing_b_and_s_of_one_member_is_refused_in_each_live_session():
    now, following = live_pair()
    following.shares()
    node, rec = next(iter(now.session.unmask_records().items()))
    both = ConfigRecord(dict(rec))
    both["dropped"] = [rec["survivors"][1]]
    with pytest.raises(client.SecAggError, match="survivor and dropped"):
        client.unmask(now.states[int(node)], both, node)
    # riding on a carrier, the refusal is stated and the other session's stage answered
    mixed = RecordDict({UNMASK_RECORD: both, SHARE_RECORD: following.session.share_records()[node]})
    answer = client.answer(now.states[int(node)], mixed, node)
    assert REVEAL not in answer.config_records
    assert "survivor and dropped" in answer[REFUSED][REVEAL]
    assert "second share request" in answer[REFUSED][SHARES]  # one sharing per session


def test_a_bad_peer_key_in_one_stage_leaves_the_other_stage_answered():
    now, following = live_pair()
    node, unmask = next(iter(now.session.unmask_records().items()))
    share = ConfigRecord(dict(following.session.share_records()[node]))
    mine = list(share["nodes"]).index(node)
    other = (mine + 1) % len(share["nodes"])
    share["c-pk"] = [bytes(32) if i == other else k for i, k in enumerate(share["c-pk"])]
    answer = client.answer(now.states[int(node)],
                           RecordDict({UNMASK_RECORD: unmask, SHARE_RECORD: share}), node)
    assert REVEAL in answer.config_records  # this session's reveals still go out
    assert "unusable public key" in answer[REFUSED][SHARES]


def test_a_request_mixing_two_sessions_is_refused():
    now = Harness(4)
    now.keys()
    following = Harness(4, states=now.states)
    following.keys()
    # session B's share request relaying the keys this site made for session A
    me = now.session.u1[0]
    rec = ConfigRecord(dict(following.session.share_records()[me]))
    for field in ("c-pk", "s-pk"):
        rec[field] = [now.session.keys[n][0 if field == "c-pk" else 1]
                      for n in now.session.u1]
    with pytest.raises(client.SecAggError, match="other public keys"):
        client.share(now.states[int(me)], rec, me)
    # session B's unmask carrying sealed shares made for session A: unreadable
    now.shares()
    following.shares()
    now.masked()
    following.masked()
    node, rec = next(iter(following.session.unmask_records().items()))
    rec["ciphertexts"] = [now.session.sealed[s][node] for s in rec["from"]]
    assert client.unmask(following.states[int(node)], rec, node)["unreadable"] == rec["from"]


def test_a_site_keeps_at_most_two_sessions_and_forgets_the_oldest():
    sessions = [Harness(3)]
    sessions[0].keys()
    for _ in range(3):
        sessions.append(Harness(3, states=sessions[0].states))
        sessions[-1].keys()
    node = sessions[0].nodes[0]
    live = [k for k in sessions[0].states[node].config_records if k.startswith("secagg/")]
    assert live == [client.state_key(h.session.session) for h in sessions[-MAX_SESSIONS:]]
    # the forgotten ones are remembered as finished: never set up again
    finished = sessions[0].states[node].config_records["secagg-finished"]["ids"]
    assert finished == [h.session.session for h in sessions[:-MAX_SESSIONS]]
    with pytest.raises(client.SecAggError, match="already finished"):
        client.setup(sessions[0].states[node], sessions[0].session.setup_record())
    with pytest.raises(client.SecAggError, match="16 bytes"):
        client.setup(sessions[0].states[node], ConfigRecord({"session": b"short"}))
    with pytest.raises(client.SecAggError, match="did not set up"):
        client.share(sessions[0].states[node], sessions[0].session.share_records()[str(node)],
                     str(node))
    with pytest.raises(client.SecAggError, match="already set up"):
        client.setup(sessions[-1].states[node], sessions[-1].session.setup_record())
    sessions[-1].shares()
    sessions[-1].masked()
    assert np.array_equal(sessions[-1].unmask(), sessions[-1].plain_sum(sessions[-1].nodes))


def test_a_member_left_out_before_masking_is_neither_unmasked_nor_counted():
    h = Harness(5)  # t = 3
    h.keys()
    h.shares()
    out = str(h.nodes[4])
    h.session.narrow(n for n in h.session.u2 if n != out)  # e.g. retired since it shared
    h.masked()
    rec = next(iter(h.session.unmask_records().values()))
    assert out not in rec["survivors"] and out not in rec["dropped"]
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[:4]))
    h = Harness(3)  # t = 2
    h.keys()
    h.shares()
    with pytest.raises(SecAggAbort, match="asked for masked input"):
        h.session.narrow([h.session.u2[0]])


def test_a_prepared_session_that_lost_a_member_at_setup_does_not_cover_it():
    from fedfuse.coordinator.sessions import covers

    h = Harness(5)
    h.keys(skip={h.nodes[4]})  # the fifth failed setup: the session is at its share stage
    assert covers(h.session, h.nodes[:4])
    # a round that samples it needs a fresh session, else it would silently miss the round
    assert not covers(h.session, h.nodes)


# -- signed key advertisements (issue 23: a coordinator that substitutes keys) ----------

def test_a_coordinator_substituting_a_members_keys_is_caught_before_anything_is_shared():
    h = Harness(5, verify=True)  # every site signs its keys and checks the others'
    h.keys()
    target = h.session.u1[0]
    forged = crypto.public_key(crypto.new_private_key())  # the coordinator's own key
    requests = h.requests("share")
    for node, content in requests.items():
        rec = content.config_records["secagg-share"]
        if str(node) != target:  # shown to everyone else as the target's key
            rec["c-pk"] = [forged if n == target else k for n, k in zip(rec["nodes"],
                                                                      rec["c-pk"])]
    replies = h.answer(requests)
    honest = [r for r in replies if str(r.metadata.src_node_id) != target]
    for reply in honest:  # no share sealed to the forged key, nor to anyone
        assert SHARES not in reply.content.config_records
        assert "not signed by its identity" in reply.content[REFUSED][SHARES]
    with pytest.raises(SecAggAbort, match="shared their keys"):
        h.session.receive_shares(replies)  # the session ends, nothing was revealed


def test_pinned_identities_stop_a_coordinator_that_also_forges_the_identity():
    def forge(h: Harness) -> list:
        """The coordinator replaces the target's keys and identity by its own, signed."""
        h.keys()
        target, session = h.session.u1[0], h.session.session
        fake_id = crypto.identity_key(b"coordinator" + bytes(21))
        c, s = (crypto.public_key(crypto.new_private_key()) for _ in range(2))
        requests = h.requests("share")
        for node, content in requests.items():
            rec = content.config_records["secagg-share"]
            i = list(rec["nodes"]).index(target)
            if str(node) != target:
                for field, value in (("c-pk", c), ("s-pk", s),
                                     ("identity", crypto.identity_public(fake_id)),
                                     ("signature", crypto.sign(fake_id, advertisement(
                                         session, target, c, s)))):
                    rec[field] = [value if j == i else v for j, v in enumerate(rec[field])]
        return [r for r in h.answer(requests) if str(r.metadata.src_node_id) != target]

    unpinned = forge(Harness(5, verify=True))
    assert all(SHARES in r.content.config_records for r in unpinned)  # a Sybil passes
    sites = Harness(5).identities
    pins = frozenset(crypto.identity_public(i.key) for i in sites.values())
    pinned = forge(Harness(5, verify=True, pinned=pins))
    assert all("is not one this site pins" in r.content[REFUSED][SHARES] for r in pinned)


def test_a_sharer_committed_to_another_secret_is_named_as_the_culprit():
    """Its shares match its own commitments, so the failed rebuild is its doing: the
    session aborts naming it (the coordinator then stops sampling it,
    tests/secagg/test_secagg_e2e.py)."""
    h = Harness(5)
    cheat = str(h.nodes[2])

    def other_secret(replies):
        for reply in replies:
            if str(reply.metadata.src_node_id) == cheat:
                reply.content[SHARES]["b-hash"] = crypto.digest(b"another seed")
        return replies

    with pytest.raises(SecAggAbort, match="do not rebuild the mask seed") as err:
        h.run(edit_shares=other_secret)
    assert err.value.culprit == cheat
    with pytest.raises(SecAggAbort) as err:  # too few clients: nobody is to blame
        Harness(5).run(drop_after_shares=Harness(5).nodes[:3])
    assert err.value.culprit is None
