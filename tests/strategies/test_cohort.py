"""Per-cohort FedAvg (``fedfuse.strategies.cohort``): the aggregate, the member order,
and the cohort's own seeded sampler."""

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfuse.strategies import ROBUST_RULES, CohortFedAvg, cohort_strategy
from tests.helpers import GLOBAL, NodesGrid, honest, reply_from, train_update


def train_reply(node: int, weights: np.ndarray, n: int, loss: float):
    return reply_from(node, RecordDict({
        "arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
    }))


def test_fedavg_equals_example_weighted_mean():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 4)) for _ in range(3)]
    ns = [10, 30, 60]
    strategy = CohortFedAvg("mlp", members=[11, 12, 13])
    replies = [train_reply(11 + i, w, n, float(i)) for i, (w, n) in enumerate(zip(ws, ns))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = sum(n * w for w, n in zip(ws, ns)) / sum(ns)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == np.float64(0 * 0.1 + 1 * 0.3 + 2 * 0.6).item()


def test_replies_from_outside_the_cohort_are_ignored():
    strategy = CohortFedAvg("mlp", members=[1, 2])
    replies = [train_reply(1, np.ones((2,)), 1, 0.0), train_reply(2, np.zeros((2,)), 1, 0.0),
               train_reply(99, np.full((2,), 100.0), 1000, 0.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5, 0.5])


def test_aggregation_order_is_fixed_by_member_rank():
    strategy = CohortFedAvg("mlp", members=[5, 3, 9])
    replies = [train_reply(n, np.zeros(1), 1, 0.0) for n in (9, 5, 3)]
    assert [m.metadata.src_node_id for m in strategy.in_member_order(replies)] == [5, 3, 9]
    a, _ = strategy.aggregate_train(1, replies)
    b, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())


MEMBERS = [17, 3, 25, 8, 11, 40, 2, 31]
"""A cohort's node ids in member (site) order, not sorted."""


def sampled(strategy, rounds=range(1, 7), phase="train") -> list[list[int]]:
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    return [[m.metadata.dst_node_id
             for m in configure(r, GLOBAL, ConfigRecord(), NodesGrid(MEMBERS))]
            for r in rounds]


@pytest.mark.usefixtures("task_identity")
def test_a_seeded_cohort_samples_the_same_nodes_whatever_the_global_random_state():
    """fraction_train = 0.5 of 8 nodes: 4 per round, drawn by the cohort's own generator,
    so two strategies with one seed sample alike even when the global ``random`` module
    is in another state, another seed samples otherwise, and the messages go out in
    member order."""
    random.seed(1)
    a = sampled(cohort_strategy("fedavg", "mlp", MEMBERS, seed=5, fraction_train=0.5))
    random.seed(2)
    b = sampled(cohort_strategy("fedavg", "mlp", MEMBERS, seed=5, fraction_train=0.5))
    other = sampled(cohort_strategy("fedavg", "mlp", MEMBERS, seed=6, fraction_train=0.5))
    assert a == b and a != other
    assert all(len(s) == 4 for s in a + other)
    assert len({tuple(s) for s in a}) > 1  # not one fixed subset
    rank = {n: i for i, n in enumerate(MEMBERS)}
    assert all(s == sorted(s, key=rank.__getitem__) for s in a + other)
    evaluated = sampled(cohort_strategy("fedavg", "mlp", MEMBERS, seed=5,
                                        fraction_evaluate=0.25), phase="evaluate")
    assert all(len(s) == 2 for s in evaluated)
    everyone = sampled(cohort_strategy("fedavg", "mlp", MEMBERS, seed=5))
    assert everyone == [MEMBERS] * 6  # fraction 1: every member, in member order


@pytest.mark.usefixtures("task_identity")
def test_fedfuse_never_seeds_or_sets_the_global_random_module(monkeypatch):
    """Building, running, checkpointing and restoring every kind of cohort strategy
    leaves the ``random`` module's seed alone (Flower's own sampling draws from it, so
    its state moves, but fedfuse never seeds or resets it)."""
    before = random.getstate()
    built = [cohort_strategy(aggregation, "logreg", MEMBERS, seed=3, fraction_train=0.5)
             for aggregation in ("fedavg", *ROBUST_RULES)]
    built[0].restore_state(built[1].state_arrays(), GLOBAL)
    assert random.getstate() == before  # building and restoring draw nothing from it
    calls = []
    monkeypatch.setattr(random, "seed", lambda *a, **k: calls.append(("seed", a)))
    monkeypatch.setattr(random, "setstate", lambda *a, **k: calls.append(("setstate", a)))
    for aggregation, extra in [("fedavg", {}), ("fedavg", {"server_momentum": 0.9}),
                               *((rule, {}) for rule in ROBUST_RULES)]:
        strategy = cohort_strategy(aggregation, "logreg", MEMBERS, seed=3, fraction_train=0.75,
                                   fraction_evaluate=0.5, **extra)
        sent = list(strategy.configure_train(1, GLOBAL, ConfigRecord(), NodesGrid(MEMBERS)))
        replies = [train_update(m.metadata.dst_node_id, honest(0, i)) for i, m in enumerate(sent)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None, aggregation
        list(strategy.configure_evaluate(1, arrays, ConfigRecord(), NodesGrid(MEMBERS)))
        restored = cohort_strategy(aggregation, "logreg", MEMBERS, seed=3, **extra)
        restored.restore_state(strategy.state_arrays(), arrays)
    assert calls == []


@pytest.mark.usefixtures("task_identity")
def test_a_sample_fixed_ahead_survives_a_checkpoint_onto_new_node_ids():
    """Secure aggregation fixes round r + 1's sample during round r; the checkpoint
    keeps it by member rank, since a resumed run's nodes have other ids."""
    before = cohort_strategy("fedavg", "logreg", [11, 12, 13, 14], seed=3, fraction_train=0.5)
    fixed = before.fix_train_sample(NodesGrid([11, 12, 13, 14]))
    after = cohort_strategy("fedavg", "logreg", [21, 22, 23, 24], seed=3, fraction_train=0.5)
    after.restore_state(before.state_arrays(), GLOBAL)
    assert after.pending == [n + 10 for n in fixed] and len(fixed) == 2
    before.retire(fixed[0])
    sent = before.configure_train(1, GLOBAL, ConfigRecord(), NodesGrid([11, 12, 13, 14]))
    assert [m.metadata.dst_node_id for m in sent] == fixed[1:]  # retired since: left out
    assert before.pending is None


def test_a_sample_fixed_ahead_is_drawn_again_when_the_membership_changed(caplog):
    """A coordinator resumed with a site missing: the checkpoint's ranks would name other
    sites (or none), so the next round's sample is drawn afresh, and the run goes on."""
    before = cohort_strategy("fedavg", "logreg", [11, 12, 13, 14], seed=3, fraction_train=1.0)
    before.fix_train_sample(NodesGrid([11, 12, 13, 14]))
    after = cohort_strategy("fedavg", "logreg", [21, 22, 23], seed=3, fraction_train=1.0)
    after.restore_state(before.state_arrays(), GLOBAL)
    assert after.pending is None and "drawn again" in caplog.text
