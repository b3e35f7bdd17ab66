"""Secure aggregation: the protocol run in process between real client handlers and a
real coordinator session (no Flower transport; tests/secagg/test_secagg_e2e.py adds it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedfuse.secagg import SecAggAbort, client, crypto, shamir
from fedfuse.secagg.messages import MASKED, RECORD
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
        st = h.states[holder][RECORD]
        key = crypto.agree(st["c"], h.session.keys[target][0],
                           b"fedfuse/secagg/share-key/" + session)
        plain = crypto.unseal(key, h.session.sealed[target][str(holder)],
                              b"|".join([session, target.encode(), str(holder).encode()]))
        return h.session.u1.index(str(holder)) + 1, plain[:shamir.SHARE_BYTES]

    with pytest.raises(ValueError):
        shamir.combine_shares(dict(b_share(n) for n in h.nodes[1:3]))  # t - 1 shares
    b = shamir.combine_shares(dict(b_share(n) for n in h.nodes[1:4]))  # t shares
    assert crypto.digest(b) == h.session.commitments[target]["b-hash"]


def test_malformed_keys_and_shares_drop_only_their_sender(caplog):
    h = Harness(8)  # t = 5
    nodes = h.nodes

    def bad_keys(replies):
        replies[0].content[RECORD]["c-pk"] = b"short"
        return replies
    msgs = h.session.setup_messages()
    replies = h.answer(msgs, lambda st, r, me: client.setup(st, r))
    # a reply from a node that is not in the session is ignored
    replies.append(reply_from(999, RecordDict({RECORD: ConfigRecord({"c-pk": b"x" * 32,
                                                                    "s-pk": b"y" * 32})})))
    with caplog.at_level(logging.WARNING, logger="fedfuse.secagg"):
        h.session.receive_keys(bad_keys(replies))
    assert "not in the session" in caplog.text
    assert list(h.session.dropped) == [str(nodes[0])]

    def bad_shares(replies):
        rec = replies[0].content[RECORD]
        rec["ciphertexts"] = [c[:-1] for c in rec["ciphertexts"]]  # wrong length
        rec = replies[1].content[RECORD]
        rec["to"] = [*rec["to"][:-1], "424242"]  # an unknown node id
        return replies
    h.shares(edit=bad_shares)
    assert set(h.session.dropped) == {str(n) for n in nodes[:3]}
    assert "not addressed to exactly" in h.session.dropped[str(nodes[2])]
    h.masked()
    assert np.array_equal(h.unmask(), h.plain_sum(nodes[3:]))


def test_wrongly_typed_fields_drop_the_sender_instead_of_crashing():
    h = Harness(5)  # t = 3
    h.keys()

    def mistyped(replies):
        replies[0].content[RECORD]["to"] = [1, 2, 3, 4]  # ints, not node ids
        replies[1].content[RECORD]["commit-b"] = b"not a list"
        return replies
    h.shares(edit=mistyped)
    assert "not lists of the right types" in h.session.dropped[str(h.nodes[0])]
    assert "not lists of the right types" in h.session.dropped[str(h.nodes[1])]

    def mistyped_unmask(replies):
        replies[0].content[RECORD]["b-from"] = 7
        return replies
    h = Harness(6)  # t = 4: five valid responders remain
    assert np.array_equal(h.run(edit_unmask=mistyped_unmask), h.plain_sum(h.nodes))


def test_forged_share_at_unmask_is_caught_and_ignored(caplog):
    h = Harness(6)  # t = 4, five honest responders remain

    def forge(replies):
        rec = replies[0].content[RECORD]
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
    msgs = h2.session.unmask_messages()
    target = msgs[0]
    rec = target.content[RECORD]
    foreign = h1.session.sealed[rec["from"][0]][str(target.metadata.dst_node_id)]
    rec["ciphertexts"] = [foreign, *rec["ciphertexts"][1:]]
    node = target.metadata.dst_node_id
    answer = client.unmask(h2.states[node], rec, str(node))
    assert answer["unreadable"] == [rec["from"][0]]


def test_client_refuses_a_substituted_key_and_contradictory_requests():
    h = Harness(3)
    h.keys()
    msgs = h.session.share_messages()
    rec = msgs[0].content[RECORD]
    me = str(msgs[0].metadata.dst_node_id)
    forged = ConfigRecord(dict(rec))
    forged["c-pk"] = [crypto.public_key(crypto.new_private_key()), *rec["c-pk"][1:]]
    with pytest.raises(client.SecAggError, match="other public keys"):
        client.share(h.states[int(me)], forged, me)
    h.shares()
    h.masked()
    msg = h.session.unmask_messages()[0]
    rec = msg.content[RECORD]
    node = msg.metadata.dst_node_id
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
    request = h.session.mask_request()
    replies = []
    for i, node in enumerate(h.nodes):
        vec = client.mask(h.states[node], request, str(node), h.inputs[node])
        if i == 0:
            vec = vec[:-1]
        replies.append(reply_from(node, RecordDict({MASKED: ArrayRecord({"vector": Array(vec)})})))
    h.session.receive_masked(replies)
    assert "expected uint64[64]" in h.session.dropped[str(h.nodes[0])]
    assert np.array_equal(h.unmask(), h.plain_sum(h.nodes[1:]))


def test_client_refuses_a_minority_threshold():
    h = Harness(4)
    h.keys()
    msg = h.session.share_messages()[0]
    rec = ConfigRecord(dict(msg.content[RECORD]))
    rec["threshold"] = 2  # half of 4: two disjoint pairs could each rebuild secrets
    node = msg.metadata.dst_node_id
    with pytest.raises(client.SecAggError, match="not a majority"):
        client.share(h.states[node], rec, str(node))
