"""How long Flower's simulation engine waits between its sweeps for new messages.

The engine hands messages from its in-memory SuperLink to the client actors in a loop
(``vce_api.add_messages_to_queue``) that sweeps every node for undelivered messages and
then waits 0.1 s. A message the ServerApp sends therefore waits 50 ms on average before a
client starts on it, once per exchange: a quarter of a round that takes two tenths
of a second. A sweep costs O(nodes × stored messages), so waiting less is worth it only
for small federations; :func:`pickup_interval` scales the wait with the node count, and
``fedfuse.compat.message_pickup`` runs Flower's loop with it.
"""

from __future__ import annotations

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
