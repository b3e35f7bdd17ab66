"""Discovery: wait for the sites, ask each for its architecture, example counts and
(without secure aggregation) feature sums, and keep those whose answer fits the
scenario. Under secure aggregation the feature sums are not asked for here: only their
totals are, through a secure sum (``fedfuse.coordinator.moments``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedfuse import wire
from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.records import Participant
from fedfuse.data.datasets import DataSchema
from fedfuse.wire import WireError

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
    does not fit, or is malformed, is dropped with the reason logged."""
    participants, replies = [], []
    shapes = cohort_shapes(cfg, schema)
    for reply in answers(grid, cfg, connected(grid, cfg, sites), sites):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d dropped at discovery: %s", node, reply.error.reason)
            continue
        try:
            answer = read_answer(reply)
        except WireError as exc:
            log.warning("node %d dropped at discovery: a malformed answer (%s)", node, exc)
            continue
        reason = reject_reason(node, answer, cfg, schema, sites, shapes)
        if reason:
            log.warning("node %d (%s) dropped at discovery: %s", node, answer.name, reason)
            continue
        participants.append(Participant(node, answer.name, answer.index, answer.arch,
                                        answer.num_train, answer.num_val))
        replies.append(reply)
    order = sorted(range(len(participants)), key=lambda i: participants[i].index)
    return [participants[i] for i in order], [replies[i] for i in order]


