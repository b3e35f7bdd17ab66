"""Client-level DP (``privacy.mode = "user"``) as a wrapper around a cohort strategy, in
the shape of Flower's ``DifferentialPrivacyClientSideFixedClipping``: the sites clip
their updates (the wrapper asks them to, with the clipping norm C), and the wrapper
releases the cohort's mean with Gaussian noise, ``w + (Σ_i Δ_i + N(0, σ²C² I)) / m``,
charging every release to the cohort's privacy ledger (``fedfuse.privacy.client_level``
holds the math). A cohort whose next release would exceed its budget stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedfuse.privacy.client_level import SAMPLE_RATE, release
from fedfuse.privacy.ledger import PrivacyLedger

from .cohort import CohortStrategy

log = logging.getLogger("fedfuse.strategies")


class ClientLevelDP:
    """``strategy`` with each round's aggregate released under client-level DP.

    ``noise_key`` and ``index`` seed the noise of a round (``[noise_key, round,
    index]``); ``secure``: the replies it aggregates are secure sums (each counts its
    sites), not single sites' updates (which it re-clips to C)."""

    def __init__(self, strategy: CohortStrategy, ledger: PrivacyLedger, clipping_norm: float,
                 *, noise_key: int, index: int, secure: bool) -> None:
        self.strategy = strategy
        self.ledger = ledger
        self.clipping_norm = clipping_norm
        self.noise_key = noise_key
        self.index = index
        self.secure = secure
        self.reports: dict[int, dict[str, Any]] = {}
        """Every member's privacy figures: its cohort's account (node id -> figures)."""
        self._arrays: ArrayRecord | None = None
        self._sent: list[Message] = []

    @property
    def members(self) -> list[int]:
        return self.strategy.members

    @property
    def trainers(self) -> list[int]:
        return self.strategy.trainers

    def retire(self, node_id: int) -> None:
        self.strategy.retire(node_id)

    def fix_train_sample(self, grid: Grid) -> list[int]:
        return self.strategy.fix_train_sample(grid)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return self.strategy.state_arrays()

    def restore_state(self, state: dict[str, np.ndarray], arrays: ArrayRecord) -> None:
        self.strategy.restore_state(state, arrays)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, asking each site to clip its update to C;
        none once the next release would take ε over the budget."""
        sigma = float(self.ledger.noise_multiplier or 0.0)
        if self.trainers and self.ledger.would_exceed(sigma, SAMPLE_RATE, 1):
            log.warning("round %d: cohort %s stops training: its next release would exceed "
                        "the privacy budget (ε %.3f of %.3f spent)", server_round,
                        self.strategy.cohort, self.ledger.epsilon(), self.ledger.budget)
            for node in list(self.trainers):
                self.retire(node)
            self._report("budget-exhausted")
        config["dp-mode"] = "user"
        config["dp-clipping-norm"] = self.clipping_norm
        # what each site needs to keep its own account of the releases it is in
        config.update({"dp-noise-multiplier": sigma, "dp-delta": self.ledger.delta,
                       "dp-accountant": self.ledger.accountant})
        if self.ledger.budget is not None:
            config["dp-budget"] = self.ledger.budget
        self._arrays = arrays
        self._sent = list(self.strategy.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's replies (summed in member order) as one noisy mean with ``m`` =
        the sites sampled, handed to the wrapped strategy as its only reply."""
        assert self._arrays is not None, "aggregate_train before configure_train"
        rng = np.random.default_rng([self.noise_key, server_round, self.index])
        released = release(self._arrays, self.strategy.in_member_order(replies), self._sent,
                           self.ledger,
                           self.clipping_norm, rng, secure=self.secure)
        if released is not None:
            self._report("trained")
        return self.strategy.aggregate_train(server_round,
                                             [] if released is None else [released])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _report(self, status: str) -> None:
        ledger = self.ledger
        figures = {"status": status, "epsilon": ledger.epsilon(), "delta": ledger.delta,
                   "noise-multiplier": float(ledger.noise_multiplier or 0.0),
                   "sample-rate": SAMPLE_RATE, "steps": ledger.steps,
                   "accountant": ledger.accountant,
                   "budget": -1.0 if ledger.budget is None else float(ledger.budget)}
        for node in self.members:
            self.reports[node] = dict(figures)
