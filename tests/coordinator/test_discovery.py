"""Discovery: the sites a coordinator runs with, each answer checked against the
scenario, the data schema and (deployment) the site names the keys were registered
under (``fedfuse.coordinator.discovery``)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfuse.config import DataConfig, config_from_dict
from fedfuse.coordinator.discovery import Answer, discover, read_answer, reject_reason
from fedfuse.coordinator.grid import BoundedGrid
from fedfuse.data.datasets import load_dataset
from fedfuse.models.registry import build_model, shapes_digest
from fedfuse.wire import WireError
from tests.helpers import reply_from

pytestmark = pytest.mark.usefixtures("task_identity")

RAW = {"name": "t", "rounds": 1, "data": {"source": "digits"},
       "cohorts": [{"arch": "logreg", "sites": ["a", "b", "c"]}],
       "deployment": {"wait_for_sites": 0.0}}


def shapes(arch: str) -> str:
    """The parameter-shapes digest of a built-in's digits model, as a site sends it."""
    return shapes_digest(build_model(arch, load_dataset(DataConfig()).schema))


def answer(node: int, name: str, arch: str, **site) -> RecordDict:
    return RecordDict({
        "site": ConfigRecord({"arch": arch, "name": name, "input-shape": [1, 8, 8],
                              "num-classes": 10, "model-shapes": shapes(arch), **site}),
        "metrics": MetricRecord({"num-examples": 50, "num-val": 10,
                                 "index": {"a": 0, "b": 1}.get(name, 0)}),
        "moments": ArrayRecord({"sum": Array(np.zeros((1, 8, 8))),
                                "sumsq": Array(np.ones((1, 8, 8)))})})


class FakeGrid:
    """Nodes that answer discovery with the given (name, arch) each, or with the given
    RecordDict."""

    def __init__(self, answers: dict[int, tuple[str, str] | RecordDict]) -> None:
        self.answers = answers
        self.ttls: list[float] = []
        self.pending: dict[str, int] = {}
        self.late: set[int] = set()
        self.ignored: set[str] = set()
        self.asked: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.asked.append(msg)
            self.ttls.append(msg.metadata.ttl)
            ids.append(f"q{msg.metadata.dst_node_id}")
            self.pending[ids[-1]] = msg.metadata.dst_node_id
            if msg.metadata.dst_node_id in self.late:  # not connected yet: misses it
                self.late.discard(msg.metadata.dst_node_id)
                self.ignored.add(ids[-1])
            else:
                self.ignored.discard(ids[-1])
        return ids

    def pull_messages(self, ids):
        replies = []
        for mid in ids:
            if mid in self.ignored:
                continue
            node = self.pending.pop(mid)
            given = self.answers[node]
            content = given if isinstance(given, RecordDict) else answer(node, *given)
            replies.append(reply_from(node, content, "query"))
        return replies


def run_discovery(grid, sites: dict[int, str] | None, wait: float = 0.0):
    cfg = config_from_dict({**json.loads(json.dumps(RAW)), "deployment": {"wait_for_sites": wait}})
    return discover(grid, cfg, load_dataset(cfg.data).schema, sites)


def test_discovery_drops_a_node_claiming_another_sites_name():
    grid = FakeGrid({11: ("a", "logreg"), 22: ("a", "logreg")})
    participants, replies = run_discovery(grid, {11: "a", 22: "b"})
    assert [(p.node_id, p.name) for p in participants] == [(11, "a")]
    assert [r.metadata.src_node_id for r in replies] == [11]


def test_discovery_starts_with_the_sites_present_after_the_wait():
    grid = FakeGrid({11: ("a", "logreg")})  # b never connects; wait_for_sites = 0
    participants, _ = run_discovery(grid, {11: "a", 22: "b"})
    assert [p.name for p in participants] == ["a"]


def test_a_malformed_answer_drops_only_its_node(caplog):
    """A field of another type than the layout's (a string for an integer) is a
    WireError naming the field; that node is dropped, the others take part."""
    bad = answer(22, "b", "logreg", **{"num-classes": "10"})
    with pytest.raises(WireError, match="'num-classes' must be an integer"):
        read_answer(reply_from(22, bad, "query"))
    grid = FakeGrid({11: ("a", "logreg"), 22: bad})
    participants, _ = run_discovery(grid, {11: "a", 22: "b"})
    assert [p.name for p in participants] == ["a"]
    assert "node 22 dropped at discovery: a malformed answer" in caplog.text


