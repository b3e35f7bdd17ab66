"""The coordinator's fusion rounds, after the last training round.

Every site scores every cohort model on its validation split and returns only the
Brier statistics (A, b, N), through secure aggregation where it is on; their sums give
the soft-vote weights (``fedfuse.fusion.soft_vote``). With ``fusion.stacking_rounds``, a
stacking head is trained by FedAvg over every site (``fedfuse.fusion.stacking``), and
with transfer data a student is distilled from the soft vote on the coordinator
(``fedfuse.fusion.distill``); both are scored by the sites like a member, and
``fusion.method`` picks the predictor to serve (``fedfuse.fusion.result``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedfuse.coordinator.cohorts import Cohort
from fedfuse.coordinator.records import Participant, RoundRecord
from fedfuse.coordinator.rounds import Rounds
from fedfuse.fusion.distill import distill
from fedfuse.fusion.result import FusionResult, ScoredModel
from fedfuse.fusion.soft_vote import brier_score, fuse_proba, member_briers
from fedfuse.fusion.stacking import HEAD, StackedModel, initial_head, load_head
from fedfuse.models.training import evaluate, predict_proba
from fedfuse.strategies import cohort_strategy

log = logging.getLogger("fedfuse.fusion")

Records = dict[str, ArrayRecord | ConfigRecord]


class FederatedFusion:
    """Fuses ``cohorts`` over ``participants`` with the sites' help: ``rounds`` runs the
    stacking rounds and its collector sums the statistics; ``transfer``: the
    coordinator's unlabeled inputs for distillation (None: no distillation)."""

    def __init__(self, rounds: Rounds, transfer: np.ndarray | None) -> None:
        self.rounds = rounds
        self.cfg = rounds.cfg
        self.test = rounds.test
        self.device = rounds.device
        self.transfer = transfer

    def model(self, cohort: Cohort) -> torch.nn.Module:
        return cohort.model(self.test.schema, self.device)

    def fuse(self, grid: Grid, cohorts: dict[str, Cohort],
             participants: list[Participant]) -> FusionResult | None:
        """The soft vote fitted from the sites' statistics, with the stacking head and
        the distilled student where the scenario asks for them."""
        archs = list(cohorts)
        stats = self.statistics(grid, {a: cohorts[a].arrays for a in archs}, participants)
        if stats is None:
            log.warning("fusion skipped: no validation statistics came back")
            return None
        A, b, n, sites = stats
        probas = [predict_proba(self.model(cohorts[a]), self.test.X) for a in archs]
        fusion = FusionResult.fit(archs, A, b, n, sites, probas, self.test.y)
        log.info("fusion weights %s from %d sites (%d validation examples); test accuracy %.4f",
                 {a: round(float(w), 3) for a, w in zip(archs, fusion.weights)}, fusion.sites,
                 n, fusion.test_accuracy)
        requested = self.cfg.fusion.method
        if self.cfg.fusion.stacks:
            fusion = self.with_scored(fusion, "stack",
                                      self.stacked_head(grid, cohorts, participants, fusion))
        if self.transfer is not None and requested in ("auto", "distill"):
            fusion = self.with_scored(fusion, "student",
                                      self.distilled_student(grid, cohorts, participants,
                                                             fusion))
        fusion = fusion.with_candidates(requested)
        log.info("serving %s", fusion.method)
        return fusion

    def with_scored(self, fusion: FusionResult, key: str,
                    made: ScoredModel | None) -> FusionResult:
        """``fusion`` with the candidate ``made`` (the ``stack`` or the ``student``)."""
        if made is None:
            log.warning("the %s was not scored by any site", key)
            return fusion
        fusion = fusion.with_candidates(self.cfg.fusion.method, **{key: made})
        log.info("%s (%s): validation Brier %.4f (soft vote %.4f), test accuracy %.4f", key,
                 made.arch, made.val_brier, fusion.val_brier, made.test_accuracy)
        return fusion

    def stacked_head(self, grid: Grid, cohorts: dict[str, Cohort],
                     participants: list[Participant],
                     fusion: FusionResult) -> ScoredModel | None:
        """Federated stacking: a head over the members' probabilities, started at the
        soft vote, trained for ``fusion.stacking_rounds`` FedAvg rounds over every site
        (secure aggregation and DP-SGD as for the cohorts), then scored like a member."""
        cfg = self.cfg.fusion
        archs = fusion.members
        records: Records = {f"member/{a}": cohorts[a].arrays for a in archs}
        records[HEAD] = ConfigRecord({"members": archs})
        head = initial_head(fusion.weights, self.test.schema.num_classes)
        strategy = cohort_strategy("fedavg", HEAD, [p.node_id for p in participants],
                                   seed=self.cfg.seed * 1000 + len(cohorts))
        for node in {n for c in cohorts.values() for n in c.strategy.members
                     if n not in c.strategy.trainers}:
            strategy.retire(node)  # out of budget (or declared so) during training
        # The head's updates scale with its learning rate (under DP its noise does too);
        # a clip of 4·lr keeps secure aggregation from truncating them, and on its few
        # coordinates the wider quantisation step (2·clip / (2^bits - 1)) is negligible.
        group = Cohort(HEAD, strategy, ArrayRecord(head.state_dict()), cfg.stacking_lr,
                       participants, records,
                       clip_range=max(self.cfg.secure_aggregation.clip_range,
                                      4.0 * cfg.stacking_lr))
        losses: list[float | None] = []
        clipped: list[int] = []
        for r in range(1, cfg.stacking_rounds + 1):
            if not strategy.trainers:
                log.warning("stacking stops after %d rounds: no site may train", r - 1)
                break
            record = RoundRecord(f"stacking {r}")
            self.rounds.train(grid, {HEAD: group}, self.cfg.rounds + r, record,
                              validate=False)
            entry = record.cohort(HEAD)
            losses.append(entry.train_loss)
            clipped.append(entry.secagg_clipped or 0)
            log.info("stacking round %d of %d: %d sites, train loss %s", r,
                     cfg.stacking_rounds, entry.train_clients,
                     "n/a" if entry.train_loss is None else f"{entry.train_loss:.4f}")
        state = group.arrays.to_torch_state_dict()
        model = StackedModel([self.model(cohorts[a]) for a in archs],
                             load_head(state)).to(self.device)
        return self.scored(grid, participants, HEAD, state, model,
                           {"rounds": len(losses), "lr": cfg.stacking_lr,
                            "train_loss": losses, "secagg_clipped": clipped}, records)

    def distilled_student(self, grid: Grid, cohorts: dict[str, Cohort],
                          participants: list[Participant],
                          fusion: FusionResult) -> ScoredModel | None:
        """FedDF: the soft vote teaches a copy of one cohort's model on the transfer
        inputs; the sites then score the student like a member."""
        cfg = self.cfg.fusion
        assert self.transfer is not None
        arch = cfg.student or fusion.members[
            int(np.argmin(member_briers(fusion.A, fusion.b, fusion.num_examples)))]
        teacher = fuse_proba([predict_proba(self.model(cohorts[a]), self.transfer)
                              for a in fusion.members], fusion.weights)
        model, report = distill(self.model(cohorts[arch]), self.transfer, teacher,
                                steps=cfg.distill_steps, lr=cfg.distill_lr,
                                temperature=cfg.temperature, seed=self.cfg.seed)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return self.scored(grid, participants, arch, state, model, asdict(report))

    def scored(self, grid: Grid, participants: list[Participant], name: str,
               state: dict[str, Any], model: torch.nn.Module, fit: dict[str, Any],
               records: Records | None = None) -> ScoredModel | None:
        """``model`` (sent as ``name`` with weights ``state``) scored like a member: its
        Brier statistics over the sites' validation splits and its test accuracy."""
        stats = self.statistics(grid, {name: ArrayRecord(state)}, participants, records)
        if stats is None:
            return None
        A, b, n, _ = stats
        return ScoredModel(name, state, float(A[0, 0]), float(b[0]), n,
                           brier_score(A, b, n, np.ones(1)),
                           evaluate(model, self.test.X, self.test.y).accuracy, fit)

    def statistics(self, grid: Grid, models: dict[str, ArrayRecord],
                   participants: list[Participant], records: Records | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, int, int] | None:
        """The Brier statistics of ``models`` (name -> weights) summed over the live
        sites' validation splits; ``records`` travel along (the members a stacking head
        needs)."""
        content = RecordDict(dict(records or {}))
        for a, arrays in models.items():
            content[f"member/{a}"] = arrays
        content["fusion"] = ConfigRecord({"members": list(models)})
        live = set(grid.get_node_ids()) - self.rounds.collector.culprits
        msgs = [Message(content, dst_node_id=p.node_id, message_type="query.fusion")
                for p in participants if p.node_id in live]
        return self.rounds.collector.statistics(grid, msgs, participants, len(models))
