"""The fedfuse ServerApp: one FedAvg strategy per cohort, all cohorts trained concurrently.

``Strategy.start`` drives a single model, so the main loop below calls each cohort
strategy's hooks itself: ``configure_train`` -> one ``grid.send_and_receive`` for all
cohorts -> ``aggregate_train`` per cohort; likewise for federated evaluation; then the
coordinator evaluates every cohort model on its held-out test split.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      RecordDict)
from flwr.serverapp import Grid, ServerApp

from fedfuse.coordinator.checkpoint import Checkpoint, write_checkpoint
from fedfuse.config import FedfuseConfig
from fedfuse.data.datasets import Dataset, split_transfer
from fedfuse.errors import FedfuseError
from fedfuse.coordinator.grid import exchange
from fedfuse.models.device import device_label, resolve_device
from fedfuse.models.registry import build_model, get_architecture, load_model, set_standardization
from fedfuse.privacy.ledger import PrivacyLedger
from fedfuse.privacy.budget import PrivacyRequest
from fedfuse.secagg import Quantizer, SecAggSession, decode_sum
from fedfuse.secagg.encoding import check_ring, decode_fixed, payload_length
from fedfuse.coordinator.sessions import (aggregate_reply, close_sessions, collect_masked,
                                   open_sessions, sizes, with_session)
from fedfuse.data.stats import pooled_mean_std
from fedfuse.fusion.distill import distill
from fedfuse.fusion.result import FusionResult, ScoredModel
from fedfuse.fusion.soft_vote import brier_score, fuse_proba, member_briers
from fedfuse.coordinator.gates import gate_updates
from fedfuse.fusion.stacking import HEAD, StackedModel, initial_head, load_head
from fedfuse.strategies import CohortStrategy, cohort_strategy
from fedfuse.models.training import evaluate, predict_proba
from fedfuse.privacy.client_level import SAMPLE_RATE, cohort_ledger, release

log = logging.getLogger("fedfuse.server")


@dataclass(frozen=True)
class Member:
    """A client as the coordinator knows it after discovery (no data, only counts)."""

    node_id: int
    name: str
    index: int
    arch: str
    num_train: int
    num_val: int


@dataclass
class Cohort:
    arch: str
    strategy: CohortStrategy
    arrays: ArrayRecord
    lr: float
    members: list[Member] = field(default_factory=list)
    extra: dict[str, ArrayRecord | ConfigRecord] = field(default_factory=dict)
    """Records sent with every train message besides the model (the stacking head's
    members)."""
    clip_range: float | None = None
    """Secure aggregation's per-coordinate clip for this group's updates (None: the
    configured ``secure_aggregation.clip_range``)."""
    ledger: PrivacyLedger | None = None
    """The cohort's client-level privacy account (``privacy.mode = "user"``)."""


@dataclass
class FederationResult:
    cohorts: dict[str, Cohort]
    members: list[Member]
    history: list[dict[str, Any]]
    fusion: FusionResult | None = None
    privacy: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Each site's last privacy report, by node id (empty without DP)."""
    secure_sums: int = 0
    """Cohort rounds whose update was aggregated by secure aggregation."""
    device: str = "cpu"
    """Where the coordinator computed (``fedfuse.device.device_label``)."""


class RoundListener(Protocol):
    """Receives progress from the coordinator (the run directory, the progress display)."""

    def on_start(self, members: list[Member], rounds: int) -> None: ...

    def on_round(self, record: dict[str, Any]) -> None: ...

    def on_finish(self, result: FederationResult) -> None: ...


def build_server_app(cfg: FedfuseConfig, test: Dataset, listener: RoundListener,
                     checkpoints: Path | None = None,
                     resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp running ``cfg``'s cohorts and evaluating them on ``test``; with
    ``checkpoints`` it saves its state there after every round, and with ``resume`` it
    continues after that checkpoint's round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        Coordinator(cfg, test, listener, checkpoints=checkpoints,
                    max_in_flight=cfg.simulation.max_in_flight).run(grid, resume)

    return app


