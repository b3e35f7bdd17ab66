"""Discovery: wait for the sites, ask each for its architecture, example counts and
feature sums, and keep those whose answer fits the scenario."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.records import Participant
from fedfuse.data.datasets import DataSchema

log = logging.getLogger("fedfuse.coordinator")


def connected(grid: Grid, cfg: FedfuseConfig, sites: dict[int, str] | None) -> list[int]:
    """The nodes to run with: all expected ones, or those connected once
    ``deployment.wait_for_sites`` has passed (``sites``: a deployment's registered node
    ids -> site names, to name the missing)."""
    expected = cfg.num_clients
    deadline = time.monotonic() + cfg.deployment.wait_for_sites
    waited = 0
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() >= deadline:
            missing = ""
            if sites is not None:
                absent = sorted(n for i, n in sites.items() if i not in node_ids)
                missing = f" (missing: {', '.join(absent)})"
            log.warning("%d of %d sites connected after %.0f s%s; starting with them",
                        len(node_ids), expected, cfg.deployment.wait_for_sites, missing)
            break
        if waited % 10 == 0:
            log.info("waiting for clients: %d of %d connected", len(node_ids), expected)
        waited += 1
        time.sleep(1.0)
    return node_ids


def discover(grid: Grid, cfg: FedfuseConfig, schema: DataSchema,
             sites: dict[int, str] | None = None) -> tuple[list[Participant], list[Message]]:
    """Every connected node's answer to the discovery query, as participants (in site
    order) and their replies (which carry the feature moments); a node whose answer
    does not fit is dropped with the reason logged."""
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
               for n in connected(grid, cfg, sites)]
    participants, replies = [], []
    known = {c.arch for c in cfg.cohorts}
    for reply in grid.send_and_receive(queries):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d dropped at discovery: %s", node, reply.error.reason)
            continue
        site, metrics = reply.content["site"], reply.content["metrics"]
        reason = reject_reason(node, site, known, schema, sites)
        if reason:
            log.warning("node %d (%s) dropped at discovery: %s", node, site["name"], reason)
            continue
        participants.append(Participant(node, str(site["name"]), int(metrics["index"]),
                                        str(site["arch"]), int(metrics["num-examples"]),
                                        int(metrics["num-val"])))
        replies.append(reply)
    order = sorted(range(len(participants)), key=lambda i: participants[i].index)
    return [participants[i] for i in order], [replies[i] for i in order]


def reject_reason(node: int, site: ConfigRecord, known: set[str], schema: DataSchema,
                  sites: dict[int, str] | None) -> str | None:
    """Why a node's discovery answer does not fit, or None: a name other than its key's,
    an architecture no cohort trains, or data of another shape or class count."""
    if sites is not None and sites.get(node) != site["name"]:
        return (f"it calls itself {site['name']!r} but its key is registered as "
                f"{sites.get(node)!r}")
    if site["arch"] not in known:
        return f"architecture {site['arch']!r} is not one of the scenario's cohorts"
    if tuple(site["input-shape"]) != tuple(schema.input_shape):
        return (f"input shape {tuple(site['input-shape'])} differs from the "
                f"coordinator's {tuple(schema.input_shape)}")
    if int(site["num-classes"]) != schema.num_classes:
        return f"{site['num-classes']} classes, the coordinator has {schema.num_classes}"
    return None
