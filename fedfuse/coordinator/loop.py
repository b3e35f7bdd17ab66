"""The coordinator's main loop: discover the sites, build the cohorts, run the rounds
(each cohort's strategy configures and aggregates; ``fedfuse.coordinator.rounds``),
checkpoint after every round, then fuse (``fedfuse.fusion.federated``).

``Strategy.start`` drives a single model, so this loop calls every cohort strategy's
hooks itself, all cohorts in one exchange per step.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from flwr.serverapp import Grid

from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.aggregation import make_collector
from fedfuse.coordinator.checkpoint import Checkpoint, restore, snapshot, write_checkpoint
from fedfuse.coordinator.cohorts import build_cohorts
from fedfuse.coordinator.discovery import discover
from fedfuse.coordinator.grid import BoundedGrid
from fedfuse.coordinator.moments import standardisation
from fedfuse.coordinator.privacy import SiteReports
from fedfuse.coordinator.records import FederationResult, RoundListener, RoundRecord
from fedfuse.coordinator.rounds import Rounds
from fedfuse.data.datasets import Dataset, split_transfer
from fedfuse.errors import FedfuseError
from fedfuse.fusion.federated import FederatedFusion
from fedfuse.models.device import device_label, resolve_device

log = logging.getLogger("fedfuse.coordinator")


class Coordinator:
    """Runs ``cfg`` against the sites a Grid reaches, evaluating on ``held_out`` (the
    coordinator's data: its test split, and with ``fusion.unlabeled_fraction`` the
    inputs it distils on); ``listener`` follows the rounds. ``sites`` (deployment):
    each registered node id -> its site name. ``checkpoints``: where the state after
    every round is saved. ``max_in_flight`` (simulation): the most messages handed to
    the engine at once."""

    def __init__(self, cfg: FedfuseConfig, held_out: Dataset, listener: RoundListener,
                 sites: dict[int, str] | None = None, checkpoints: Path | None = None,
                 max_in_flight: int = 0) -> None:
        self.cfg = cfg
        test, transfer = split_transfer(held_out, cfg.fusion.unlabeled_fraction, cfg.seed)
        self.listener = listener
        self.sites = sites
        self.checkpoints = checkpoints
        self.max_in_flight = max_in_flight
        self.device = resolve_device(cfg.device)
        self.reports = SiteReports()
        self.rounds = Rounds(cfg, make_collector(cfg), self.reports, test, self.device)
        self.fusion = FederatedFusion(self.rounds, transfer)
        self.noise_key = cfg.seed if sites is None else secrets.randbits(63)
        """Seeds client-level DP's noise: the scenario seed in simulation (reruns are
        identical), a fresh secret in deployment."""

    def run(self, flower_grid: Grid, resume: Checkpoint | None = None) -> FederationResult:
        cfg = self.cfg
        grid = BoundedGrid(flower_grid, cfg.round_timeout, self.max_in_flight)
        participants, replies = discover(grid, cfg, self.rounds.test.schema, self.sites)
        if not participants:
            raise FedfuseError("no client answered the discovery query")
        schema = self.rounds.test.schema
        cohorts = build_cohorts(cfg, schema, participants, standardisation(
            grid, self.rounds.collector, participants, replies, self.rounds.test.X,
            cfg.data.by_channel(schema.is_image)), self.noise_key)
        self.listener.on_start(participants, cfg.rounds)
        history: list[RoundRecord] = []
        first = 1
        if resume is not None:
            history = restore(resume, cohorts, participants, self.reports.by_node)
            self.rounds.collector.secure_sums = resume.secure_sums
            first = resume.round + 1
            log.info("resuming after round %d of %d", resume.round, cfg.rounds)
        for server_round in range(first, cfg.rounds + 1):
            if not any(c.strategy.trainers for c in cohorts.values()):
                log.warning("every site has spent its privacy budget; the run stops after "
                            "round %d of %d", server_round - 1, cfg.rounds)
                break
            start = time.perf_counter()
            record = RoundRecord(server_round)
            self.rounds.train(grid, cohorts, server_round, record)
            self.rounds.evaluate(cohorts, record)
            record.wall_seconds = round(time.perf_counter() - start, 4)
            history.append(record)
            if self.checkpoints is not None:
                write_checkpoint(self.checkpoints, snapshot(
                    server_round, cohorts, participants, history, self.reports.by_node,
                    self.rounds.collector.secure_sums))
            self.listener.on_round(record)
        result = FederationResult(cohorts, participants, history,
                                  self.fusion.fuse(grid, cohorts, participants),
                                  dict(self.reports.by_node),
                                  self.rounds.collector.secure_sums, device_label(self.device))
        self.listener.on_finish(result)
        return result