def answers(grid: Grid, cfg: FedfuseConfig, nodes: list[int],
            sites: dict[int, str] | None) -> list[Message]:
    """The replies of ``nodes`` to the discovery query. In a deployment, registered sites
    that have not answered are asked again until ``deployment.wait_for_sites`` has
    passed: a site's SuperNode may still be reconnecting (a coordinator just resumed
    finds the sites' node ids registered, and their SuperNodes in a backoff of seconds)."""
    deadline = time.monotonic() + cfg.deployment.wait_for_sites
    replies: list[Message] = []
    missing = list(nodes)
    while missing:
        ask = ConfigRecord({"moments": "secure" if cfg.secure_aggregation.enabled
                            else "plain"})
        queries = [Message(RecordDict({"discovery": ask}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in missing]
        asked = set(missing)  # the SuperLink's own error replies (expired queries) aside
        replies += [r for r in grid.send_and_receive(queries) if r.metadata.src_node_id in asked]
        answered = {r.metadata.src_node_id for r in replies}
        missing = [n for n in missing if n not in answered]
        if not missing or sites is None or time.monotonic() > deadline:
            break
        log.info("asking %d site(s) again: %s", len(missing),
                 ", ".join(sites.get(n, str(n)) for n in missing))
    return replies


@dataclass(frozen=True)
class Answer:
    """A site's answer to discovery (``fedfuse.site.app`` documents the layout)."""

    name: str
    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    index: int
    num_train: int
    num_val: int
    model_shapes: str
    """``shapes_digest`` of the model the site builds for its cohort."""
    sums: np.ndarray | None = field(default=None, compare=False)
    sumsqs: np.ndarray | None = field(default=None, compare=False)
    """The feature sums (None: not sent, as under secure aggregation)."""


def read_answer(reply: Message) -> Answer:
    """The fields of a discovery reply, each of its type (raises ``WireError``)."""
    site, metrics = wire.config(reply, "site"), wire.metrics(reply)
    sums = sumsqs = None
    if "moments" in reply.content.array_records:
        moments = wire.arrays(reply, "moments")
        sums, sumsqs = wire.as_array(moments, "sum"), wire.as_array(moments, "sumsq")
    return Answer(wire.as_str(site, "name"), wire.as_str(site, "arch"),
                  tuple(wire.as_list(site, "input-shape", int)),
                  wire.as_int(site, "num-classes"), wire.as_int(metrics, "index"),
                  wire.as_int(metrics, "num-examples"), wire.as_int(metrics, "num-val"),
                  wire.as_str(site, "model-shapes"), sums, sumsqs)


def cohort_shapes(cfg: FedfuseConfig, schema: DataSchema) -> dict[str, str]:
    """Each cohort's ``shapes_digest``, as the coordinator builds its model."""
    from fedfuse.models.registry import build_model, shapes_digest

    return {c.name: shapes_digest(build_model(c.model, schema, code=cfg.own_code,
                                              key=f"cohorts[{i}].arch"))
            for i, c in enumerate(cfg.cohorts)}


def max_site_examples(cfg: FedfuseConfig) -> int:
    """The most training examples one site may claim: an equal share of the 64-bit ring
    of secure aggregation, floor(2^63 / (2^bits * sites)), so that no claim can make a
    cohort's sums overflow (about 5 * 10^10 records for 10 sites at 24 bits)."""
    sites = max(1, len(cfg.site_names) or cfg.num_clients)
    return (1 << 63) // ((1 << cfg.secure_aggregation.quantization_bits) * sites)


def reject_reason(node: int, answer: Answer, cfg: FedfuseConfig, schema: DataSchema,
                  sites: dict[int, str] | None, shapes: dict[str, str]) -> str | None:
    """Why a node's discovery answer does not fit, or None: a name other than its key's,
    a cohort other than its own, data of another shape or class count, a model whose
    parameter shapes differ from the coordinator's (``shapes``: each cohort's
    ``shapes_digest``; another version of a user factory), an example count out of
    range, or feature moments that no data could have."""
    if sites is not None and sites.get(node) != answer.name:
        return (f"it calls itself {answer.name!r} but its key is registered as "
                f"{sites.get(node)!r}")
    expected = expected_arch(cfg, answer, sites is not None)
    if answer.arch != expected:
        return (f"it trains cohort {answer.arch!r}, not its own "
                f"({expected or 'no cohort lists it'})")
    if answer.input_shape != tuple(schema.input_shape):
        return (f"input shape {answer.input_shape} differs from the "
                f"coordinator's {tuple(schema.input_shape)}")
    if answer.num_classes != schema.num_classes:
        return f"{answer.num_classes} classes, the coordinator has {schema.num_classes}"
    if answer.model_shapes != shapes[answer.arch]:
        return (f"its model of cohort {answer.arch!r} has other parameter shapes than the "
                "coordinator's (is the same version of the model's code installed at the "
                "site?)")
    cap = max_site_examples(cfg)
    if not (1 <= answer.num_train <= cap and 0 <= answer.num_val <= cap):
        return (f"{answer.num_train} training and {answer.num_val} validation examples; "
                f"a site may claim 1..{cap}")
    if cfg.secure_aggregation.enabled:
        return None  # its feature sums come in a secure sum, checked as a total
    return moments_reason(answer, tuple(schema.input_shape))


def expected_arch(cfg: FedfuseConfig, answer: Answer, deployed: bool) -> str | None:
    """The architecture of the cohort a site belongs to: the cohort listing its name
    (deployment) or the one its partition id falls in (simulation)."""
    if deployed:
        return next((c.name for c in cfg.cohorts if answer.name in (c.sites or [])), None)
    try:
        return cfg.cohort_of(answer.index).name
    except ValueError:
        return None


def moments_reason(answer: Answer, shape: tuple[int, ...]) -> str | None:
    """Why a site's feature moments cannot be real, or None: they must have the inputs'
    shape, be finite, and satisfy sum x^2 >= (sum x)^2 / n (Cauchy-Schwarz: a variance
    is not negative), up to rounding."""
    s, q, n = answer.sums, answer.sumsqs, answer.num_train
    if s is None or q is None:
        return ("no feature sums (a site whose policy requires secure aggregation sends "
                "them only in a secure sum)")
    if s.shape != shape or q.shape != shape:
        return f"feature moments of shape {s.shape} and {q.shape}, the inputs are {shape}"
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(q))):
        return "feature moments that are not finite"
    if np.any(q < s * s / n - 1e-6 * (1.0 + np.abs(q))):
        return "feature moments with a negative variance"
    return None
