"""Per-cohort aggregation: flwr's own FedAvg (or one of its robust rules), restricted
to the nodes of one cohort.

Clients of one architecture form a cohort with its own global model. The aggregation is
flwr's ``FedAvg`` unchanged (``w = sum_i n_i w_i / sum_i n_i`` over the replies, with
``n_i`` the reply's ``"num-examples"``); this module only narrows which nodes it samples
and fixes the order in which replies are summed, so a seeded run is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum, MultiKrum


class CohortGrid(Grid):
    """A view of a Grid whose ``get_node_ids`` yields only a cohort's connected members."""

    def __init__(self, base: Grid, members: Sequence[int]) -> None:
        self._base = base
        self._members = list(members)

    def get_node_ids(self) -> list[int]:
        live = set(self._base.get_node_ids())
        return [n for n in self._members if n in live]

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        self._base.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._base.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._base.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._base.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._base.send_and_receive(messages, timeout=timeout)


class CohortStrategy:
    """Restricts a FedAvg-family strategy to one cohort's nodes (a mixin: put it before
    the strategy class, as in ``CohortFedAvg``).

    ``members`` is the cohort's node ids in a fixed order (for example by site index);
    replies are aggregated in that order whatever order they arrive in.
    """

    def __init__(self, cohort: str, members: Sequence[int], **strategy_kwargs) -> None:
        strategy_kwargs.setdefault("min_train_nodes", 1)
        strategy_kwargs.setdefault("min_evaluate_nodes", 1)
        strategy_kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**strategy_kwargs)  # type: ignore[call-arg]
        self.cohort = cohort
        self.members = list(members)
        self.trainers = list(members)
        """Members still sampled for training."""
        self._rank = {node: i for i, node in enumerate(self.members)}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The strategy's own state beyond the model (for checkpoints); none for FedAvg
        and the robust rules."""
        return {}

    def restore_state(self, state: dict[str, np.ndarray], arrays: ArrayRecord) -> None:
        """Resume from ``state_arrays()`` with the cohort's model ``arrays``."""

    def retire(self, node_id: int) -> None:
        """Stop sampling ``node_id`` for training (for example: its privacy budget is
        spent); it still takes part in evaluation."""
        if node_id in self.trainers:
            self.trainers.remove(node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.trainers:
            return []
        return super().configure_train(server_round, arrays, config,  # type: ignore[misc]
                                       CohortGrid(grid, self.trainers))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, config,
                                          CohortGrid(grid, self.members))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self.in_member_order(replies))

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self.in_member_order(replies))

    def in_member_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies from this cohort's members, sorted by member rank; others are dropped."""
        mine = [m for m in replies if m.metadata.src_node_id in self._rank]
        return sorted(mine, key=lambda m: self._rank[m.metadata.src_node_id])


class CohortFedAvg(CohortStrategy, FedAvg):
    """FedAvg over one cohort's nodes."""


class CohortFedAvgM(CohortStrategy, FedAvgM):
    """FedAvg with server-side momentum over one cohort's nodes."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        momentum = self.momentum_vector or []
        return {f"momentum/{i}": np.asarray(v) for i, v in enumerate(momentum)}

    def restore_state(self, state: dict[str, np.ndarray], arrays: ArrayRecord) -> None:
        self.current_arrays = arrays
        self.momentum_vector = [state[f"momentum/{i}"] for i in range(len(state))] or None


ROBUST_RULES: dict[str, type[FedAvg]] = {
    "median": FedMedian, "trimmed_mean": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum}
"""Flower's robust aggregation rules by config name (all FedAvg subclasses)."""


def cohort_strategy(aggregation: str, cohort: str, members: Sequence[int], *,
                    trim_fraction: float = 0.2, max_malicious: int = 1,
                    multikrum_select: int = 2, server_momentum: float = 0.0,
                    server_lr: float = 1.0, **strategy_kwargs) -> CohortStrategy:
    """The cohort's strategy for ``aggregation`` (``fedavg`` or a ``ROBUST_RULES`` key):

    - ``fedavg``: Flower's FedAvg, or FedAvgM when a server optimiser is set
      (``m <- server_momentum * m + (w - w_avg)``, ``w <- w - server_lr * m``);

    - ``median``: coordinate-wise median of the updates;
    - ``trimmed_mean``: per coordinate, the mean after cutting ``trim_fraction`` of the
      values from each end;
    - ``krum`` / ``multikrum``: the update(s) with the smallest summed squared distance
      to their n - f - 2 nearest neighbours (f = ``max_malicious``); Multi-Krum averages
      the ``multikrum_select`` best.
    """
    if aggregation == "fedavg" and (server_momentum > 0.0 or server_lr != 1.0):
        return CohortFedAvgM(cohort, members, server_momentum=server_momentum,
                             server_learning_rate=server_lr, **strategy_kwargs)
    if aggregation == "fedavg":
        return CohortFedAvg(cohort, members, **strategy_kwargs)
    base = ROBUST_RULES[aggregation]
    extra: dict[str, Any] = {
        "trimmed_mean": {"beta": trim_fraction},
        "krum": {"num_malicious_nodes": max_malicious},
        "multikrum": {"num_malicious_nodes": max_malicious,
                      "num_nodes_to_select": multikrum_select},
    }.get(aggregation, {})
    cls = type(f"Cohort{base.__name__}", (CohortStrategy, base), {})
    return cls(cohort, members, **strategy_kwargs, **extra)
