"""The coordinator's Grid: a bounded wait for every exchange, a sliding window of
messages in simulation, and several groups' messages (cohorts, secure-aggregation
sessions) sent as one batch."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedfuse.strategies import GridView


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


class BoundedGrid(GridView):
    """A Grid whose ``send_and_receive`` waits at most ``timeout`` seconds unless told
    otherwise: a client that never answers counts as failed instead of stalling the run.
    Each message expires when the wait ends (its TTL), so a site that connects later is
    not handed work for a phase that is over (training it would spend ε for nothing).

    Replies are pulled by this Grid itself (the public ``push_messages`` /
    ``pull_messages``): every ``POLL`` seconds within a window (simulation) instead of
    the in-memory Grid's 0.1 s, else (deployment) every ``DEPLOYED_POLL`` seconds
    instead of the SuperLink Grid's 3 s. With ``window`` > 0 (simulation), at most that
    many messages are in the engine at once: the next one is pushed as soon as a reply
    comes back (see ``SimulationConfig.max_in_flight``); with 0 all are pushed at once.
    """

    POLL = 0.005
    """Seconds between pulls for replies in simulation (an in-memory store)."""
    DEPLOYED_POLL = 0.02
    """Seconds between pulls without a window (in deployment each pull is a request to
    the SuperLink)."""

    def __init__(self, grid: Grid, timeout: float, window: int = 0) -> None:
        super().__init__(grid)
        self._timeout = timeout
        self._window = window

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        limit = timeout or self._timeout
        now = time.time()
        batch = list(messages)
        for msg in batch:
            msg.metadata.ttl = now - msg.metadata.created_at + limit
        return self._windowed(batch, time.monotonic() + limit)

    def _windowed(self, batch: list[Message], deadline: float) -> list[Message]:
        """Push up to ``window`` messages (all with no window), and one more for every
        reply pulled, until every message is answered or ``deadline`` passes (the unsent
        ones then count as unanswered, like messages that timed out)."""
        window = self._window or len(batch)
        poll = self.POLL if self._window else self.DEPLOYED_POLL
        pending = batch[::-1]
        in_flight: set[str] = set()
        replies: list[Message] = []
        while (pending or in_flight) and time.monotonic() < deadline:
            room = window - len(in_flight)
            if room > 0 and pending:
                in_flight.update(self._base.push_messages(
                    [pending.pop() for _ in range(min(room, len(pending)))]))
            pulled = list(self._base.pull_messages(in_flight))
            replies += pulled
            in_flight -= {r.metadata.reply_to_message_id for r in pulled}
            if not pulled:
                time.sleep(poll)
        return replies