def test_reject_reason_names_what_does_not_fit():
    cfg = config_from_dict(json.loads(json.dumps(RAW)))
    schema = load_dataset(cfg.data).schema
    good = read_answer(reply_from(11, answer(11, "a", "logreg"), "query"))
    assert good == Answer("a", "logreg", (1, 8, 8), 10, 0, 50, 10, shapes("logreg"))
    known = {"logreg": shapes("logreg")}

    def reason(a: Answer, sites: dict[int, str] | None = None) -> str | None:
        return reject_reason(11, a, cfg, schema, sites, known)

    assert reason(good) is None
    assert reason(good, {11: "a"}) is None
    assert "registered as 'b'" in reason(good, {11: "b"})
    cnn = replace(good, arch="cnn")
    assert "it trains cohort 'cnn', not its own (logreg)" in reason(cnn)
    flat = replace(good, input_shape=(64,))
    assert "input shape (64,) differs" in reason(flat)
    binary = replace(good, num_classes=2)
    assert "2 classes, the coordinator has 10" in reason(binary)
    other = replace(good, model_shapes=shapes("mlp"))  # another version of the model's code
    assert "other parameter shapes than the coordinator's" in reason(other)


def test_discovery_drops_impossible_counts_moments_and_the_wrong_cohort(caplog):
    """A site's answer cannot poison the run (issue 23, item 8): a huge example count
    (it would break the ring check of every cohort), NaN or contradictory moments (they
    would poison every cohort's standardisation), an architecture of another cohort."""
    raw = {**json.loads(json.dumps(RAW)),
           "cohorts": [{"arch": "logreg", "sites": ["a", "b", "c", "d", "h"]},
                       {"arch": "mlp", "sites": ["e", "f", "g"]}],
           "secure_aggregation": {"enabled": False}}  # the moments come in plaintext
    cfg = config_from_dict(raw)
    huge = answer(0, "b", "logreg")
    huge["metrics"]["num-examples"] = 2**50
    nan = answer(0, "c", "logreg")
    nan["moments"] = ArrayRecord({"sum": Array(np.full((1, 8, 8), np.nan)),
                                  "sumsq": Array(np.ones((1, 8, 8)))})
    negative = answer(0, "d", "logreg")  # sum x = 50 per feature but sum x^2 = 1, n = 50
    negative["moments"] = ArrayRecord({"sum": Array(np.full((1, 8, 8), 50.0)),
                                       "sumsq": Array(np.ones((1, 8, 8)))})
    withheld = answer(0, "h", "logreg")  # its policy sends them only in a secure sum
    del withheld["moments"]
    grid = FakeGrid({11: ("a", "logreg"), 22: huge, 33: nan, 44: negative,
                     55: ("e", "logreg"), 66: withheld})  # e belongs to the mlp cohort
    participants, _ = discover(grid, cfg, load_dataset(cfg.data).schema,
                               {11: "a", 22: "b", 33: "c", 44: "d", 55: "e", 66: "h"})
    assert [p.name for p in participants] == ["a"]
    assert "node 22 (b) dropped at discovery: 1125899906842624 training" in caplog.text
    assert "node 33 (c) dropped at discovery: feature moments that are not finite" in caplog.text
    assert "node 44 (d) dropped at discovery: feature moments with a negative variance" \
        in caplog.text
    assert "node 55 (e) dropped at discovery: it trains cohort 'logreg', not its own " \
        "(mlp)" in caplog.text
    assert "node 66 (h) dropped at discovery: no feature sums" in caplog.text
    # under secure aggregation the sums are not asked for, so none are checked here:
    # their total is (tests/coordinator/test_moments.py)
    secure = config_from_dict({**raw, "secure_aggregation": {"enabled": True}})
    grid = FakeGrid({11: ("a", "logreg"), 33: nan, 66: withheld})
    participants, _ = discover(grid, secure, load_dataset(cfg.data).schema,
                               {11: "a", 33: "c", 66: "h"})
    assert [p.name for p in participants] == ["a", "c", "h"]
    assert all(q.content["discovery"]["moments"] == "secure" for q in grid.asked)


def test_every_exchange_is_bounded_by_round_timeout():
    grid = FakeGrid({11: ("a", "logreg")})
    bounded = BoundedGrid(grid, 12.5)
    participants, _ = run_discovery(bounded, {11: "a"})
    assert participants and len(grid.ttls) == 1 and 12.5 <= grid.ttls[0] < 13.5
    assert bounded.get_node_ids() == [11]


def test_a_site_that_missed_the_query_is_asked_again_while_sites_are_awaited():
    """A resumed coordinator finds every site registered while some SuperNodes are still
    reconnecting: a listed site that missed the first query is asked again."""
    grid = FakeGrid({11: ("a", "logreg"), 22: ("b", "logreg")})
    grid.late = {22}
    participants, _ = run_discovery(BoundedGrid(grid, 0.2), {11: "a", 22: "b"}, wait=5.0)
    assert [p.name for p in participants] == ["a", "b"] and len(grid.ttls) == 3
    grid = FakeGrid({11: ("a", "logreg"), 22: ("b", "logreg")})
    grid.late = {22}
    participants, _ = run_discovery(BoundedGrid(grid, 0.2), None, wait=5.0)  # simulation
    assert [p.name for p in participants] == ["a"] and len(grid.ttls) == 2  # asked once
