"""The coordinator's Grid: every exchange bounded by a timeout, messages that expire with
it, and a window of messages in flight (``fedfuse.coordinator.grid``)."""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedfuse.coordinator.grid import BoundedGrid


class Engine:
    """A Grid's push/pull halves: answers each pushed message on the ``delay``-th pull
    after it, except those to node 99 and to ``silent`` nodes."""

    def __init__(self, delay=1, silent=()):
        self.queued, self.in_flight, self.most, self.pushed = {}, set(), 0, []
        self.delay, self.silent, self.pushes, self.pulls = delay, {99, *silent}, 0, 0

    def push_messages(self, messages):
        self.pushes += 1
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            m.metadata.__dict__["_message_id"] = mid
            self.pushed.append(m.metadata.dst_node_id)
            self.queued[mid] = m
            ids.append(mid)
        self.in_flight |= set(ids)
        self.most = max(self.most, len(self.in_flight))
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        self.delay -= 1
        if self.delay > 0:
            return []
        out = [Message(RecordDict(), reply_to=self.queued[i]) for i in ids
               if i in self.in_flight and self.queued[i].metadata.dst_node_id not in self.silent]
        self.in_flight -= {r.metadata.reply_to_message_id for r in out}
        return out


def test_a_bounded_grid_is_a_flower_grid():
    """Strategies and Flower's helpers take it wherever they take a Grid."""
    assert issubclass(BoundedGrid, Grid)


def test_messages_expire_when_the_wait_for_their_replies_ends(task_identity):
    """A message not picked up within the phase's timeout is dropped by the SuperLink
    (created_at + ttl), so a site that reconnects late never trains for a finished round."""
    engine = Engine(silent={7, 8})
    old = Message(RecordDict(), dst_node_id=7, message_type="train")
    old.metadata.created_at -= 30.0  # built 30 s before it is sent
    fresh = Message(RecordDict(), dst_node_id=8, message_type="train")
    before = time.time()
    BoundedGrid(engine, timeout=0.3).send_and_receive([old, fresh])
    after = time.time()
    for msg in (old, fresh):
        expires = msg.metadata.created_at + msg.metadata.ttl
        assert before + 0.3 <= expires <= after + 0.3
    start = time.monotonic()
    BoundedGrid(engine, timeout=25.0).send_and_receive([fresh], timeout=0.2)
    assert time.monotonic() - start < 2.0  # the call's own timeout wins
    assert fresh.metadata.created_at + fresh.metadata.ttl <= time.time() + 0.2


def test_without_a_window_every_message_goes_at_once_and_replies_are_polled(task_identity):
    """Deployment: all messages pushed in one call, replies pulled by the grid itself
    (not the SuperLink Grid's 3 s sleep), each reply returned once."""
    engine = Engine(delay=3)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 6)]
    start = time.monotonic()
    replies = BoundedGrid(engine, timeout=10.0).send_and_receive(msgs)
    took = time.monotonic() - start
    assert engine.most == 5 and engine.pushes == 1
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4, 5]
    assert engine.pulls >= 3 and took < 1.0  # answered on the third pull, polled fast


def test_a_window_keeps_at_most_n_messages_in_flight(task_identity):
    """With a window of 3, at most 3 messages are pushed before their replies come back;
    every answered message's reply is returned; a node that never answers holds its
    slot until the deadline, and messages not yet sent by then count as unanswered."""
    engine = Engine()
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 11)]
    replies = BoundedGrid(engine, timeout=5.0, window=3).send_and_receive(msgs)
    assert engine.most == 3 and engine.pushed == list(range(1, 11))
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(1, 11))

    engine = Engine()
    stuck = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (99, 99, 1, 2)]
    start = time.monotonic()
    replies = BoundedGrid(engine, timeout=0.5, window=2).send_and_receive(stuck)
    assert 0.5 <= time.monotonic() - start < 2.0
    assert replies == [] and engine.pushed == [99, 99]  # 1 and 2 never got a slot
