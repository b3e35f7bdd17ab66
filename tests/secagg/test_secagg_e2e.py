"""Secure aggregation through Flower's real simulation engine, with real dropouts: sites
whose ClientApp fails after they have shared their keys, in a session of their own or
in one opened on the previous round's exchanges."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.simulation import run_simulation

from fedfuse.config import config_from_dict
from fedfuse.coordinator.app import build_server_app
from fedfuse.coordinator.records import FederationResult
from fedfuse.data.sites import plan_federation
from fedfuse.secagg.messages import MASKED, SHARE_RECORD, SHARES, UNMASK_RECORD
from fedfuse.simulation.runner import backend_config, site_from_context
from fedfuse.site.app import build_client_app
from tests.helpers import run_federation

pytestmark = pytest.mark.slow

OFFLINE = {1, 3}
"""Partition ids whose site fails in training: after the key exchange of its session."""


def offline_in_training(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: these sites crash when asked to train."""
    if msg.metadata.message_type == "train" and \
            int(context.node_config["partition-id"]) in OFFLINE:
        raise RuntimeError("site lost its connection")
    return call_next(msg, context)


def inflated_count(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: site 0 claims 1000 more training examples than it has, by
    adding to the count entry of its masked vector (masks are additive)."""
    reply = call_next(msg, context)
    if MASKED in reply.content and int(context.node_config["partition-id"]) == 0:
        vector = reply.content[MASKED]["vector"].numpy().copy()
        vector[-4] += np.uint64(1000)
        reply.content[MASKED] = ArrayRecord({"vector": Array(vector)})
    return reply


class Keep:
    """A RoundListener that keeps the coordinator's result."""

    result: FederationResult | None = None

    def on_start(self, participants, rounds) -> None: ...

    def on_round(self, record) -> None: ...

    def on_finish(self, result: FederationResult) -> None:
        self.result = result


def run(secure: bool, clients: int = 5, threshold: float = 0.6,
        mods=(offline_in_training,), neighbours: int = 0,
        consistency: bool = False) -> FederationResult:
    """A 2-round run of ``clients`` sites; by default semi-honest (no consistency check,
    t = 3 of 5), so that two of five may drop."""
    cfg = config_from_dict({
        "name": "drop", "seed": 5, "rounds": 2,
        "cohorts": [{"arch": "logreg", "clients": clients}],
        "partition": {"method": "dirichlet", "alpha": 0.5, "min_samples": 20},
        "secure_aggregation": {"enabled": secure, "threshold": threshold,  # t = 3 of 5
                               "neighbours": neighbours, "consistency_check": consistency},
    })
    keep = Keep()
    server = build_server_app(cfg, plan_federation(cfg).test, keep)
    client = build_client_app(partial(site_from_context, cfg, None), mods=list(mods))
    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.num_clients,
                   backend_config=backend_config(cfg))
    assert keep.result is not None
    return keep.result


@pytest.fixture(scope="module")
def both():
    return run(secure=True), run(secure=False)


def test_round_completes_without_the_dropped_sites(both):
    secure, _ = both
    assert secure.secure_sums == 2
    for record in secure.history:
        entry = record.cohorts["logreg"]
        assert entry.secagg_clients == 3 and entry.secagg_dropped == len(OFFLINE)
        assert entry.train_failures == len(OFFLINE) and entry.secagg_failed is False


def assert_survivors_fedavg(secure: FederationResult, plain: FederationResult) -> None:
    """The secure run's models and metrics are the plaintext run's, up to quantisation."""
    step = 2 * 2.0 / (2**24 - 1)  # the quantiser's step at the default clip range and bits
    a = secure.cohorts["logreg"].arrays
    b = plain.cohorts["logreg"].arrays
    for key in a:
        want = b[key].numpy()
        diff = np.abs(a[key].numpy().astype(np.float64) - want)
        # two rounds: each adds at most one step, plus float32 rounding of the weights
        assert np.all(diff <= 2 * step + 2 * np.spacing(np.abs(want))), key
    for ra, rb in zip(secure.history, plain.history):
        ca, cb = ra.cohorts["logreg"], rb.cohorts["logreg"]
        assert ca.train_loss == pytest.approx(cb.train_loss, abs=1e-6)
        assert ca.test_accuracy == pytest.approx(cb.test_accuracy, abs=0.003)


