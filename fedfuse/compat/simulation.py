"""Flower's simulation engine: its message pickup loop, and ``run_simulation``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def message_pickup(interval: float) -> Iterator[None]:
    """Within this context, Flower's simulation engine sweeps its in-memory SuperLink
    for new messages every ``interval`` seconds instead of every 0.1 s, asking only the
    nodes that have a message waiting; Flower's loop is restored on exit.

    Flower's sweep calls ``get_message_ins(node)`` for every node, and each call scans
    the whole message store: O(nodes × stored messages) per sweep, 10,000 nodes made
    every all-site exchange (discovery, the fusion statistics) take minutes. One read
    of the store (its ``message_ins_store`` under its ``lock``: private, checked by
    tests/test_compat.py) finds the nodes with an undelivered message, and only those
    are asked, through the same ``get_message_ins`` (which marks them delivered and
    expires stale ones as before)."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any,
                              f_stop: Any) -> None:
        """Flower's loop, with its wait as a parameter."""
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys() & waiting_nodes(state):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop


def waiting_nodes(state: Any) -> set[int]:
    """The destination nodes of the undelivered messages in an in-memory link state."""
    with state.lock:
        return {m.metadata.dst_node_id for m in state.message_ins_store.values()
                if m.metadata.delivered_at == ""}


class _DropDeprecationBanner(logging.Filter):
    """Drops Flower's ``run_simulation`` deprecation banner (fedfuse keeps the in-process
    engine on purpose; see docs/architecture.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "run_simulation" in str(record.args))


def run_simulation(server_app: Any, client_app: Any, num_supernodes: int,
                   backend_config: dict[str, Any], verbose: bool) -> None:
    """``flwr.simulation.run_simulation`` (deprecated in Flower 1.41), without its
    deprecation banner."""
    from flwr.simulation import run_simulation as flower_run_simulation

    flower = logging.getLogger("flwr")
    banner = _DropDeprecationBanner()
    flower.addFilter(banner)
    try:
        flower_run_simulation(server_app=server_app, client_app=client_app,
                              num_supernodes=num_supernodes, backend_config=backend_config,
                              verbose_logging=verbose)
    finally:
        flower.removeFilter(banner)