class Coordinator:
    def __init__(self, cfg: FedfuseConfig, test: Dataset, listener: RoundListener,
                 sites: dict[int, str] | None = None, checkpoints: Path | None = None,
                 max_in_flight: int = 0) -> None:
        self.cfg = cfg
        self.test, self.transfer = split_transfer(test, cfg.fusion.unlabeled_fraction, cfg.seed)
        """``test`` is the coordinator's held-out data: its test split, and with
        ``fusion.unlabeled_fraction`` the inputs it distils on."""
        self.listener = listener
        self.checkpoints = checkpoints
        """Where the state after every round is saved (``fedfuse.checkpoint``)."""
        self.sites = sites
        """Deployment: the authenticated node id of each registered site -> its name. A
        node must answer discovery with the name its key was registered under."""
        self.privacy: dict[int, dict[str, Any]] = {}
        """The latest privacy report of each site (node id -> figures)."""
        self.secure_sums = 0
        """Cohort rounds aggregated by secure aggregation."""
        self.max_in_flight = max_in_flight
        """Simulation: the most messages handed to the engine at once (0: no limit)."""
        self.device = resolve_device(cfg.device)
        """Where the coordinator evaluates, fuses and distils."""
        self.noise_key = cfg.seed if sites is None else secrets.randbits(63)
        """Seeds the coordinator's DP noise (``privacy.mode = "user"``): the scenario seed
        in simulation (reruns are identical), a fresh secret in deployment."""

    # -- discovery ----------------------------------------------------------------------

    def connected(self, grid: Grid) -> list[int]:
        """The nodes to run with: all expected ones, or those connected once
        ``deployment.wait_for_sites`` has passed."""
        expected = self.cfg.num_clients
        deadline = time.monotonic() + self.cfg.deployment.wait_for_sites
        waited = 0
        while len(node_ids := sorted(grid.get_node_ids())) < expected:
            if time.monotonic() >= deadline:
                missing = ""
                if self.sites is not None:
                    absent = sorted(n for i, n in self.sites.items() if i not in node_ids)
                    missing = f" (missing: {', '.join(absent)})"
                log.warning("%d of %d sites connected after %.0f s%s; starting with them",
                            len(node_ids), expected, self.cfg.deployment.wait_for_sites,
                            missing)
                break
            if waited % 10 == 0:
                log.info("waiting for clients: %d of %d connected", len(node_ids), expected)
            waited += 1
            time.sleep(1.0)
        return node_ids

    def discover(self, grid: Grid) -> tuple[list[Member], list[Message]]:
        """Ask every node for its architecture, example counts and feature sums."""
        node_ids = self.connected(grid)
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                   for n in node_ids]
        members, replies = [], []
        known = {c.arch for c in self.cfg.cohorts}
        for reply in grid.send_and_receive(queries):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d dropped at discovery: %s", node, reply.error.reason)
                continue
            site, metrics = reply.content["site"], reply.content["metrics"]
            reason = self._reject_reason(node, site, known)
            if reason:
                log.warning("node %d (%s) dropped at discovery: %s", node, site["name"], reason)
                continue
            members.append(Member(node, str(site["name"]), int(metrics["index"]),
                                  str(site["arch"]), int(metrics["num-examples"]),
                                  int(metrics["num-val"])))
            replies.append(reply)
        members.sort(key=lambda m: m.index)
        return members, replies

    def _reject_reason(self, node: int, site: ConfigRecord, known: set[str]) -> str | None:
        schema = self.test.schema
        if self.sites is not None and self.sites.get(node) != site["name"]:
            return (f"it calls itself {site['name']!r} but its key is registered as "
                    f"{self.sites.get(node)!r}")
        if site["arch"] not in known:
            return f"architecture {site['arch']!r} is not one of the scenario's cohorts"
        if tuple(site["input-shape"]) != tuple(schema.input_shape):
            return (f"input shape {tuple(site['input-shape'])} differs from the "
                    f"coordinator's {tuple(schema.input_shape)}")
        if int(site["num-classes"]) != schema.num_classes:
            return f"{site['num-classes']} classes, the coordinator has {schema.num_classes}"
        return None

    def initial_cohorts(self, members: list[Member], replies: list[Message]) -> dict[str, Cohort]:
        moments = [r.content["moments"] for r in replies]
        mean, std = pooled_mean_std(
            [int(r.content["metrics"]["num-examples"]) for r in replies],
            [m["sum"].numpy() for m in moments], [m["sumsq"].numpy() for m in moments])
        sim = self.cfg.simulation
        if self.cfg.secure_aggregation.enabled:
            check_ring(self.cfg.secure_aggregation.quantization_bits,
                       sum(m.num_train for m in members))
        cohorts: dict[str, Cohort] = {}
        for i, cc in enumerate(self.cfg.cohorts):
            mine = [m for m in members if m.arch == cc.arch]
            if not mine:
                raise FedfuseError(f"cohort {cc.arch!r} has no connected client")
            model = build_model(cc.arch, self.test.schema, seed=self.cfg.seed * 1000 + i)
            set_standardization(model, mean, std)
            r = self.cfg.robustness
            strategy = cohort_strategy(r.aggregation, cc.arch, [m.node_id for m in mine],
                                       trim_fraction=r.trim_fraction,
                                       max_malicious=r.max_malicious,
                                       multikrum_select=r.multikrum_select,
                                       server_momentum=self.cfg.train.server_momentum,
                                       server_lr=self.cfg.train.server_lr,
                                       fraction_train=sim.fraction_train,
                                       fraction_evaluate=sim.fraction_evaluate)
            lr = cc.lr if cc.lr is not None else get_architecture(cc.arch).lr(self.local_dp)
            cohorts[cc.arch] = Cohort(cc.arch, strategy, ArrayRecord(model.state_dict()), lr,
                                      mine)
            if self.user_dp:
                p = self.cfg.privacy
                cohorts[cc.arch].ledger = cohort_ledger(
                    p.accountant, p.delta, p.budget, p.target_epsilon, p.noise_multiplier,
                    len(mine), self.cfg.rounds)
        return cohorts

    # -- rounds -------------------------------------------------------------------------

    @property
    def local_dp(self) -> bool:
        """Record-level DP-SGD at the sites (``privacy.mode = "sample"``)."""
        return self.cfg.privacy.mode == "sample"

    @property
    def user_dp(self) -> bool:
        """Client-level DP, noise added by the coordinator (``privacy.mode = "user"``)."""
        return self.cfg.privacy.mode == "user"

    def weight(self, member: Member) -> int:
        """A site's FedAvg weight: its training examples, or 1 under client-level DP."""
        return 1 if self.user_dp else member.num_train

    def train_config(self, cohort: Cohort, server_round: int) -> ConfigRecord:
        t = self.cfg.train.resolved(self.local_dp)
        items = {"lr": cohort.lr, "local-epochs": t.local_epochs, "batch-size": t.batch_size,
                 "momentum": t.momentum, "weight-decay": t.weight_decay,
                 "seed": self.cfg.seed * 100_003 + server_round}
        if self.local_dp:
            p = self.cfg.privacy
            items.update(PrivacyRequest(
                mode=p.mode, accountant=p.accountant, max_grad_norm=p.max_grad_norm,
                planned_rounds=self.planned_rounds, target_epsilon=p.target_epsilon,
                noise_multiplier=p.noise_multiplier, budget=p.budget, delta=p.delta,
            ).to_config())
        elif self.user_dp:
            items.update({"dp-mode": "user", "dp-clipping-norm": self.cfg.privacy.clipping_norm})
        return ConfigRecord(items)

    @property
    def planned_rounds(self) -> int:
        """Private rounds each site plans its noise for: training, then stacking."""
        f = self.cfg.fusion
        return self.cfg.rounds + (f.stacking_rounds if f.stacks else 0)

    def collect_privacy(self, cohort: Cohort, replies: list[Message],
                        server_round: int) -> list[Message]:
        """Record each site's privacy report; drop (and stop sampling) sites whose
        budget is exhausted. Returns the replies that carry an update."""
        names = {m.node_id: m.name for m in cohort.members}
        updates = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error() and "privacy" in reply.content:
                self.privacy[node] = dict(reply.content["privacy"])
                if self.privacy[node]["status"] == "budget-exhausted":
                    cohort.strategy.retire(node)
                    log.warning("round %d: %s stops training: its next round would exceed "
                                "its privacy budget (ε %.3f of %.3f spent)", server_round,
                                names.get(node, node), self.privacy[node]["epsilon"],
                                self.privacy[node]["budget"])
                    continue
            updates.append(reply)
        return updates

    def train_round(self, grid: Grid, cohorts: dict[str, Cohort], server_round: int,
                    record: dict[str, Any]) -> None:
        """One round of training in every cohort; with secure aggregation the coordinator
        sees only each cohort's masked sum (``fedfuse.secagg``)."""
        secure = self.cfg.secure_aggregation
        for arch, cohort in cohorts.items():
            if secure.enabled and len(cohort.strategy.trainers) == 1:
                log.warning("round %d: cohort %s has one site left that may train; secure "
                            "aggregation cannot hide a lone update, so the cohort stops "
                            "training", server_round, arch)
                cohort.strategy.retire(cohort.strategy.trainers[0])
            if cohort.ledger is not None:
                self.check_cohort_budget(cohort, server_round)
        train_msgs = {a: list(c.strategy.configure_train(
            server_round, c.arrays, self.train_config(c, server_round), grid))
            for a, c in cohorts.items()}
        for arch, msgs in train_msgs.items():
            for msg in msgs:
                for key, rec in cohorts[arch].extra.items():
                    msg.content[key] = rec
        sessions: dict[str, SecAggSession] = {}
        failed: dict[str, str] = {}
        if secure.enabled:
            sessions, failed = open_sessions(
                grid, {a: [m.metadata.dst_node_id for m in msgs] for a, msgs in train_msgs.items()},
                secure.threshold, {a: payload_length(sizes(c.arrays)) for a, c in cohorts.items()},
                tag=f"round {server_round}")
            train_msgs = {a: with_session(msgs, sessions.get(a), **{
                "clip-range": self.clip_range(cohorts[a]),
                "quantization-bits": secure.quantization_bits})
                          for a, msgs in train_msgs.items()}
        train_replies = exchange(grid, train_msgs)
        updates: dict[str, list[Message]] = {}
        for arch, cohort in cohorts.items():
            updates[arch] = self.collect_privacy(cohort, train_replies[arch], server_round)
            entry = record["cohorts"].setdefault(arch, {})
            refused = len(train_replies[arch]) - len(updates[arch])
            entry.update(_counts(train_msgs[arch], updates[arch], "train", refused))
            entry["budget_exhausted"] = refused
            if self.privacy:
                entry["max_epsilon"] = max(
                    (self.privacy[m.node_id]["epsilon"] for m in cohort.members
                     if m.node_id in self.privacy), default=0.0)
        if secure.enabled:
            updates = self.unmask(grid, cohorts, sessions, failed, train_msgs, train_replies,
                                  updates, record)
        else:
            updates = self.gate(cohorts, updates, record)
        for arch, cohort in cohorts.items():
            entry = record["cohorts"][arch]
            contributors = (entry.get("secagg_clients", 0) if secure.enabled
                            else sum(not u.has_error() for u in updates[arch]))
            if 0 < contributors < self.cfg.robustness.min_clients:
                log.warning("round %d: cohort %s has %d valid update(s), fewer than "
                            "robustness.min_clients = %d; keeping its model", server_round,
                            arch, contributors, self.cfg.robustness.min_clients)
                entry["below_min_clients"] = True
                continue
            if cohort.ledger is not None:
                updates[arch] = self.private_release(cohort, updates[arch], train_msgs[arch],
                                                     server_round, entry)
            arrays, metrics = cohort.strategy.aggregate_train(server_round, updates[arch])
            if arrays is None:
                log.warning("round %d: cohort %s got no valid update; keeping its model",
                            server_round, arch)
            else:
                cohort.arrays = arrays
            record["cohorts"][arch].update(_renamed(metrics))

    def check_cohort_budget(self, cohort: Cohort, server_round: int) -> None:
        """Client-level DP: stop a cohort whose next release would take ε over budget."""
        ledger = cohort.ledger
        assert ledger is not None and ledger.noise_multiplier is not None
        if not cohort.strategy.trainers or not ledger.would_exceed(
                ledger.noise_multiplier, SAMPLE_RATE, 1):
            return
        log.warning("round %d: cohort %s stops training: its next release would exceed "
                    "the privacy budget (ε %.3f of %.3f spent)", server_round, cohort.arch,
                    ledger.epsilon(), ledger.budget)
        for node in list(cohort.strategy.trainers):
            cohort.strategy.retire(node)
        self.report_cohort_privacy(cohort, "budget-exhausted")

    def private_release(self, cohort: Cohort, updates: list[Message], sent: list[Message],
                        server_round: int, entry: dict[str, Any]) -> list[Message]:
        """Client-level DP: the cohort's replies as one noisy mean (``fedfuse.user_dp``),
        charged to its ledger and reported for every member."""
        assert cohort.ledger is not None
        index = [c.arch for c in self.cfg.cohorts].index(cohort.arch)
        rng = np.random.default_rng([self.noise_key, server_round, index])
        released = release(cohort.arrays, updates, sent, cohort.ledger,
                           self.cfg.privacy.clipping_norm, rng,
                           secure=self.cfg.secure_aggregation.enabled)
        if released is None:
            return []
        self.report_cohort_privacy(cohort, "trained")
        entry["max_epsilon"] = self.privacy[cohort.members[0].node_id]["epsilon"]
        return [released]

    def report_cohort_privacy(self, cohort: Cohort, status: str) -> None:
        """Every member's privacy figures under client-level DP: its cohort's account."""
        ledger = cohort.ledger
        assert ledger is not None
        figures = {"status": status, "epsilon": ledger.epsilon(), "delta": ledger.delta,
                   "noise-multiplier": float(ledger.noise_multiplier or 0.0),
                   "sample-rate": SAMPLE_RATE, "steps": ledger.steps,
                   "accountant": ledger.accountant,
                   "budget": -1.0 if ledger.budget is None else float(ledger.budget)}
        for m in cohort.members:
            self.privacy[m.node_id] = dict(figures)

    def gate(self, cohorts: dict[str, Cohort], updates: dict[str, list[Message]],
             record: dict[str, Any]) -> dict[str, list[Message]]:
        """Plaintext updates through ``fedfuse.gates``; a rejected client is dropped from
        the round with its reason logged, and counted in ``rejected``."""
        gated = {}
        for arch, cohort in cohorts.items():
            names = {m.node_id: m.name for m in cohort.members}
            gated[arch], rejected = gate_updates(
                cohort.arrays, updates[arch], {m.node_id: m.num_train for m in cohort.members},
                self.cfg.robustness.max_update_norm)
            record["cohorts"][arch]["rejected"] = len(rejected)
            for r in rejected:
                log.warning("round %s: cohort %s: update of %s rejected: %s", record["round"],
                            arch, names.get(r.node_id, r.node_id), r.reason)
        return gated

    def unmask(self, grid: Grid, cohorts: dict[str, Cohort], sessions: dict[str, SecAggSession],
               failed: dict[str, str], train_msgs: dict[str, list[Message]],
               train_replies: dict[str, list[Message]], updates: dict[str, list[Message]],
               record: dict[str, Any]) -> dict[str, list[Message]]:
        """Stages 3-4 of secure aggregation: each cohort's sum of masked vectors, unmasked
        and decoded into one FedAvg update carrying the cohort's total example count (as
        Flower's SecAgg+ workflow hands its strategy a single aggregated result)."""
        declined = {a: {r.metadata.src_node_id for r in train_replies[a]}
                    - {r.metadata.src_node_id for r in updates[a]} for a in cohorts}
        collect_masked(sessions, failed, train_replies, declined)
        sums = close_sessions(grid, sessions, failed)
        secure_updates: dict[str, list[Message]] = {}
        for arch, cohort in cohorts.items():
            entry = record["cohorts"][arch]
            entry["secagg_failed"] = arch in failed
            secure_updates[arch] = []
            if arch not in sums:
                continue
            session = sessions[arch]
            entry["secagg_clients"] = len(session.u3)
            entry["secagg_dropped"] = len(session.dropped)
            expected = sum(self.weight(m) for m in cohort.members if str(m.node_id) in session.u3)
            try:
                total = decode_sum(sums[arch], [tuple(a.shape) for a in cohort.arrays.values()],
                                   self.quantizer(cohort))
                if total.num_examples != expected:
                    raise ValueError(f"it counts {total.num_examples} training examples, the "
                                     f"{len(session.u3)} clients in it reported {expected}")
            except ValueError as exc:
                log.warning("round %s: cohort %s: the secure sum is rejected (%s): a client "
                            "sent a dishonest or malformed vector; the cohort keeps its model",
                            record["round"], arch, exc)
                entry["secagg_failed"] = True
                continue
            entry["secagg_clipped"] = total.clipped
            if total.clipped:
                log.warning("cohort %s: %d update coordinates exceeded "
                            "secure_aggregation.clip_range and were clipped", arch,
                            total.clipped)
            like = next(m for m in train_msgs[arch] if str(m.metadata.dst_node_id) in session.u3)
            secure_updates[arch] = [aggregate_reply(cohort.arrays, total, like)]
            self.secure_sums += 1
        return secure_updates

    def clip_range(self, cohort: Cohort) -> float:
        return cohort.clip_range or self.cfg.secure_aggregation.clip_range

    def quantizer(self, cohort: Cohort) -> Quantizer:
        return Quantizer(self.clip_range(cohort), self.cfg.secure_aggregation.quantization_bits)

    def run(self, grid: Grid, resume: Checkpoint | None = None) -> FederationResult:
        random.seed(self.cfg.seed)  # flwr's FedAvg samples nodes with the `random` module
        grid = BoundedGrid(grid, self.cfg.round_timeout, self.max_in_flight)
        members, replies = self.discover(grid)
        if not members:
            raise FedfuseError("no client answered the discovery query")
        cohorts = self.initial_cohorts(members, replies)
        self.listener.on_start(members, self.cfg.rounds)
        history: list[dict[str, Any]] = []
        first = 1
        if resume is not None:
            history = self.restore(resume, cohorts, members)
            first = resume.round + 1
            log.info("resuming after round %d of %d", resume.round, self.cfg.rounds)
        for server_round in range(first, self.cfg.rounds + 1):
            if not any(c.strategy.trainers for c in cohorts.values()):
                log.warning("every site has spent its privacy budget; the run stops after "
                            "round %d of %d", server_round - 1, self.cfg.rounds)
                break
            start = time.perf_counter()
            record: dict[str, Any] = {"round": server_round, "cohorts": {}}
            self.train_round(grid, cohorts, server_round, record)
            eval_msgs = {a: list(c.strategy.configure_evaluate(
                server_round, c.arrays, ConfigRecord(), grid)) for a, c in cohorts.items()}
            eval_replies = exchange(grid, eval_msgs)
            for arch, cohort in cohorts.items():
                metrics = cohort.strategy.aggregate_evaluate(server_round, eval_replies[arch])
                record["cohorts"][arch].update(_renamed(metrics))
                record["cohorts"][arch].update(self.central_evaluation(cohort))
            record["wall_seconds"] = round(time.perf_counter() - start, 4)
            history.append(record)
            if self.checkpoints is not None:
                write_checkpoint(self.checkpoints,
                                 self.snapshot(server_round, cohorts, members, history))
            self.listener.on_round(record)
        result = FederationResult(cohorts, members, history, self.fuse(grid, cohorts, members),
                                  dict(self.privacy), self.secure_sums,
                                  device_label(self.device))
        self.listener.on_finish(result)
        return result

    def snapshot(self, server_round: int, cohorts: dict[str, Cohort], members: list[Member],
                 history: list[dict[str, Any]]) -> Checkpoint:
        """Everything the run needs to continue after ``server_round``, sites by name
        (node ids change when a federation restarts)."""
        names = {m.node_id: m.name for m in members}
        return Checkpoint(
            round=server_round,
            cohorts={a: {k: v.numpy() for k, v in c.arrays.items()} for a, c in cohorts.items()},
            strategies={a: c.strategy.state_arrays() for a, c in cohorts.items()},
            history=history,
            privacy={names[n]: r for n, r in self.privacy.items() if n in names},
            retired={a: [names[n] for n in c.strategy.members if n not in c.strategy.trainers]
                     for a, c in cohorts.items()},
            secure_sums=self.secure_sums, random_state=random.getstate(),
            ledgers={a: c.ledger.to_dict() for a, c in cohorts.items() if c.ledger is not None})

    def restore(self, ckpt: Checkpoint, cohorts: dict[str, Cohort],
                members: list[Member]) -> list[dict[str, Any]]:
        """Put ``ckpt``'s state in place of a fresh run's; returns its history."""
        if set(ckpt.cohorts) != set(cohorts):
            raise FedfuseError(f"the checkpoint holds cohorts {sorted(ckpt.cohorts)}, the "
                               f"scenario has {sorted(cohorts)}")
        ids = {m.name: m.node_id for m in members}
        for arch, cohort in cohorts.items():
            cohort.arrays = ArrayRecord({k: Array(v) for k, v in ckpt.cohorts[arch].items()})
            cohort.strategy.restore_state(ckpt.strategies.get(arch, {}), cohort.arrays)
            for name in ckpt.retired.get(arch, []):
                if name in ids:
                    cohort.strategy.retire(ids[name])
            if cohort.ledger is not None and arch in ckpt.ledgers:
                cohort.ledger = PrivacyLedger.from_dict(ckpt.ledgers[arch])
        self.privacy = {ids[name]: r for name, r in ckpt.privacy.items() if name in ids}
        self.secure_sums = ckpt.secure_sums
        random.setstate(ckpt.random_state)
        return list(ckpt.history)

    def cohort_model(self, cohort: Cohort) -> torch.nn.Module:
        return load_model(cohort.arch, self.test.schema,
                          cohort.arrays.to_torch_state_dict()).to(self.device)

    def central_evaluation(self, cohort: Cohort) -> dict[str, float]:
        res = evaluate(self.cohort_model(cohort), self.test.X, self.test.y)
        return {"test_loss": res.loss, "test_accuracy": res.accuracy}

    # -- fusion ---------------------------------------------------------------------------

    def fuse(self, grid: Grid, cohorts: dict[str, Cohort],
             members: list[Member]) -> FusionResult | None:
        """Every site scores every cohort model on its validation split and returns only
        the Brier statistics (A, b, N); their sums give the soft-vote weights. With
        ``fusion.stacking_rounds``, a stacking head is trained by FedAvg and, with
        transfer data, a student is distilled from the soft vote; both are scored the
        same way and ``fusion.method`` picks the predictor to serve."""
        archs = list(cohorts)
        stats = self.validation_statistics(grid, {a: cohorts[a].arrays for a in archs},
                                           members)
        if stats is None:
            log.warning("fusion skipped: no validation statistics came back")
            return None
        A, b, n, sites = stats
        probas = [predict_proba(self.cohort_model(cohorts[a]), self.test.X) for a in archs]
        fusion = FusionResult.fit(archs, A, b, n, sites, probas, self.test.y)
        log.info("fusion weights %s from %d sites (%d validation examples); test accuracy %.4f",
                 {a: round(float(w), 3) for a, w in zip(archs, fusion.weights)}, fusion.sites,
                 n, fusion.test_accuracy)
        requested = self.cfg.fusion.method
        makers = {"stack": (self.cfg.fusion.stacks, self.stacked_head),
                  "student": (self.transfer is not None and requested in ("auto", "distill"),
                              self.distilled_student)}
        for key, (wanted, make) in makers.items():
            made = make(grid, cohorts, members, fusion) if wanted else None
            if wanted and made is None:
                log.warning("the %s was not scored by any site", key)
            if made is not None:
                fusion = fusion.with_candidates(requested, **{key: made})
                log.info("%s (%s): validation Brier %.4f (soft vote %.4f), test accuracy "
                         "%.4f", key, made.arch, made.val_brier, fusion.val_brier,
                         made.test_accuracy)
        fusion = fusion.with_candidates(requested)
        log.info("serving %s", fusion.method)
        return fusion

    def stacked_head(self, grid: Grid, cohorts: dict[str, Cohort], members: list[Member],
                     fusion: FusionResult) -> ScoredModel | None:
        """Federated stacking (``fedfuse.stacking``): a head over the members'
        probabilities, started at the soft vote, trained for ``fusion.stacking_rounds``
        FedAvg rounds over every site (secure aggregation and DP-SGD as for the
        cohorts), then scored by the sites like a member."""
        cfg = self.cfg.fusion
        archs = fusion.members
        records: dict[str, ArrayRecord | ConfigRecord] = {
            f"member/{a}": cohorts[a].arrays for a in archs}
        records[HEAD] = ConfigRecord({"members": archs})
        head = initial_head(fusion.weights, self.test.schema.num_classes)
        strategy = cohort_strategy("fedavg", HEAD, [m.node_id for m in members])
        for node in {n for c in cohorts.values() for n in c.strategy.members
                     if n not in c.strategy.trainers}:
            strategy.retire(node)  # out of budget (or declared so) during training
        # The head's updates scale with its learning rate (under DP its noise does too);
        # a clip of 4·lr keeps secure aggregation from truncating them, and on its few
        # coordinates the wider quantisation step (2·clip / (2^bits - 1)) is negligible.
        group = Cohort(HEAD, strategy, ArrayRecord(head.state_dict()), cfg.stacking_lr,
                       members, records, clip_range=max(self.cfg.secure_aggregation.clip_range,
                                                        4.0 * cfg.stacking_lr))
        losses, clipped = [], []
        for r in range(1, cfg.stacking_rounds + 1):
            if not strategy.trainers:
                log.warning("stacking stops after %d rounds: no site may train", r - 1)
                break
            record: dict[str, Any] = {"round": f"stacking {r}", "cohorts": {}}
            self.train_round(grid, {HEAD: group}, self.cfg.rounds + r, record)
            losses.append(record["cohorts"][HEAD].get("train_loss"))
            clipped.append(record["cohorts"][HEAD].get("secagg_clipped", 0))
            log.info("stacking round %d of %d: %d sites, train loss %s", r,
                     cfg.stacking_rounds, record["cohorts"][HEAD].get("train_clients", 0),
                     "n/a" if losses[-1] is None else f"{losses[-1]:.4f}")
        state = group.arrays.to_torch_state_dict()
        model = StackedModel([self.cohort_model(cohorts[a]) for a in archs],
                             load_head(state)).to(self.device)
        return self.scored(grid, members, HEAD, state, model,
                           {"rounds": len(losses), "lr": cfg.stacking_lr,
                            "train_loss": losses, "secagg_clipped": clipped}, records)

    def distilled_student(self, grid: Grid, cohorts: dict[str, Cohort], members: list[Member],
                          fusion: FusionResult) -> ScoredModel | None:
        """FedDF: the soft vote teaches a copy of one cohort's model on the transfer
        inputs (``fedfuse.distill``); the sites then score the student like a member."""
        cfg = self.cfg.fusion
        assert self.transfer is not None
        arch = cfg.student or fusion.members[
            int(np.argmin(member_briers(fusion.A, fusion.b, fusion.num_examples)))]
        teacher = fuse_proba([predict_proba(self.cohort_model(cohorts[a]), self.transfer)
                              for a in fusion.members], fusion.weights)
        model, report = distill(self.cohort_model(cohorts[arch]), self.transfer, teacher,
                                steps=cfg.distill_steps, lr=cfg.distill_lr,
                                temperature=cfg.temperature, seed=self.cfg.seed)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return self.scored(grid, members, arch, state, model, asdict(report))

    def scored(self, grid: Grid, members: list[Member], name: str, state: dict[str, Any],
               model: torch.nn.Module, fit: dict[str, Any],
               records: dict[str, ArrayRecord | ConfigRecord] | None = None,
               ) -> ScoredModel | None:
        """``model`` (sent as ``name`` with weights ``state``) scored like a member: its
        Brier statistics over the sites' validation splits and its test accuracy."""
        stats = self.validation_statistics(grid, {name: ArrayRecord(state)}, members, records)
        if stats is None:
            return None
        A, b, n, _ = stats
        return ScoredModel(name, state, float(A[0, 0]), float(b[0]), n,
                           brier_score(A, b, n, np.ones(1)),
                           evaluate(model, self.test.X, self.test.y).accuracy, fit)

    def validation_statistics(self, grid: Grid, models: dict[str, ArrayRecord],
                              members: list[Member],
                              records: dict[str, ArrayRecord | ConfigRecord] | None = None,
                              ) -> Statistics | None:
        """The Brier statistics of ``models`` (architecture -> weights) summed over the
        live sites' validation splits, through secure aggregation where it is on;
        ``records`` travel along (the members a stacking head needs)."""
        content = RecordDict(dict(records or {}))
        for a, arrays in models.items():
            content[f"member/{a}"] = arrays
        content["fusion"] = ConfigRecord({"members": list(models)})
        live = set(grid.get_node_ids())
        nodes = [m.node_id for m in members if m.node_id in live]
        msgs = [Message(content, dst_node_id=n, message_type="query.fusion") for n in nodes]
        collect = (self.secure_fusion_statistics if self.cfg.secure_aggregation.enabled
                   else self.fusion_statistics)
        return collect(grid, msgs, members, len(models))

    def fusion_statistics(self, grid: Grid, msgs: list[Message], members: list[Member],
                          num_members: int) -> Statistics | None:
        """The sites' statistics in plaintext, summed in member order."""
        rank = {m.node_id: m.index for m in members}
        replies = sorted((r for r in grid.send_and_receive(msgs) if not r.has_error()),
                         key=lambda r: rank.get(r.metadata.src_node_id, -1))
        if not replies:
            return None
        A = sum(r.content["stats"]["A"].numpy() for r in replies)
        b = sum(r.content["stats"]["b"].numpy() for r in replies)
        n = int(sum(int(r.content["metrics"]["num-examples"]) for r in replies))
        return A, b, n, len(replies)

    def secure_fusion_statistics(self, grid: Grid, msgs: list[Message], members: list[Member],
                                 num_members: int) -> Statistics | None:
        """The same sums through one secure-aggregation session over all sites: each
        site masks the fixed-point vector [A, b, n] and only the total is unmasked."""
        m = num_members
        nodes = {"fusion": [msg.metadata.dst_node_id for msg in msgs]}
        sessions, failed = open_sessions(grid, nodes, self.cfg.secure_aggregation.threshold,
                                         {"fusion": m * m + m + 1}, tag="fusion")
        replies = exchange(grid, {"fusion": with_session(msgs, sessions.get("fusion"))})
        collect_masked(sessions, failed, replies, {})
        sums = close_sessions(grid, sessions, failed)
        if "fusion" not in sums:
            return None
        flat = decode_fixed(sums["fusion"])
        return (flat[:m * m].reshape(m, m), flat[m * m:m * m + m], int(round(flat[-1])),
                len(sessions["fusion"].u3))


