"""SecAgg+ neighbourhoods: the ring graph, and sessions in which every member shares
with and masks with its neighbours only (real client handlers, real coordinator
session, in process)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedfuse.config import config_from_dict
from fedfuse.errors import ConfigError
from fedfuse.secagg import SecAggAbort, client
from fedfuse.secagg.graph import neighbourhoods
from fedfuse.secagg.server import threshold_for
from tests.helpers import SecAggHarness as Harness

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize(("n", "k"), [(10, 2), (21, 6), (30, 8), (101, 20)])
def test_ring_neighbourhoods_are_symmetric_and_of_size_k_plus_one(n, k):
    members = [str(1000 + i) for i in range(n)]
    graph = neighbourhoods(members, k, random.Random(n))
    for u, hood in graph.items():
        assert len(hood) == len(set(hood)) == k + 1 and u in hood
        assert hood == [m for m in members if m in hood]  # in the members' order
        assert all(u in graph[v] for v in hood)  # v is u's neighbour iff u is v's
    # the random order differs between sessions: another draw, another graph
    assert graph != neighbourhoods(members, k, random.Random(n + 1))


def test_zero_or_too_many_neighbours_give_the_complete_graph():
    members = [str(i) for i in range(7)]
    for k in (0, 6, 8):
        assert neighbourhoods(members, k, random.Random(0)) == {u: members for u in members}


def droppable(h: Harness, count: int) -> set[int]:
    """``count`` members whose dropping leaves every neighbourhood at least t_u = 3 of
    its 5 (the graph is random: picked once it is drawn)."""
    out: set[str] = set()
    for u in h.session.u1:
        if len(out) < count and all(len(set(hood) & (out | {u})) <= 2
                                    for hood in h.session.graph.values()):
            out.add(u)
    assert len(out) == count
    return {int(u) for u in out}


@pytest.mark.parametrize("count", [0, 2, 3])
def test_sparse_session_sums_the_survivors_with_o_k_work_per_member(count):
    h = Harness(12, neighbours=4)  # |N(u)| = 5, t_u = 3; the session's t = 8
    h.keys()
    h.shares()
    for node in h.nodes:  # keys agreed with its 4 neighbours only, not with all 11 others
        assert len(h.states[node][client.state_key(h.session.session)]["share-keys"]) == 5
    dropped = droppable(h, count)
    h.masked(skip=dropped)
    assert np.array_equal(h.unmask(), h.plain_sum([n for n in h.nodes if n not in dropped]))
    s = h.session
    for node, hood in s.graph.items():
        assert len(hood) == 5 and s.share_threshold == 3
        assert sorted(s.sealed[node]) == sorted(v for v in hood if v != node)
    assert set(s.dropped) == {str(n) for n in dropped}


def test_a_member_reveals_only_its_neighbours_shares():
    h = Harness(12, neighbours=4)
    h.keys()
    h.shares()
    h.masked(skip={h.nodes[0]})
    requests = h.requests("unmask")
    for node, content in requests.items():
        rec = content.config_records["secagg-unmask"]
        hood = h.session.graph[str(node)]
        assert set(rec["survivors"]) | set(rec["dropped"]) <= set(hood)
        assert (str(h.nodes[0]) in rec["dropped"]) == (str(h.nodes[0]) in hood)
    replies = h.answer(requests)
    for reply in replies:
        reveal = reply.content.config_records["secagg-reveal"]
        me = str(reply.metadata.src_node_id)
        assert set(reveal["b-from"]) | set(reveal["s-from"]) <= set(h.session.graph[me])
    total = h.session.receive_unmask(replies)
    assert np.array_equal(total, h.plain_sum(h.nodes[1:]))


def test_a_neighbourhood_left_below_its_threshold_aborts_without_a_sum():
    h = Harness(12, neighbours=4)
    h.keys()
    h.shares()
    # three of one member's four neighbours drop after sharing: its neighbourhood keeps
    # 2 of 5, below t_u = 3, so the member refuses to unmask and nobody can rebuild its
    # self-mask seed (nor the dropped neighbours' keys): no sum comes out
    victim = h.session.u1[0]
    neighbours = [int(v) for v in h.session.graph[victim] if v != victim][:3]
    with pytest.raises(SecAggAbort):
        h.masked(skip=set(neighbours))
        h.unmask()


def test_client_refuses_a_minority_threshold_of_its_neighbourhood():
    h = Harness(12, neighbours=4)
    h.keys()
    me = h.session.u1[0]
    rec = ConfigRecord(dict(h.session.share_records()[me]))
    assert rec["threshold"] == threshold_for(0.6, 5) == 3 and len(rec["nodes"]) == 5
    rec["threshold"] = 2  # of 5: two disjoint pairs of neighbours could each rebuild
    with pytest.raises(client.SecAggError, match="not a majority"):
        client.share(h.states[int(me)], rec, me)


@pytest.mark.parametrize("value", [-2, 1, 3])
def test_bad_neighbour_counts_are_refused(value):
    raw = {"name": "x", "cohorts": [{"arch": "mlp", "clients": 3}],
           "secure_aggregation": {"neighbours": value}}
    with pytest.raises(ConfigError, match="even number") as err:
        config_from_dict(raw)
    assert err.value.key == "secure_aggregation.neighbours"
