"""Per-cohort aggregation: Flower's own FedAvg (or FedAvgM), restricted to the nodes of
one cohort, sampling them with a seeded generator of its own.

Clients of one architecture form a cohort with its own global model. The aggregation is
flwr's ``FedAvg`` unchanged (``w = sum_i n_i w_i / sum_i n_i`` over the replies, with
``n_i`` the reply's ``"num-examples"``); this module only narrows which nodes it samples,
draws the sample from the cohort's own ``random.Random`` (Flower's strategies draw from
the global ``random`` module, which nothing in fedfuse seeds), and fixes the order in
which messages go out and replies are summed, so a seeded run is reproducible.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM

log = logging.getLogger("fedfuse.strategies")


class GridView(Grid):
    """A Grid that passes every call on to ``base``; subclasses change what they need."""

    def __init__(self, base: Grid) -> None:
        self._base = base

    def get_node_ids(self) -> Iterable[int]:
        return self._base.get_node_ids()

    def set_run(self, run: Any) -> None:
        self._base.set_run(run)

    @property
    def run(self) -> Any:
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


class CohortGrid(GridView):
    """A view of a Grid whose ``get_node_ids`` yields only the given, connected nodes."""

    def __init__(self, base: Grid, nodes: Sequence[int]) -> None:
        super().__init__(base)
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        live = set(self._base.get_node_ids())
        return [n for n in self._nodes if n in live]


class CohortStrategy:
    """Restricts a FedAvg-family strategy to one cohort's nodes (a mixin: put it before
    the strategy class, as in ``CohortFedAvg``).

    ``members`` is the cohort's node ids in a fixed order (for example by site index);
    messages go out and replies are aggregated in that order, whatever order they
    arrive in. Each round samples ``max(1, int(fraction · live nodes))`` of them with the
    cohort's own generator, seeded by ``seed``.
    """

    ledger: Any = None
    """The cohort's client-level privacy account (``strategies.client_dp``); none here."""

    def __init__(self, cohort: str, members: Sequence[int], *, seed: int = 0,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 **strategy_kwargs: Any) -> None:
        strategy_kwargs.setdefault("min_train_nodes", 1)
        strategy_kwargs.setdefault("min_evaluate_nodes", 1)
        strategy_kwargs.setdefault("min_available_nodes", 1)
        # Flower's own sampling sees only the nodes sampled here, and takes them all
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0,  # type: ignore[call-arg]
                         **strategy_kwargs)
        self.cohort = cohort
        self.members = list(members)
        self.trainers = list(members)
        """Members still sampled for training."""
        self.fractions = {"train": fraction_train, "evaluate": fraction_evaluate}
        self.sampler = random.Random(seed)
        self.pending: list[int] | None = None
        """The next round's training sample, when it was fixed ahead of the round
        (``fix_train_sample``)."""
        self._rank = {node: i for i, node in enumerate(self.members)}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The strategy's own state beyond the model, for checkpoints: the sampler's, and
        the next round's sample when it was fixed ahead (``fix_train_sample``)."""
        version, internal, _ = self.sampler.getstate()
        state = {"sampler": np.asarray([version, *internal], dtype=np.int64)}
        if self.pending is not None:  # by member rank: node ids change when a run resumes
            state["pending"] = np.asarray([self._rank[n] for n in self.pending],
                                          dtype=np.int64)
            state["members"] = np.asarray([len(self.members)], dtype=np.int64)
        return state

    def restore_state(self, state: dict[str, np.ndarray], arrays: ArrayRecord) -> None:
        """Resume from ``state_arrays()`` with the cohort's model ``arrays``."""
        if "sampler" in state:
            version, *internal = (int(v) for v in state["sampler"])
            self.sampler.setstate((version, tuple(internal), None))
        self.pending = None
        if "pending" in state:
            if int(state.get("members", [-1])[0]) == len(self.members):
                self.pending = [self.members[int(i)] for i in state["pending"]]
            else:  # another membership: the ranks name other sites; draw a fresh sample
                log.warning("the cohort has %d members, %s when checkpointed; the next "
                            "round's sample is drawn again", len(self.members),
                            int(state.get("members", [-1])[0]))

    def retire(self, node_id: int) -> None:
        """Stop sampling ``node_id`` for training (for example: its privacy budget is
        spent); it still takes part in evaluation."""
        if node_id in self.trainers:
            self.trainers.remove(node_id)

    def sample(self, grid: Grid, nodes: Sequence[int], phase: str) -> list[int]:
        """``max(1, int(fraction · n))`` of the ``n`` connected ``nodes``, as Flower's
        FedAvg counts them, drawn with the cohort's generator, in member order."""
        live = CohortGrid(grid, nodes).get_node_ids()
        fraction = self.fractions[phase]
        if not live or fraction == 0.0:
            return []
        k = min(len(live), max(int(len(live) * fraction), 1))
        return sorted(self.sampler.sample(live, k), key=self._rank.__getitem__)

    def fix_train_sample(self, grid: Grid) -> list[int]:
        """Draw the next round's training sample now (secure aggregation opens its
        session a round ahead); ``configure_train`` then sends to those of it that
        may still train."""
        self.pending = self.sample(grid, self.trainers, "train")
        return self.pending

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.pending is None:
            chosen = self.sample(grid, self.trainers, "train")
        else:
            chosen = [n for n in self.pending if n in self.trainers]
            self.pending = None
        if not chosen:
            return []
        return self.in_member_order(super().configure_train(  # type: ignore[misc]
            server_round, arrays, config, CohortGrid(grid, chosen)), "dst")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        chosen = self.sample(grid, self.members, "evaluate")
        if not chosen:
            return []
        return self.in_member_order(super().configure_evaluate(  # type: ignore[misc]
            server_round, arrays, config, CohortGrid(grid, chosen)), "dst")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(  # type: ignore[misc]
            server_round, self.in_member_order(replies))

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(  # type: ignore[misc]
            server_round, self.in_member_order(replies))

    def in_member_order(self, messages: Iterable[Message], end: str = "src") -> list[Message]:
        """Messages from (``end = "src"``: replies) or to (``"dst"``) this cohort's
        members, sorted by member rank; others are dropped."""
        def node(m: Message) -> int:
            return int(m.metadata.src_node_id if end == "src" else m.metadata.dst_node_id)

        mine = [m for m in messages if node(m) in self._rank]
        return sorted(mine, key=lambda m: self._rank[node(m)])


class CohortFedAvg(CohortStrategy, FedAvg):
    """FedAvg over one cohort's nodes."""


class CohortFedAvgM(CohortStrategy, FedAvgM):
    """FedAvg with server-side momentum over one cohort's nodes:
    ``m <- server_momentum · m + (w - w_avg)``, ``w <- w - server_lr · m``."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        momentum = self.momentum_vector or []
        return {**super().state_arrays(),
                **{f"momentum/{i}": np.asarray(v) for i, v in enumerate(momentum)}}

    def restore_state(self, state: dict[str, np.ndarray], arrays: ArrayRecord) -> None:
        super().restore_state(state, arrays)
        self.current_arrays = arrays
        momentum = sorted((k for k in state if k.startswith("momentum/")),
                          key=lambda k: int(k.split("/")[1]))
        self.momentum_vector = [state[k] for k in momentum] or None
