"""Client-level DP as a wrapper strategy (``fedfuse.strategies.ClientLevelDP``): what it
asks of the sites, the one noisy release per round, its account, and its stop at the
budget (the release's math: tests/privacy/test_client_level.py)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedfuse.privacy.accounting import epsilon_of
from fedfuse.privacy.client_level import cohort_ledger, release
from fedfuse.strategies import ClientLevelDP, cohort_strategy
from tests.helpers import GLOBAL, NodesGrid, honest, train_update

pytestmark = pytest.mark.usefixtures("task_identity")

MEMBERS = [4, 2, 9]
SIGMA, DELTA = 1.0, 1e-3


def wrapped(noise_key: int = 5, budget: float | None = None) -> ClientLevelDP:
    ledger = cohort_ledger("rdp", DELTA, budget, None, SIGMA, sites=3, planned_rounds=4)
    return ClientLevelDP(cohort_strategy("fedavg", "mlp", MEMBERS, seed=1), ledger, 1.0,
                         noise_key=noise_key, index=2, secure=False)


def one_round(dp: ClientLevelDP, server_round: int):
    sent = list(dp.configure_train(server_round, GLOBAL, ConfigRecord(), NodesGrid(MEMBERS)))
    replies = [train_update(m.metadata.dst_node_id, 10 * honest(0, m.metadata.dst_node_id))
               for m in reversed(sent)]  # in another order than the members'
    return sent, replies, dp.aggregate_train(server_round, replies)


def test_a_round_is_one_noisy_release_charged_to_the_cohorts_ledger():
    dp = wrapped()
    sent, replies, (arrays, metrics) = one_round(dp, 1)
    assert [m.metadata.dst_node_id for m in sent] == MEMBERS
    for m in sent:
        config = m.content["config"]
        assert config["dp-mode"] == "user" and config["dp-clipping-norm"] == 1.0
    # the wrapped FedAvg applies exactly the release of the replies in member order,
    # with the noise of [noise_key, round, index]
    ledger = cohort_ledger("rdp", DELTA, None, None, SIGMA, sites=3, planned_rounds=4)
    expected = release(GLOBAL, dp.strategy.in_member_order(replies), sent, ledger, 1.0,
                       np.random.default_rng([5, 1, 2]), secure=False)
    for key in ("w", "b"):
        np.testing.assert_array_equal(arrays[key].numpy(),
                                      expected.content["arrays"][key].numpy())
    assert expected.content["metrics"]["num-examples"] == 3  # each site counts once
    assert metrics["train-loss"] == pytest.approx(0.1)
    assert dp.ledger.history == [(SIGMA, 1.0, 1)]
    assert sorted(dp.reports) == sorted(MEMBERS)
    assert {r["status"] for r in dp.reports.values()} == {"trained"}
    assert dp.reports[4]["epsilon"] == pytest.approx(epsilon_of([(SIGMA, 1.0, 1)], DELTA))
    again = one_round(wrapped(), 1)[2][0]
    other = one_round(wrapped(noise_key=6), 1)[2][0]
    assert np.array_equal(again["w"].numpy(), arrays["w"].numpy())  # seeded noise
    assert not np.array_equal(other["w"].numpy(), arrays["w"].numpy())


def test_the_cohort_stops_when_its_next_release_would_exceed_the_budget():
    two, three = (epsilon_of([(SIGMA, 1.0, k)], DELTA) for k in (2, 3))
    dp = wrapped(budget=(two + three) / 2)
    for r in (1, 2):
        sent, _, (arrays, _) = one_round(dp, r)
        assert len(sent) == 3 and arrays is not None
    assert dp.configure_train(3, GLOBAL, ConfigRecord(), NodesGrid(MEMBERS)) == []
    assert dp.trainers == [] and dp.members == MEMBERS
    assert {r["status"] for r in dp.reports.values()} == {"budget-exhausted"}
    assert dp.ledger.steps == 2 and dp.ledger.epsilon() <= dp.ledger.budget