class BoundedGrid:
    """A Grid whose ``send_and_receive`` waits at most ``timeout`` seconds unless told
    otherwise: a client that never answers counts as failed instead of stalling the run.
    Each message expires when the wait ends (its TTL), so a site that connects later is
    not handed work for a phase that is over (training it would spend ε for nothing).

    With ``window`` > 0 (simulation), at most that many messages are in the engine at
    once: the next one is pushed as soon as a reply comes back (see
    ``SimulationConfig.max_in_flight``), and replies are pulled every ``POLL`` seconds
    instead of the in-memory Grid's 0.1 s.
    """

    POLL = 0.005
    """Seconds between pulls for replies inside a window."""

    def __init__(self, grid: Grid, timeout: float, window: int = 0) -> None:
        self._grid = grid
        self._timeout = timeout
        self._window = window

    def send_and_receive(self, messages: Iterable[Message],
                         timeout: float | None = None) -> Iterable[Message]:
        limit = timeout or self._timeout
        now = time.time()
        batch = list(messages)
        for msg in batch:
            msg.metadata.ttl = now - msg.metadata.created_at + limit
        if not self._window:
            return self._grid.send_and_receive(batch, timeout=limit)
        return self._windowed(batch, time.monotonic() + limit)

    def _windowed(self, batch: list[Message], deadline: float) -> list[Message]:
        """Push up to ``window`` messages, and one more for every reply pulled, until every
        message is answered or ``deadline`` passes (the unsent ones then count as
        unanswered, like messages that timed out)."""
        pending = batch[::-1]
        in_flight: set[str] = set()
        replies: list[Message] = []
        while (pending or in_flight) and time.monotonic() < deadline:
            room = self._window - len(in_flight)
            if room > 0 and pending:
                in_flight.update(self._grid.push_messages(
                    [pending.pop() for _ in range(min(room, len(pending)))]))
            pulled = list(self._grid.pull_messages(in_flight))
            replies += pulled
            in_flight -= {r.metadata.reply_to_message_id for r in pulled}
            if not pulled:
                time.sleep(self.POLL)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


Statistics = tuple[np.ndarray, np.ndarray, int, int]
"""Summed Brier statistics A, b, the validation examples and the sites behind them."""


def _counts(sent: list[Message], replies: Iterable[Message], phase: str,
            declined: int = 0) -> dict[str, int]:
    """Clients that answered, and failures (errors or no answer) among the ``sent``
    messages; ``declined`` answers (a site at its privacy budget) are neither."""
    ok = sum(1 for r in replies if not r.has_error())
    return {f"{phase}_clients": ok, f"{phase}_failures": len(sent) - ok - declined}


def _renamed(metrics: Any) -> dict[str, float]:
    """flwr metric names (``train-loss``) as run-record names (``train_loss``)."""
    if metrics is None:
        return {}
    return {k.replace("-", "_"): float(np.asarray(v)) for k, v in metrics.items()}

