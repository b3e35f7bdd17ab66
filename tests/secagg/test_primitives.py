"""Secure aggregation's building blocks: Shamir sharing, the crypto primitives, the
quantised FedAvg encoding, and the settings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedfuse.config import config_from_dict
from fedfuse.errors import ConfigError
from fedfuse.secagg import Quantizer, crypto, decode_sum, encode_update, shamir

# -- Shamir ---------------------------------------------------------------------------

def test_any_threshold_subset_rebuilds_the_secret():
    secret = bytes(range(32))
    shares = shamir.split_secrets([secret], 3, 5)[0]
    for subset in itertools.combinations(range(5), 3):
        assert shamir.combine_shares({i + 1: shares[i] for i in subset}) == secret


def test_fewer_than_threshold_shares_do_not_rebuild_the_secret():
    secret = bytes(range(32))
    shares = shamir.split_secrets([secret], 4, 6)[0]
    for subset in itertools.combinations(range(6), 3):
        with pytest.raises(ValueError):  # chunks uniform in GF(p), not a 32-byte secret
            shamir.combine_shares({i + 1: shares[i] for i in subset})


def test_secrets_split_together_have_independent_shares():
    import os

    a, b = os.urandom(32), bytes(32)  # also the all-zero secret, every chunk 0
    sa, sb = shamir.split_secrets([a, b], 3, 4)
    assert all(len(x) == shamir.SHARE_BYTES for x in sa + sb)
    assert sa != sb and len(set(sa)) == 4
    assert shamir.combine_shares({2: sa[1], 3: sa[2], 4: sa[3]}) == a
    assert shamir.combine_shares({1: sb[0], 2: sb[1], 4: sb[3]}) == b
    # the same secret split twice gets fresh polynomials: no share repeats
    assert not set(shamir.split_secrets([a], 3, 4)[0]) & set(sa)


def test_malformed_shares_are_refused():
    shares = shamir.split_secrets([bytes(range(32))], 2, 3)[0]
    with pytest.raises(ValueError, match="not in the field"):
        shamir.combine_shares({1: b"\xff" * shamir.SHARE_BYTES, 2: shares[1]})
    with pytest.raises(ValueError, match="bytes"):
        shamir.combine_shares({1: shares[0][:-1], 2: shares[1]})
    with pytest.raises(ValueError, match="indices"):
        shamir.combine_shares({0: shares[0], 2: shares[1]})


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


def test_a_sum_beyond_what_honest_clients_can_send_is_refused():
    q = Quantizer(clip_range=1.0, bits=16)
    rng = np.random.default_rng(3)
    good = sum(encode_update([rng.uniform(-1, 1, 5)], n, 0.5, 0.25, q, rng) for n in (3, 4))
    decode_sum(good, [(5,)], q)  # a sum of honest vectors decodes
    bad = good.copy()
    bad[2] += np.uint64(2**62)  # one client adds 2^62 to one coordinate (masks are additive)
    with pytest.raises(ValueError, match="entry 2 of the sum"):
        decode_sum(bad, [(5,)], q)
    edge = good.copy()
    edge[0] = np.uint64(7 * q.levels)  # the most 7 examples can send: +clip_range, accepted
    assert decode_sum(edge, [(5,)], q).mean_delta[0][0] == pytest.approx(1.0)
    edge[0] += np.uint64(1)
    with pytest.raises(ValueError, match="entry 0"):
        decode_sum(edge, [(5,)], q)
    for index, value, what in ((-2, 2 * 7 * 2**24, "accuracy"), (-4, 2**62, "ring"),
                               (-1, 7 * 5 + 1, "clipped")):
        wrong = good.copy()
        wrong[index] = np.uint64(value)
        with pytest.raises(ValueError, match=what):
            decode_sum(wrong, [(5,)], q)


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


@pytest.mark.parametrize("clients", [1, 2])
def test_a_cohort_of_one_or_two_is_refused_under_secure_aggregation(clients):
    raw = {"name": "x", "cohorts": [{"arch": "mlp", "clients": clients}]}
    with pytest.raises(ConfigError, match="at least 3 clients") as err:
        config_from_dict(raw)
    assert err.value.key == "cohorts[0].clients"
    raw["secure_aggregation"] = {"enabled": False}
    assert config_from_dict(raw).num_clients == clients


def test_ring_overflow_is_refused_with_the_bits_named():
    from fedfuse.secagg.encoding import check_ring
    check_ring(24, 1_000_000)
    with pytest.raises(ConfigError, match="at most 32 bits") as err:
        check_ring(40, 2_000_000_000)
    assert err.value.key == "secure_aggregation.quantization_bits"


def test_fusion_statistics_out_of_range_are_refused():
    from fedfuse.coordinator.aggregation import bounded_statistics
    from fedfuse.fusion.soft_vote import brier_statistics

    rng = np.random.default_rng(4)
    probas = [rng.dirichlet(np.ones(3), 20) for _ in range(2)]
    A, b = brier_statistics(probas, rng.integers(0, 3, 20))
    flat = np.concatenate([A.ravel(), b, [20]])
    got = bounded_statistics(flat, 2)
    assert np.allclose(got[0], A) and got[2] == 20
    for index, value, what in ((0, 21.0, "A has entries"), (4, -1.0, "b has entries"),
                               (-1, 0.5, "not a whole number"), (-1, np.nan, "whole")):
        wrong = flat.copy()
        wrong[index] = value
        with pytest.raises(ValueError, match=what):
            bounded_statistics(wrong, 2)
