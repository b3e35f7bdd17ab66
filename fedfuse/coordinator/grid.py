"""Sending several groups' messages (cohorts, secure-aggregation sessions) in one batch."""

from __future__ import annotations

from flwr.app import Message
from flwr.serverapp import Grid


def exchange(grid: Grid, by_group: dict[str, list[Message]]) -> dict[str, list[Message]]:
    """Send every group's messages in one ``send_and_receive``; return the replies grouped
    as the messages were (a node belongs to one group per call)."""
    owner = {m.metadata.dst_node_id: group for group, msgs in by_group.items() for m in msgs}
    everything = [m for msgs in by_group.values() for m in msgs]
    grouped: dict[str, list[Message]] = {group: [] for group in by_group}
    if everything:
        for reply in grid.send_and_receive(everything):
            group = owner.get(reply.metadata.src_node_id)
            if group is not None:
                grouped[group].append(reply)
    return grouped