def assert_each_round_summed(secure: FederationResult, plain: FederationResult,
                             survivors: int) -> None:
    """Both rounds' sums are over ``survivors`` sites (the ``OFFLINE`` ones dropped) and
    equal the plaintext run's FedAvg of them."""
    assert secure.secure_sums == 2
    for record in secure.history:
        entry = record.cohorts["logreg"]
        assert entry.secagg_clients == survivors and entry.secagg_dropped == len(OFFLINE)
    assert_survivors_fedavg(secure, plain)


def test_secure_aggregate_equals_the_survivors_plaintext_fedavg(both):
    secure, plain = both
    assert plain.secure_sums == 0
    assert_survivors_fedavg(secure, plain)


def neighbourhood_of_five(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: a share request naming more than a neighbourhood (the site
    and 4 neighbours) fails the site, so a session on the complete graph would abort."""
    if SHARE_RECORD in msg.content.config_records:
        assert len(msg.content.config_records[SHARE_RECORD]["nodes"]) == 5
    return offline_in_training(msg, context, call_next)


def test_secagg_plus_neighbourhoods_through_the_engine_sum_the_survivors():
    secure = run(secure=True, clients=9, neighbours=4, mods=[neighbourhood_of_five])
    assert_each_round_summed(secure, run(secure=False, clients=9), survivors=7)


def committed_to_another_secret(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: site 0 commits to another self-mask seed than the one it
    shares, which breaks every sum it is in (its shares still match their commitments)."""
    reply = call_next(msg, context)
    if SHARES in reply.content.config_records and \
            int(context.node_config["partition-id"]) == 0:
        reply.content.config_records[SHARES]["b-hash"] = bytes(32)
    return reply


def test_a_site_that_breaks_a_sum_is_no_longer_sampled(caplog):
    with caplog.at_level(logging.WARNING):
        result = run(secure=True, clients=5, mods=[committed_to_another_secret])
    # the first sum it is in (the feature moments', before round 1) cannot be unmasked:
    # nothing is revealed, and it is named and no longer asked
    assert "shares do not rebuild the mask seed it committed to" in caplog.text
    assert "feature moments: the secure sum did not complete" in caplog.text
    assert "stops sampling client-0: its shares broke a secure sum" in caplog.text
    for record in result.history:
        entry = record.cohorts["logreg"]
        assert not entry.secagg_failed and entry.secagg_clients == 4
    assert result.secure_sums == 2 and result.fusion is not None
    assert result.fusion.sites == 4


def certified_unmask(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: an unmask request without at least 5 signatures of the
    survivors (more than 2/3 of 7; in the rounds 5 survivors sign, in the feature
    moments' sum before them all 7) fails the site, so the sum would fail."""
    if UNMASK_RECORD in msg.content.config_records:
        rec = msg.content.config_records[UNMASK_RECORD]
        assert len(rec["signatures"]) == len(rec["signers"]) >= 5
    return offline_in_training(msg, context, call_next)


def test_the_consistency_check_through_the_engine_sums_the_survivors():
    # the default mode: t = 5 of 7 (above 2/3), two sites drop after sharing, the five
    # survivors sign U3 and reveal only with 5 > 2/3 * 7 signatures
    secure = run(secure=True, clients=7, threshold=0.7, consistency=True,
                 mods=[certified_unmask])
    assert_each_round_summed(secure, run(secure=False, clients=7), survivors=5)


def test_fusion_statistics_come_out_of_a_secure_sum(both):
    secure, plain = both
    fs, fp = secure.fusion, plain.fusion
    assert fs is not None and fp is not None
    assert fs.sites == fp.sites == 5 and fs.num_examples == fp.num_examples
    # the cohort models differ by quantisation only, so the statistics nearly agree
    np.testing.assert_allclose(fs.A, fp.A, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(fs.b, fp.b, rtol=1e-4, atol=1e-3)


def test_too_many_dropouts_fail_the_round_cleanly_and_the_run_goes_on():
    # t = 3 of 3: site 1 failing leaves fewer survivors than the threshold
    result = run(secure=True, clients=3, threshold=1.0)
    assert result.secure_sums == 0 and len(result.history) == 2
    first, second = (r.cohorts["logreg"] for r in result.history)
    assert first.secagg_failed and second.secagg_failed
    assert first.train_loss is None  # nothing was aggregated, nothing revealed
    assert "train_loss" not in result.history[0].to_dict()["cohorts"]["logreg"]
    assert first.test_accuracy == second.test_accuracy  # the model was kept


def test_a_misreported_example_count_is_caught_and_the_sum_rejected():
    result = run(secure=True, clients=3, mods=[inflated_count])
    assert result.secure_sums == 0
    first, second = (r.cohorts["logreg"] for r in result.history)
    assert first.secagg_failed and second.secagg_failed
    assert first.secagg_clients == 3  # the protocol itself completed
    assert first.test_accuracy == second.test_accuracy  # the model was kept


def huge_coordinate(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: site 0 adds 2^62 to one weight coordinate of its masked
    vector (before issue 23 this passed the count check and put 7.3e9 into the mean)."""
    reply = call_next(msg, context)
    if MASKED in reply.content and int(context.node_config["partition-id"]) == 0:
        vector = reply.content[MASKED]["vector"].numpy().copy()
        vector[3] += np.uint64(2**62)
        reply.content[MASKED] = ArrayRecord({"vector": Array(vector)})
    return reply


def test_a_coordinate_beyond_the_clip_range_is_caught_and_the_sum_rejected():
    result = run(secure=True, clients=3, mods=[huge_coordinate])
    assert result.secure_sums == 0 and len(result.history) == 2  # the run went on
    first, second = (r.cohorts["logreg"] for r in result.history)
    assert first.secagg_failed and second.secagg_failed
    assert first.secagg_clients == 3  # the protocol completed; the sum was refused
    assert first.test_accuracy == second.test_accuracy  # the model was kept


def offline_in_round_two(msg: Message, context: Context, call_next) -> Message:
    """A Flower client mod: these sites crash when asked to train in round 2, after
    round 1's train reply carried their keys for round 2 and round 1's unmask reply
    their sealed shares."""
    if msg.metadata.message_type == "train" and msg.content["config"]["server-round"] == 2 \
            and int(context.node_config["partition-id"]) in OFFLINE:
        raise RuntimeError("site lost its connection")
    return call_next(msg, context)


def test_sites_crashing_after_the_piggybacked_key_exchange_are_unmasked_out():
    def cfg(secure: bool):
        return config_from_dict({
            "name": "drop", "seed": 5, "rounds": 3,
            "cohorts": [{"arch": "logreg", "clients": 5}],
            "partition": {"method": "dirichlet", "alpha": 0.5, "min_samples": 20},
            "secure_aggregation": {"enabled": secure, "threshold": 0.6,
                                   "consistency_check": False}})
    secure = run_federation(cfg(True), [offline_in_round_two])
    plain = run_federation(cfg(False), [offline_in_round_two])
    counts = [len(r) for r in secure.per_round()]
    # round 2 masks in the session opened on round 1's exchanges; round 3 opens a fresh
    # one, so that the two sites (back after their crash) take part again
    assert counts == [4, 2, 4, 2]
    entries = [r.cohorts["logreg"] for r in secure.result.history]
    assert [(e.secagg_clients, e.secagg_dropped, e.secagg_failed) for e in entries] == [
        (5, 0, False), (3, 2, False), (5, 0, False)]
    assert entries[1].train_failures == 2
    step = 2 * 2.0 / (2**24 - 1)
    a, b = secure.result.cohorts["logreg"].arrays, plain.result.cohorts["logreg"].arrays
    for key in a:  # the survivors' FedAvg, up to one quantiser step a round
        want = b[key].numpy()
        diff = np.abs(a[key].numpy().astype(np.float64) - want)
        assert np.all(diff <= 3 * step + 3 * np.spacing(np.abs(want))), key
