"""What the coordinator knows and reports: the sites that joined, a typed record of every
round, and the finished federation.

A :class:`RoundRecord` is one line of ``metrics.jsonl`` (``to_dict``; fields that do not
apply to a run, such as the secure-aggregation counts without secure aggregation, are
left out), and what a checkpoint keeps of the rounds so far (``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the records themselves need neither torch nor Flower
    from fedfuse.coordinator.cohorts import Cohort
    from fedfuse.fusion.result import FusionResult


@dataclass(frozen=True)
class Participant:
    """A site as the coordinator knows it after discovery: no data, only counts."""

    node_id: int
    name: str
    index: int
    arch: str
    num_train: int
    num_val: int


@dataclass
class CohortRound:
    """One cohort's figures in one round: who trained, what the aggregation saw, and
    the metrics (training, federated validation, the coordinator's test split)."""

    train_clients: int = 0
    train_failures: int = 0
    """Sampled sites that did not answer with an update (errors, no answer)."""
    budget_exhausted: int = 0
    """Sites that declined because their next round would exceed their ε budget."""
    max_epsilon: float | None = None
    """The largest ε any site of the cohort has spent (runs with DP)."""
    rejected: int | None = None
    """Plaintext updates refused by the update gates (runs without secure aggregation)."""
    secagg_failed: bool | None = None
    secagg_clients: int | None = None
    secagg_dropped: int | None = None
    secagg_clipped: int | None = None
    below_min_clients: bool | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None

    def add_metrics(self, metrics: Any) -> None:
        """A Flower MetricRecord's figures (``train-loss`` -> ``train_loss``)."""
        for key, value in (metrics or {}).items():
            name = key.replace("-", "_")
            if name not in _METRICS:
                raise ValueError(f"unexpected metric {key!r} in an aggregated record")
            setattr(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CohortRound:
        return cls(**d)


_METRICS = {f.name for f in dataclasses.fields(CohortRound) if f.name.endswith(
    ("_loss", "_accuracy"))}


@dataclass
class RoundRecord:
    """One round (``round``: its number, or ``"stacking N"`` for a stacking round)."""

    round: int | str
    cohorts: dict[str, CohortRound] = field(default_factory=dict)
    wall_seconds: float | None = None

    def cohort(self, arch: str) -> CohortRound:
        """The record of cohort ``arch``, created on first use."""
        return self.cohorts.setdefault(arch, CohortRound())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round,
                               "cohorts": {a: c.to_dict() for a, c in self.cohorts.items()}}
        if self.wall_seconds is not None:
            out["wall_seconds"] = self.wall_seconds
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        return cls(d["round"], {a: CohortRound.from_dict(c) for a, c in d["cohorts"].items()},
                   d.get("wall_seconds"))


@dataclass
class FederationResult:
    cohorts: dict[str, Cohort]
    participants: list[Participant]
    history: list[RoundRecord]
    fusion: FusionResult | None = None
    privacy: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Each site's last privacy report, by node id (empty without DP)."""
    secure_sums: int = 0
    """Cohort rounds whose update was aggregated by secure aggregation."""
    device: str = "cpu"
    """Where the coordinator computed (``fedfuse.models.device.device_label``)."""


class RoundListener(Protocol):
    """Receives progress from the coordinator (the run directory, the progress display)."""

    def on_start(self, participants: list[Participant], rounds: int) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...

    def on_finish(self, result: FederationResult) -> None: ...
