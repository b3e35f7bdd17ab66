"""Secure aggregation: the primitives, the quantised FedAvg encoding and the protocol run
in process between real client handlers and a real coordinator session (no Flower
transport; the simulation tests in test_secagg_e2e.py add it)."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedfuse.config import ConfigError, config_from_dict
from fedfuse.secagg import Quantizer, SecAggAbort, SecAggSession, decode_sum, encode_update
from fedfuse.secagg import client, crypto, shamir
from fedfuse.secagg.messages import MASKED, RECORD
from fedfuse.secagg.server import threshold_for
from tests.conftest import reply_from

LENGTH = 64


pytestmark = pytest.mark.usefixtures("task_identity")


# -- Shamir ---------------------------------------------------------------------------

def test_any_threshold_subset_rebuilds_the_secret():
    secret = bytes(range(32))
    shares = shamir.split_secret(secret, 3, 5)
    for subset in itertools.combinations(range(5), 3):
        assert shamir.combine_shares({i + 1: shares[i] for i in subset}) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_the_secret():
    secret = bytes(range(32))
    shares = shamir.split_secret(secret, 4, 6)
    for subset in itertools.combinations(range(6), 3):
        with pytest.raises(ValueError):  # a ~521-bit value, not a 32-byte secret
            shamir.combine_shares({i + 1: shares[i] for i in subset})


def test_lagrange_coefficients_interpolate_a_known_polynomial():
    # f(x) = 7 + 3x + 5x^2 -> f(0) = 7 from f(1), f(2), f(4)
    xs = (1, 2, 4)
    ys = [7 + 3 * x + 5 * x * x for x in xs]
    lam = shamir.lagrange_at_zero(xs)
    assert sum(l * y for l, y in zip(lam, ys)) % shamir.PRIME == 7


# -- primitives -----------------------------------------------------------------------

def test_key_agreement_is_symmetric_and_labelled():
    a, b = crypto.new_private_key(), crypto.new_private_key()
    k1 = crypto.agree(a, crypto.public_key(b), b"x")
    assert k1 == crypto.agree(b, crypto.public_key(a), b"x")
    assert k1 != crypto.agree(a, crypto.public_key(b), b"y")


def test_sealed_share_is_bound_to_its_associated_data():
    key = crypto.derive(b"k" * 32, b"test")
    blob = crypto.seal(key, b"share", b"session|1|2")
    assert crypto.unseal(key, blob, b"session|1|2") == b"share"
    with pytest.raises(crypto.CryptoError):
        crypto.unseal(key, blob, b"session|1|3")  # replayed to another recipient
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(crypto.CryptoError):
        crypto.unseal(key, tampered, b"session|1|2")


def test_mask_words_depend_on_the_key_only():
    w1 = crypto.mask_words(b"a" * 32, 1000)
    assert np.array_equal(w1, crypto.mask_words(b"a" * 32, 1000))
    assert w1.dtype == np.uint64
    assert not np.array_equal(w1, crypto.mask_words(b"b" * 32, 1000))
    # uniform 64-bit words: the top bit is set about half of the time
    assert 0.45 < np.mean(w1 >> np.uint64(63)) < 0.55


# -- quantised FedAvg encoding --------------------------------------------------------

def test_quantiser_error_is_below_one_step_and_unbiased():
    q = Quantizer(clip_range=1.0, bits=8)
    x = np.random.default_rng(0).uniform(-1, 1, 20_000)
    rng = np.random.default_rng(1)
    once = q.dequantize(q.quantize(x, rng).astype(np.float64))
    assert np.max(np.abs(once - x)) <= q.step
    mean = np.mean([q.dequantize(q.quantize(x[:10], rng).astype(np.float64))
                    for _ in range(4000)], axis=0)
    assert np.max(np.abs(mean - x[:10])) < q.step / 10


def test_decoded_sum_is_the_weighted_mean_of_updates():
    rng = np.random.default_rng(2)
    shapes = [(3, 4), (4,)]
    updates = [[rng.normal(0, 0.3, s) for s in shapes] for _ in range(5)]
    counts, losses, accs = [10, 25, 7, 40, 18], [1.0, 0.5, 2.0, 0.25, 0.75], [.1, .5, .2, .9, .6]
    q = Quantizer(clip_range=2.0, bits=24)
    total = sum(encode_update(u, n, l, a, q, rng)
                for u, n, l, a in zip(updates, counts, losses, accs))
    got = decode_sum(total, shapes, q)
    N = sum(counts)
    for k in range(len(shapes)):
        want = sum(n * u[k] for n, u in zip(counts, updates)) / N
        assert np.max(np.abs(got.mean_delta[k] - want)) <= q.step
    assert got.num_examples == N
    assert got.loss == pytest.approx(sum(n * l for n, l in zip(counts, losses)) / N, abs=1e-6)
    assert got.accuracy == pytest.approx(sum(n * a for n, a in zip(counts, accs)) / N, abs=1e-6)
    assert got.clipped == 0


def test_coordinates_beyond_the_clip_range_are_clipped_and_counted():
    q = Quantizer(clip_range=0.5, bits=16)
    vec = encode_update([np.array([0.1, 3.0, -7.0])], 4, 0.0, 0.0, q, np.random.default_rng(0))
    got = decode_sum(vec, [(3,)], q)
    assert got.clipped == 2
    assert got.mean_delta[0][1:] == pytest.approx([0.5, -0.5], abs=q.step)


def test_fixed_point_sums_keep_their_sign():
    from fedfuse.secagg.encoding import decode_fixed, encode_fixed
    parts = [np.array([1.5, -2.25, 0.0]), np.array([-3.0, 0.125, 1e-7])]
    total = encode_fixed(parts[0]) + encode_fixed(parts[1])  # wraps mod 2^64
    np.testing.assert_allclose(decode_fixed(total), parts[0] + parts[1], atol=2**-23)


def test_non_finite_update_is_refused_before_masking():
    q = Quantizer(clip_range=1.0, bits=16)
    with pytest.raises(ValueError, match="non-finite"):
        encode_update([np.array([0.0, np.nan])], 3, 0.0, 0.0, q, np.random.default_rng(0))


# -- the protocol, in process -----------------------------------------------------------

class Harness:
    """n clients (real handlers, their own state) and one coordinator session."""

    def __init__(self, n: int, fraction: float = 0.6, length: int = LENGTH) -> None:
        self.nodes = list(range(101, 101 + n))
        self.states = {node: RecordDict() for node in self.nodes}
        self.session = SecAggSession("test", self.nodes, fraction, length)
        self.inputs = {node: np.random.default_rng(node).integers(0, 2**20, length,
                                                                   dtype=np.uint64)
                       for node in self.nodes}
        self.received: dict[int, np.ndarray] = {}

    def answer(self, msgs: list[Message], handler, skip=()) -> list[Message]:
        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if node in skip:
                continue
            rec = handler(self.states[node], m.content[RECORD], str(node))
            out.append(reply_from(node, RecordDict({RECORD: rec})))
        return out

    def keys(self, skip=()) -> None:
        msgs = self.session.setup_messages()
        self.session.receive_keys(self.answer(msgs, lambda st, r, me: client.setup(st, r), skip))

    def shares(self, skip=(), edit=None) -> None:
        replies = self.answer(self.session.share_messages(), client.share, skip)
        self.session.receive_shares(edit(replies) if edit else replies)

    def masked(self, skip=()) -> None:
        request = self.session.mask_request()
        replies = []
        for node in map(int, self.session.u2):
            if node in skip:
                continue
            vec = client.mask(self.states[node], request, str(node), self.inputs[node])
            self.received[node] = vec
            replies.append(reply_from(node, RecordDict({MASKED: ArrayRecord(
                {"vector": Array(vec)})})))
        self.session.receive_masked(replies)

    def unmask(self, edit=None) -> np.ndarray:
        replies = self.answer(self.session.unmask_messages(), client.unmask)
        return self.session.receive_unmask(edit(replies) if edit else replies)

    def run(self, drop_before_keys=(), drop_after_shares=(), edit_shares=None,
            edit_unmask=None) -> np.ndarray:
        self.keys(drop_before_keys)
        self.shares(edit=edit_shares)
        self.masked(drop_after_shares)
        return self.unmask(edit_unmask)

    def plain_sum(self, nodes) -> np.ndarray:
        return sum((self.inputs[n] for n in nodes), np.zeros(LENGTH, dtype=np.uint64))


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


# -- config ---------------------------------------------------------------------------

def _raw(**secure) -> dict:
    return {"name": "x", "cohorts": [{"arch": "mlp", "clients": 3}],
            "secure_aggregation": secure}


@pytest.mark.parametrize("secure, key", [
    ({"threshold": 0.5}, "secure_aggregation.threshold"),
    ({"threshold": 1.2}, "secure_aggregation.threshold"),
    ({"clip_range": 0.0}, "secure_aggregation.clip_range"),
    ({"quantization_bits": 60}, "secure_aggregation.quantization_bits"),
])
def test_bad_secure_aggregation_settings_are_refused(secure, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(**secure))
    assert err.value.key == key


def test_a_cohort_of_one_is_refused_under_secure_aggregation():
    raw = {"name": "x", "cohorts": [{"arch": "mlp", "clients": 1}]}
    with pytest.raises(ConfigError, match="at least 2 clients") as err:
        config_from_dict(raw)
    assert err.value.key == "cohorts[0].clients"
    raw["secure_aggregation"] = {"enabled": False}
    assert config_from_dict(raw).num_clients == 1


def test_ring_overflow_is_refused_with_the_bits_named():
    from fedfuse.secagg.encoding import check_ring
    check_ring(24, 1_000_000)
    with pytest.raises(ConfigError, match="at most 32 bits") as err:
        check_ring(40, 2_000_000_000)
    assert err.value.key == "secure_aggregation.quantization_bits"


def test_client_refuses_a_minority_threshold():
    h = Harness(4)
    h.keys()
    msg = h.session.share_messages()[0]
    rec = ConfigRecord(dict(msg.content[RECORD]))
    rec["threshold"] = 2  # half of 4: two disjoint pairs could each rebuild secrets
    node = msg.metadata.dst_node_id
    with pytest.raises(client.SecAggError, match="not a majority"):
        client.share(h.states[node], rec, str(node))
