"""The feature moments that standardise every cohort (``fedfuse.coordinator.moments``):
under secure aggregation only their totals leave the sites, through a secure sum, and a
dishonest total is refused; pooled equal to the plaintext path otherwise."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from fedfuse.config import config_from_dict
from fedfuse.coordinator.moments import QUERY, moments_bound
from fedfuse.data.sites import plan_federation
from fedfuse.data.stats import (
    local_moments,
    mean_std_from_totals,
    pooled_mean_std,
    standardised_sums,
)
from fedfuse.secagg.encoding import FIXED_POINT_BITS, decode_fixed, encode_fixed
from fedfuse.secagg.messages import MASKED
from tests.helpers import run_federation


def parts() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    out = [rng.normal(loc=3 * i, scale=1 + i, size=(30 + 11 * i, 6)) for i in range(4)]
    for p in out:
        p[:, 5] = -2.5  # a constant feature
    return out


def test_totals_of_standardised_sums_give_the_unions_mean_and_std():
    data = parts()
    center, scale = np.full(6, 1.0), np.full(6, 2.0)  # a reference of other data
    bound = moments_bound(sum(len(p) for p in data))
    total = sum(encode_fixed(standardised_sums(p, center, scale, bound)) for p in data)
    mean, std = mean_std_from_totals(decode_fixed(total), center, scale, bound,
                                     sum(len(p) for p in data))
    want_mean, want_std = pooled_mean_std(*map(list, zip(*map(local_moments, data))))
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, want_std, rtol=1e-5)
    assert std[5] == 1.0


def test_the_bound_keeps_the_squares_of_every_example_inside_the_ring():
    for n in (10, 1_000, 10**6, 10**8):
        bound = moments_bound(n)
        assert n * bound * bound * 2**FIXED_POINT_BITS <= 2**62


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.__setitem__(0, t[0] + 5), "they count 191 examples, the sites reported 186"),
    (lambda t: t.__setitem__(7, -1.0), "sums outside"),
    (lambda t: t.__setitem__(1, 1e12), "sums outside"),
    (lambda t: t.__setitem__(7, 0.0), "negative variance"),
    (lambda t: t.__setitem__(3, np.nan), "not finite"),
])
def test_a_dishonest_total_is_refused_with_the_reason(edit, needle):
    data = parts()
    center, scale = np.zeros(6), np.ones(6)
    totals = np.sum([standardised_sums(p, center, scale, 100.0) for p in data], axis=0)
    totals[1] = 40.0  # a non-zero sum of feature 0: its sum of squares cannot be 0
    edit(totals)
    with pytest.raises(ValueError, match=needle):
        mean_std_from_totals(totals, center, scale, 100.0, 186)


# -- through the engine ------------------------------------------------------------------

def scenario(secure: bool):
    return config_from_dict({
        "name": "moments", "seed": 6, "rounds": 1,
        "cohorts": [{"arch": "logreg", "clients": 3}],
        "partition": {"method": "dirichlet", "alpha": 0.5, "min_samples": 20},
        "secure_aggregation": {"enabled": secure}})


def no_plaintext_moments(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: a discovery answer carrying feature sums fails the site."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == "query":
        assert "moments" not in reply.content.array_records
    return reply


def dishonest_moments(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: site 0 adds 2^40 to the count in its masked moments."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == QUERY and int(context.node_config["partition-id"]) == 0:
        vector = reply.content[MASKED]["vector"].numpy().copy()
        vector[0] += np.uint64(1 << 40)
        reply.content[MASKED] = ArrayRecord({"vector": Array(vector)})
    return reply


def standardisation(result) -> tuple[np.ndarray, np.ndarray]:
    arrays = result.cohorts["logreg"].arrays
    return arrays["0.mean"].numpy(), arrays["0.std"].numpy()


@pytest.mark.slow
def test_only_totals_leave_the_sites_and_a_dishonest_total_is_not_used(caplog):
    secure = run_federation(scenario(True), [no_plaintext_moments]).result
    plain = run_federation(scenario(False)).result
    assert len(secure.participants) == 3 and secure.secure_sums == 1
    (ms, ss), (mp, sp) = standardisation(secure), standardisation(plain)
    step = 2 * 2.0 / (2**24 - 1)  # the round's secure sum moves a buffer by one step at most
    np.testing.assert_allclose(ms, mp, rtol=1e-5, atol=step + 1e-5)
    np.testing.assert_allclose(ss, sp, rtol=1e-5, atol=step + 1e-5)
    with caplog.at_level(logging.WARNING, logger="fedfuse.coordinator"):
        cheated = run_federation(scenario(True), [dishonest_moments]).result
    assert "feature moments: the secure sum is rejected (they count" in caplog.text
    assert cheated.secure_sums == 1  # the run went on
    test = plan_federation(scenario(True)).test.X  # what it standardises with instead
    ref_mean, ref_std = pooled_mean_std(*([v] for v in local_moments(test)), by_channel=True)
    mc, sc = standardisation(cheated)
    np.testing.assert_allclose(mc.ravel(), ref_mean.ravel(), atol=step + 1e-5)
    np.testing.assert_allclose(sc.ravel(), ref_std.ravel(), atol=step + 1e-5)
    assert not np.allclose(mc, ms, atol=1e-3)
