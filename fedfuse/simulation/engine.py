"""Tuning of Flower's simulation engine (flwr 1.41, ``flwr.server.superlink.fleet.vce``).

The engine hands messages from its in-memory SuperLink to the client actors in a loop
(``vce_api.add_messages_to_queue``) that sweeps every node for undelivered messages and
then waits 0.1 s. A message the ServerApp sends therefore waits 50 ms on average before a
client starts on it, once per exchange: a quarter of a round that takes two tenths
of a second. A sweep costs O(nodes × stored messages), so waiting less is worth it only
for small federations; :func:`pickup_interval` scales the wait with the node count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FLOWER_INTERVAL = 0.1
"""Flower's own wait between sweeps, in seconds."""
FULL_WAIT_NODES = 200
"""From this many nodes on, the engine keeps Flower's wait."""


def pickup_interval(num_nodes: int, configured: float | None = None) -> float:
    """The wait between sweeps: ``configured``, else ``0.1 · min(1, n / 200)`` seconds for
    ``n`` nodes (5 ms for 10 nodes, 50 ms for 100, Flower's 0.1 s from 200)."""
    if configured is not None:
        return configured
    return FLOWER_INTERVAL * min(1.0, num_nodes / FULL_WAIT_NODES)


@contextmanager
def message_pickup(interval: float) -> Iterator[None]:
    """Within this context, Flower's simulation engine sweeps for new messages every
    ``interval`` seconds instead of every 0.1 s; Flower's loop is restored on exit."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any,
                              f_stop: Any) -> None:
        """Flower's loop, with its wait as a parameter."""
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop
