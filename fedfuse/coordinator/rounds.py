"""One federated round in every cohort: train (configure -> one exchange for all cohorts,
federated evaluation folded in -> privacy reports -> collect -> aggregate), then the
coordinator's own test evaluation. Each step writes its figures into the round's
:class:`~fedfuse.coordinator.records.RoundRecord`; the validation figures of round r
are the sites' scores of the model they received in round r (round r - 1's aggregate,
see ``fedfuse.coordinator.validation``)."""

from __future__ import annotations

import logging
import statistics
from typing import Any

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.aggregation import FUSION, Collector, statistics_length
from fedfuse.coordinator.cohorts import Cohort
from fedfuse.coordinator.privacy import SiteReports
from fedfuse.coordinator.records import RoundRecord
from fedfuse.coordinator.sessions import sizes
from fedfuse.data.datasets import Dataset
from fedfuse.models.training import evaluate
from fedfuse.privacy.budget import PrivacyRequest
from fedfuse.secagg.encoding import payload_length
from fedfuse.secagg.messages import MIN_SURVIVORS
from fedfuse.wire import POLICY_REFUSAL

log = logging.getLogger("fedfuse.coordinator")


class Rounds:
    """Runs rounds for a set of cohorts: ``cfg``'s training settings, ``collector``'s
    aggregation, the sites' privacy ``reports``, the coordinator's ``test`` split on
    ``device``."""

    def __init__(self, cfg: FedfuseConfig, collector: Collector, reports: SiteReports,
                 test: Dataset, device: torch.device) -> None:
        self.cfg = cfg
        self.collector = collector
        self.reports = reports
        self.test = test
        self.device = device

    @property
    def planned_rounds(self) -> int:
        """Private rounds each site plans its noise for: training, then stacking."""
        f = self.cfg.fusion
        return self.cfg.rounds + (f.stacking_rounds if f.stacks else 0)

    def train_config(self, cohort: Cohort, server_round: int) -> ConfigRecord:
        """What a cohort's train messages ask of a site: the local training settings
        and, under record-level DP, the privacy request (``dp-*`` keys)."""
        private = self.cfg.privacy.mode == "sample"
        t = self.cfg.train.resolved(private, statistics.median(
            p.num_train for p in cohort.participants) if cohort.participants else None)
        items: dict[str, Any] = {
            "lr": cohort.lr, "local-epochs": t.local_epochs, "batch-size": t.batch_size,
            "momentum": t.momentum, "weight-decay": t.weight_decay,
            "seed": self.cfg.seed * 100_003 + server_round}
        if private:
            p = self.cfg.privacy
            items.update(PrivacyRequest(
                mode=p.mode, accountant=p.accountant, max_grad_norm=p.max_grad_norm,
                planned_rounds=self.planned_rounds, target_epsilon=p.target_epsilon,
                noise_multiplier=p.noise_multiplier, budget=p.budget, delta=p.delta,
            ).to_config())
        return ConfigRecord(items)

    def train(self, grid: Grid, cohorts: dict[str, Cohort], server_round: int,
              record: RoundRecord, validate: bool = True) -> None:
        """One round of training in every cohort; with secure aggregation the
        coordinator sees only each cohort's masked sum. With ``validate``, the sites
        sampled for evaluation score the received model in the same exchange."""
        for cohort in cohorts.values():
            self.retire_culprits(cohort, server_round)
            self.retire_lone(cohort, server_round)
        msgs = {a: self.configure(grid, c, server_round) for a, c in cohorts.items()}
        evaluate = {a: list(c.strategy.configure_evaluate(server_round, c.arrays,
                                                          ConfigRecord(), grid))
                    for a, c in cohorts.items()} if validate else {}
        lengths = {a: payload_length(sizes(c.arrays)) for a, c in cohorts.items()}
        if self.collector.secure:
            self.expect_next(grid, cohorts, server_round, lengths)
        batch = self.collector.send(grid, msgs, lengths, f"round {server_round}",
                                    {a: c.clip_range for a, c in cohorts.items()}, evaluate)
        for arch in evaluate:
            record.cohort(arch).add_metrics(cohorts[arch].strategy.aggregate_evaluate(
                server_round, batch.validation.get(arch, [])))
        accepted: dict[str, list[Message]] = {}
        for arch, cohort in cohorts.items():
            replies = batch.replies[arch]
            log_refusals(cohort, replies, server_round)
            accepted[arch] = self.reports.collect(cohort, replies, server_round)
            entry = record.cohort(arch)
            refused = len(replies) - len(accepted[arch])
            ok = sum(1 for r in accepted[arch] if not r.has_error())
            entry.train_clients = ok
            entry.train_failures = len(batch.sent[arch]) - ok - refused
            entry.budget_exhausted = refused
            entry.max_epsilon = self.reports.max_epsilon(cohort)
        updates = self.collector.updates(grid, batch, accepted, cohorts, record)
        for arch, cohort in cohorts.items():
            self.aggregate(cohort, updates[arch], server_round, record)

    def retire_culprits(self, cohort: Cohort, server_round: int) -> None:
        """Stop sampling the cohort's sites that broke a secure sum (they committed to
        shares of another secret than their own): one such site would otherwise abort
        its cohort's sum every round."""
        for p in cohort.participants:
            if p.node_id in self.collector.culprits and p.node_id in cohort.strategy.trainers:
                log.warning("round %d: cohort %s stops sampling %s: its shares broke a "
                            "secure sum", server_round, cohort.arch, p.name)
                cohort.strategy.retire(p.node_id)

    def retire_lone(self, cohort: Cohort, server_round: int) -> None:
        """Under secure aggregation, retire a cohort's last sites that may train when
        fewer than ``MIN_SURVIVORS`` are left: a sum over one site is its update, over
        two each update is the sum minus the other."""
        left = cohort.strategy.trainers
        if self.collector.secure and 0 < len(left) < MIN_SURVIVORS:
            log.warning("round %d: cohort %s has %d site(s) left that may train; secure "
                        "aggregation needs %d to hide each update, so the cohort stops "
                        "training", server_round, cohort.arch, len(left), MIN_SURVIVORS)
            for site in list(left):
                cohort.strategy.retire(site)

    def expect_next(self, grid: Grid, cohorts: dict[str, Cohort], server_round: int,
                    lengths: dict[str, int]) -> None:
        """Fix who the batch after this round goes to, so that its sessions open on
        this round's exchanges: each cohort's training sample of round r + 1 (drawn
        now, after this round's evaluation sample, in the order the sampler always
        drew), or after the last round the live sites for the fusion statistics.
        Stacking rounds (after the last round) open their own."""
        if server_round < self.cfg.rounds:
            nodes = {}
            for arch, cohort in cohorts.items():
                self.retire_culprits(cohort, server_round + 1)
                self.retire_lone(cohort, server_round + 1)
                nodes[arch] = cohort.strategy.fix_train_sample(grid)
            self.collector.expect(f"round {server_round + 1}", nodes, lengths)
        elif server_round == self.cfg.rounds:
            live = set(grid.get_node_ids())
            sites = [p.node_id for c in cohorts.values() for p in c.participants
                     if p.node_id in live and p.node_id not in self.collector.culprits]
            self.collector.expect(FUSION, {FUSION: sites},
                                  {FUSION: statistics_length(len(cohorts))})

    def configure(self, grid: Grid, cohort: Cohort, server_round: int) -> list[Message]:
        """The cohort strategy's train messages, with the cohort's extra records."""
        msgs = list(cohort.strategy.configure_train(
            server_round, cohort.arrays, self.train_config(cohort, server_round), grid))
        self.reports.update_from(cohort)
        for msg in msgs:
            for key, rec in cohort.extra.items():
                msg.content[key] = rec
        return msgs

    def aggregate(self, cohort: Cohort, updates: list[Message], server_round: int,
                  record: RoundRecord) -> None:
        """Apply the cohort's aggregate, unless fewer than ``robustness.min_clients``
        sites contributed (or none did): then the cohort keeps its model."""
        entry = record.cohort(cohort.arch)
        contributors = (entry.secagg_clients or 0 if self.collector.secure
                        else sum(not u.has_error() for u in updates))
        if 0 < contributors < self.cfg.robustness.min_clients:
            log.warning("round %d: cohort %s has %d valid update(s), fewer than "
                        "robustness.min_clients = %d; keeping its model", server_round,
                        cohort.arch, contributors, self.cfg.robustness.min_clients)
            entry.below_min_clients = True
            return
        arrays, metrics = cohort.strategy.aggregate_train(server_round, updates)
        self.reports.update_from(cohort)  # client-level DP: the release was charged
        entry.max_epsilon = self.reports.max_epsilon(cohort)
        if arrays is None:
            log.warning("round %d: cohort %s got no valid update; keeping its model",
                        server_round, cohort.arch)
        else:
            cohort.arrays = arrays
        entry.add_metrics(metrics)

    def evaluate(self, cohorts: dict[str, Cohort], record: RoundRecord) -> None:
        """The coordinator's evaluation of every cohort's model on its test split (the
        sites' validation came with the train exchange)."""
        for arch, cohort in cohorts.items():
            entry = record.cohort(arch)
            res = evaluate(cohort.model(self.test.schema, self.device), self.test.X,
                           self.test.y)
            entry.test_loss, entry.test_accuracy = res.loss, res.accuracy


def log_refusals(cohort: Cohort, replies: list[Message], server_round: int) -> None:
    """One warning per site whose policy refused its train message, with the rule."""
    names = {p.node_id: p.name for p in cohort.participants}
    for reply in replies:
        reason = (reply.error.reason or "") if reply.has_error() else ""
        if POLICY_REFUSAL in reason:
            node = reply.metadata.src_node_id
            log.warning("round %d: cohort %s: site %s %s", server_round, cohort.arch,
                        names.get(node, node), reason[reason.index(POLICY_REFUSAL):][:300]
                        .rstrip("'>"))
