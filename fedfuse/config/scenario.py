"""The whole scenario: its sections and the checks that span them.

A :class:`FedfuseConfig` is built from a TOML file by ``fedfuse.config.loading``; every
message names the offending key by its dotted path (``partition.alpha``,
``cohorts[1].arch``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from fedfuse.config.cohort import CohortConfig
from fedfuse.config.sections import (
    DataConfig,
    DeploymentConfig,
    FusionConfig,
    PartitionConfig,
    PrivacyConfig,
    RobustnessConfig,
    SecureAggregationConfig,
    SimulationConfig,
    check,
)
from fedfuse.config.tracking import TrackingConfig
from fedfuse.config.train import TrainConfig
from fedfuse.errors import ConfigError
from fedfuse.models.device import check_device_name
from fedfuse.models.spec import CodeAllowance
from fedfuse.secagg.messages import MIN_SURVIVORS


@dataclass
class FedfuseConfig:
    """A whole scenario: data, partition, cohorts, training and engine settings."""

    name: str
    cohorts: list[CohortConfig]
    seed: int = 0
    rounds: int = 20
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(
        default_factory=SecureAggregationConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    device: str = "cpu"
    """Where training and evaluation run: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a
    GPU when PyTorch sees one). In simulation it applies to the coordinator and every
    site; a deployed site picks its own (``fedfuse site --device``)."""
    round_timeout: float = 600.0
    """Seconds the coordinator waits for the answers to one message exchange (a round's
    training, evaluation, a secure-aggregation stage); a client that has not answered by
    then counts as failed for that exchange, so a silent client cannot stall the run."""
    code_dir: str | None = None
    """Where a cohort's ``module:factory`` is looked for before the Python path: the
    scenario file's directory unless set. A deployed site never uses it: it imports
    only from its own environment, and only the import paths it allows."""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "must not be empty")
        check(self.rounds >= 1, "rounds", "must be >= 1")
        check_device_name(self.device, "device")
        check(math.isfinite(self.round_timeout) and self.round_timeout > 0.0, "round_timeout",
               f"must be a finite number > 0, got {self.round_timeout}")
        r = self.robustness
        if self.secure_aggregation.enabled and r.aggregation != "fedavg":
            raise ConfigError("robustness.aggregation", f"{r.aggregation!r} must see every "
                              "client's update, and secure aggregation shows the coordinator "
                              "only each cohort's sum; set secure_aggregation.enabled = "
                              "false to use it, or keep \"fedavg\" (docs/robustness.md "
                              "compares the two protections)")
        if self.secure_aggregation.enabled and r.max_update_norm is not None:
            raise ConfigError("robustness.max_update_norm", "needs plaintext updates; under "
                              "secure aggregation each coordinate is bounded by "
                              "secure_aggregation.clip_range instead")
        if r.aggregation != "fedavg" and self.train.strategy != "fedavg":
            raise ConfigError("train.strategy", f"{self.train.strategy!r} is Flower's rule "
                              f"on the weighted mean of the updates, which "
                              f"robustness.aggregation = {r.aggregation!r} replaces: use one "
                              "or the other")
        if r.aggregation != "fedavg" and self.train.server_optimizer:
            raise ConfigError("train.server_momentum", f"the server optimiser applies to "
                              f"FedAvg only, not to robustness.aggregation = "
                              f"{r.aggregation!r}")
        if r.aggregation in ("krum", "multikrum"):
            for i, cohort in enumerate(self.cohorts):
                sampled = self.sampled_per_round(cohort)
                if sampled <= 2 * r.max_malicious + 2:
                    raise ConfigError(f"cohorts[{i}].clients", f"Krum tolerates f = "
                                      f"robustness.max_malicious = {r.max_malicious} "
                                      f"poisoned updates only among more than 2f + 2 = "
                                      f"{2 * r.max_malicious + 2}; cohort {cohort.name!r} "
                                      f"trains {sampled} per round")
        if self.privacy.mode == "user":
            self._check_user_dp()
        names = [c.name for c in self.cohorts]
        if self.fusion.student and self.fusion.student not in names:
            raise ConfigError("fusion.student", f"{self.fusion.student!r} is not a cohort's "
                              f"name; choose one of {', '.join(names)}")
        sites = [n for c in self.cohorts for n in c.sites or []]
        if len(set(sites)) != len(sites):
            dup = next(n for n in sites if sites.count(n) > 1)
            raise ConfigError("cohorts", f"site {dup!r} is listed in two cohorts; a site "
                              "trains one architecture")
        check(len(self.cohorts) >= 1, "cohorts", "at least one [[cohorts]] entry is needed")
        seen: set[str] = set()
        for i, cohort in enumerate(self.cohorts):
            if cohort.name in seen:
                raise ConfigError(f"cohorts[{i}].name", f"two cohorts are named "
                                  f"{cohort.name!r}; merge them, or give each a name of "
                                  "its own (name = \"...\")")
            seen.add(cohort.name)
            sampled = self.sampled_per_round(cohort)
            if self.secure_aggregation.enabled and sampled < MIN_SURVIVORS:
                raise ConfigError(f"cohorts[{i}].clients", f"secure aggregation needs at "
                                  f"least {MIN_SURVIVORS} clients per cohort and round, and "
                                  f"cohort {cohort.name!r} trains {sampled} (in a sum over "
                                  "two, each update is the sum minus the other); add "
                                  "clients, raise "
                                  "simulation.fraction_train, or set "
                                  "secure_aggregation.enabled = false")

    def _check_user_dp(self) -> None:
        """Client-level DP bounds each site's share of a cohort's mean; refuse what would
        break that bound or release a site's data outside it."""
        if self.robustness.aggregation != "fedavg":
            raise ConfigError("robustness.aggregation", "privacy.mode = \"user\" adds its "
                              "noise to the cohort mean; keep \"fedavg\"")
        if self.fusion.stacking_rounds:
            raise ConfigError("fusion.stacking_rounds", "the stacking head has no "
                              "client-level privacy account; set it to 0 with "
                              "privacy.mode = \"user\" (soft vote and distillation spend "
                              "no ε)")
        if self.privacy.delta is not None:
            smallest = min(c.clients for c in self.cohorts)
            check(self.privacy.delta < 1.0 / smallest, "privacy.delta",
                   f"must be below 1/n for the n sites of every cohort; the smallest cohort "
                   f"has {smallest}, so δ must be < {1.0 / smallest:.3g} (got "
                   f"{self.privacy.delta:g}); leave it unset for the 1/(10·n) rule")

    def sampled_per_round(self, cohort: CohortConfig) -> int:
        """How many of ``cohort``'s clients train each round, as flwr's FedAvg samples:
        ``max(1, int(fraction_train * clients))``."""
        return max(1, int(self.simulation.fraction_train * cohort.clients))

    @property
    def num_clients(self) -> int:
        return sum(c.clients for c in self.cohorts)

    @property
    def site_names(self) -> list[str]:
        """Deployment: every listed site, cohort by cohort (a site's position is its index)."""
        return [n for c in self.cohorts for n in c.sites or []]

    @property
    def own_code(self) -> CodeAllowance:
        """The scenario's own model code: any import path, looked for in ``code_dir``
        first (the coordinator and a simulation run it; a deployed site does not)."""
        return CodeAllowance(None, search=self.code_dir)

    def cohort_named(self, name: str) -> CohortConfig:
        """The cohort called ``name``."""
        for cohort in self.cohorts:
            if cohort.name == name:
                return cohort
        raise KeyError(f"no cohort is named {name!r}")

    def cohort_of(self, partition_id: int) -> CohortConfig:
        """The cohort of client ``partition_id``: clients are numbered cohort by cohort."""
        start = 0
        for cohort in self.cohorts:
            if partition_id < start + cohort.clients:
                return cohort
            start += cohort.clients
        raise ValueError(f"partition id {partition_id} is outside 0..{self.num_clients - 1}")

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
