"""One typed, validated configuration object, built from a scenario TOML file.

The loader refuses unknown keys, wrong types and impossible values before anything
runs, and every message names the offending key by its dotted path
(``partition.alpha``, ``cohorts[1].arch``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedfuse.models.device import check_device_name
from fedfuse.errors import ConfigError

EMBEDDED_DATASETS = ("digits", "breast_cancer")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
"""A partner site's name: 1-63 letters, digits, '_', '.' or '-', not starting with a
symbol (it names a directory and appears in node configs)."""


@dataclass
class DataConfig:
    """Where the data come from and how much of it is held out."""

    source: str = "digits"
    """``digits`` or ``breast_cancer`` (embedded), or a path to a ``.npz``/``.csv`` file."""
    label_column: str = "label"
    """Name of the label column when ``source`` is a CSV file."""
    test_fraction: float = 0.2
    """Share of the data held out for the coordinator's test evaluation."""
    val_fraction: float = 0.2
    """Share of each client's data kept as its local validation split."""

    def __post_init__(self) -> None:
        _check(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        _check(bool(self.source.strip()), "source", "must not be empty")


@dataclass
class PartitionConfig:
    """How the training pool is split across clients."""

    method: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = 0.5
    """Dirichlet concentration: smaller means stronger label skew."""
    min_samples: int = 10
    """Fewest examples (train + validation) a client may receive."""
    by_cohort: bool = True
    """Give each cohort a stratified share of the pool (in proportion to its clients)
    before the label skew is drawn among its clients, so that cohorts differ by
    architecture, not by the luck of the split; ``false`` partitions all clients together."""

    def __post_init__(self) -> None:
        _check(self.alpha > 0.0, "alpha", "must be > 0")
        _check(self.min_samples >= 2, "min_samples", "must be >= 2 (one train, one validation)")


@dataclass
class CohortConfig:
    """Clients sharing one architecture; they are averaged together."""

    arch: str
    clients: int = 0
    """How many simulated clients train this architecture; with ``sites``, their number."""
    sites: list[str] | None = None
    """Deployment: the names of the partner sites in this cohort (``fedfuse certs init
    --sites``); a site trains the architecture of the cohort that lists it."""
    lr: float | None = None
    """Local learning rate; ``None`` takes the architecture's tuned default."""

    def __post_init__(self) -> None:
        if self.sites is not None:
            _check(len(self.sites) >= 1, "sites", "must list at least one site")
            _check(len(set(self.sites)) == len(self.sites), "sites", "lists a site twice")
            for name in self.sites:
                _check(bool(SITE_NAME.match(name)), "sites", f"{name!r} is not a valid site "
                       "name: use 1-63 letters, digits, '_', '.' or '-'")
            _check(self.clients in (0, len(self.sites)), "clients",
                   f"is {self.clients} but sites lists {len(self.sites)}; drop clients")
            self.clients = len(self.sites)
        _check(self.clients >= 1, "clients", "must be >= 1 (or list the cohort's sites)")
        _check(self.lr is None or self.lr > 0.0, "lr", "must be > 0")


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int | None = None
    """Passes over the local data per round; default 2, or 1 under DP."""
    batch_size: int | None = None
    """Default 16, or 32 under DP (the expected Poisson batch)."""
    momentum: float | None = None
    """SGD momentum; default 0.9, or 0 under DP."""
    weight_decay: float = 0.0
    server_momentum: float = 0.0
    """Server-side momentum on each cohort's aggregate (FedAvgM): the coordinator steps
    along ``m = momentum * m + (w - w_avg)``; 0 is plain FedAvg."""
    server_lr: float = 1.0
    """Server-side learning rate: ``w <- w - server_lr * m``."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.server_momentum < 1.0, "server_momentum", "must be in [0, 1)")
        _check(math.isfinite(self.server_lr) and self.server_lr > 0.0, "server_lr",
               "must be a finite number > 0")
        _check(self.local_epochs is None or self.local_epochs >= 1, "local_epochs",
               "must be >= 1")
        _check(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.momentum is None or 0.0 <= self.momentum < 1.0, "momentum",
               "must be in [0, 1)")
        _check(self.weight_decay >= 0.0, "weight_decay", "must be >= 0")

    def resolved(self, private: bool) -> TrainConfig:
        """These settings with every unset field replaced by its tuned default, which
        differs between plain SGD and DP-SGD (``private``)."""
        return TrainConfig(
            local_epochs=self.local_epochs or (1 if private else 2),
            batch_size=self.batch_size or (32 if private else 16),
            momentum=self.momentum if self.momentum is not None else (0.0 if private else 0.9),
            weight_decay=self.weight_decay, server_momentum=self.server_momentum,
            server_lr=self.server_lr)

    @property
    def server_optimizer(self) -> bool:
        return self.server_momentum > 0.0 or self.server_lr != 1.0


@dataclass
class SimulationConfig:
    """Resources for Flower's Ray-based simulation engine."""

    num_cpus: int = 2
    """CPUs Ray may use in all."""
    cpus_per_client: float = 1.0
    """CPUs reserved per running ClientApp; num_cpus / cpus_per_client run at once."""
    threads_per_client: int = 1
    """torch intra-op threads inside each ClientApp."""
    gpus_per_client: float | None = None
    """GPU share Ray reserves per running ClientApp when ``device`` is a GPU (0.25: four
    clients per GPU). Unset: the clients that run at once (num_cpus / cpus_per_client)
    share one GPU. Ignored on the CPU."""
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    max_in_flight: int = 32
    """Most messages handed to the engine at once, replies polled every 5 ms (0: Flower's
    own send_and_receive, all of a batch at once, replies polled every 0.1 s). Flower's
    in-memory SuperLink scans every stored message for every node it serves, so a batch
    of n messages costs O(n^2) per scan; a sliding window of this many keeps it O(n)."""
    pickup_interval: float | None = None
    """Seconds the engine waits between its sweeps for new messages to hand to the client
    actors (Flower's own: 0.1). Unset: ``0.1 · min(1, clients / 200)``, shorter for small
    federations, where a round lasts a few of these waits (see fedfuse/engine.py)."""
    verbose: bool = False
    """Show Flower's own INFO logs."""

    def __post_init__(self) -> None:
        _check(self.num_cpus >= 1, "num_cpus", "must be >= 1")
        _check(0.0 < self.cpus_per_client <= self.num_cpus, "cpus_per_client",
               "must be in (0, num_cpus]")
        _check(self.threads_per_client >= 1, "threads_per_client", "must be >= 1")
        _check(self.gpus_per_client is None or 0.0 < self.gpus_per_client <= 1.0,
               "gpus_per_client", "must be in (0, 1]")
        _check(0.0 < self.fraction_train <= 1.0, "fraction_train", "must be in (0, 1]")
        _check(0.0 <= self.fraction_evaluate <= 1.0, "fraction_evaluate", "must be in [0, 1]")
        _check(self.max_in_flight >= 0, "max_in_flight", "must be >= 0 (0: no window)")
        _check(self.pickup_interval is None or 0.0 < self.pickup_interval <= 1.0,
               "pickup_interval", "must be in (0, 1] seconds")


@dataclass
class PrivacyConfig:
    """Differential privacy of the clients' training data (see docs/privacy.md)."""

    mode: Literal["off", "sample", "user"] = "off"
    """``sample``: record-level DP-SGD at each client (Opacus); ``user``: client-level DP
    (each site clips its whole update, the coordinator adds noise to each cohort's sum,
    see ``fedfuse.user_dp``); ``off``: no DP."""
    target_epsilon: float | None = None
    """Calibrate the noise so the planned rounds spend exactly this ε; also the budget."""
    noise_multiplier: float | None = None
    """A fixed noise multiplier σ instead of ``target_epsilon``."""
    budget_epsilon: float | None = None
    """Hard ε cap per client (defaults to ``target_epsilon``); a client at its cap stops
    training."""
    delta: float | None = None
    """δ of the (ε, δ) guarantee; default: a power of ten below 1/(10·n) for n records
    (``sample``) or n sites in the cohort (``user``)."""
    max_grad_norm: float = 1.0
    """Per-example gradient clipping bound of DP-SGD (``sample``)."""
    clipping_norm: float = 1.0
    """Bound on the L2 norm of each site's update per round (``user``)."""
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        for key in ("target_epsilon", "noise_multiplier", "budget_epsilon"):
            value = getattr(self, key)
            _check(value is None or (math.isfinite(value) and value > 0.0), key,
                   f"must be a finite number > 0, got {value}")
        _check(self.delta is None or 0.0 < self.delta < 1.0, "delta",
               f"must be in (0, 1), got {self.delta}")
        _check(self.max_grad_norm > 0.0 and math.isfinite(self.max_grad_norm), "max_grad_norm",
               f"must be a finite number > 0, got {self.max_grad_norm}")
        _check(self.clipping_norm > 0.0 and math.isfinite(self.clipping_norm), "clipping_norm",
               f"must be a finite number > 0, got {self.clipping_norm}")
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError("noise_multiplier", "set either target_epsilon or "
                              "noise_multiplier, not both (target_epsilon calibrates σ)")
        if self.mode != "off" and self.target_epsilon is None and self.noise_multiplier is None:
            raise ConfigError("target_epsilon", f"mode {self.mode!r} needs target_epsilon "
                              "(recommended) or noise_multiplier")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def budget(self) -> float | None:
        """The ε cap: ``budget_epsilon``, else ``target_epsilon``, else none."""
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


@dataclass
class SecureAggregationConfig:
    """Secure aggregation of each cohort's updates (see docs/secure-aggregation.md)."""

    enabled: bool = True
    """Mask every update so that the coordinator learns only each cohort's sum."""
    threshold: float = 0.6
    """Share of a round's sampled cohort members needed to unmask the sum: t =
    max(2, ceil(threshold * n)). Up to n - t members may drop out after sharing keys.
    Must be > 0.5, so that no two disjoint groups of clients can each rebuild secrets."""
    clip_range: float = 2.0
    """Each coordinate of a client's update (new minus received weights) is clipped to
    [-clip_range, clip_range] before quantisation; clipped coordinates are counted."""
    quantization_bits: int = 24
    """Levels of the stochastic quantiser, 2^bits - 1; its step 2 clip_range / (2^bits - 1)
    bounds the error of an aggregated coordinate."""

    def __post_init__(self) -> None:
        _check(0.5 < self.threshold <= 1.0, "threshold",
               f"must be in (0.5, 1], got {self.threshold}: with half or fewer, two disjoint "
               "halves of a cohort could each rebuild the secrets of the other")
        _check(math.isfinite(self.clip_range) and self.clip_range > 0.0, "clip_range",
               f"must be a finite number > 0, got {self.clip_range}")
        _check(8 <= self.quantization_bits <= 40, "quantization_bits",
               f"must be in 8..40, got {self.quantization_bits}")


@dataclass
class RobustnessConfig:
    """Defences against bad updates (see docs/robustness.md)."""

    aggregation: Literal["fedavg", "median", "trimmed_mean", "krum", "multikrum"] = "fedavg"
    """How each cohort combines its updates: FedAvg, or one of Flower's robust rules
    (coordinate-wise median, trimmed mean, Krum, Multi-Krum). The robust rules need each
    client's update in plaintext, so they exclude secure aggregation."""
    trim_fraction: float = 0.2
    """``trimmed_mean``: share cut from each end of every coordinate."""
    max_malicious: int = 1
    """``krum`` / ``multikrum``: how many poisoned updates to tolerate (f)."""
    multikrum_select: int = 2
    """``multikrum``: how many of the best-scored updates are averaged."""
    max_update_norm: float | None = None
    """Reject an update whose L2 distance from the model the client received exceeds
    this (plaintext only; under secure aggregation ``clip_range`` bounds updates)."""
    min_clients: int = 1
    """Fewest valid updates a cohort needs for its round to count; below it the cohort
    keeps its model."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.trim_fraction < 0.5, "trim_fraction",
               f"must be in [0, 0.5), got {self.trim_fraction}")
        _check(self.max_malicious >= 0, "max_malicious", "must be >= 0")
        _check(self.multikrum_select >= 1, "multikrum_select", "must be >= 1")
        _check(self.max_update_norm is None
               or (math.isfinite(self.max_update_norm) and self.max_update_norm > 0.0),
               "max_update_norm", f"must be a finite number > 0, got {self.max_update_norm}")
        _check(self.min_clients >= 1, "min_clients", "must be >= 1")


@dataclass
class FusionConfig:
    """How the cohort models become one predictor (see docs/architecture.md, "Fusion")."""

    method: Literal["auto", "soft_vote", "stack", "distill"] = "auto"
    """``soft_vote``: the members' probabilities averaged with weights fitted on the
    sites' validation statistics. ``stack``: a logistic-regression head over the
    members' probabilities, trained by FedAvg (and DP-SGD under DP) on the sites'
    training splits for ``stacking_rounds``. ``distill``: one student model taught by
    the soft vote on the coordinator's unlabeled transfer data (FedDF), for
    single-model serving. ``auto``: whichever of those that ran has the lowest Brier
    score on the sites' validation data."""
    unlabeled_fraction: float = 0.0
    """Share of the coordinator's held-out data used, without its labels, as the
    distillation transfer set; the rest stays the test split. 0 disables distillation."""
    student: str = ""
    """Architecture of the distilled model, one of the cohorts'; empty: the member
    with the lowest validation Brier score. It starts from that cohort's model."""
    distill_steps: int = 400
    """Adam steps on the transfer set (the best step by held-out KL is kept)."""
    distill_lr: float = 1e-3
    temperature: float = 1.0
    """Softening T of teacher and student distributions (the loss is scaled by T^2)."""
    stacking_rounds: int = 0
    """FedAvg rounds that train the stacking head (0: no stacking). Under DP each is
    one more private round on every site's training split, planned into the noise
    calibration with the training rounds."""
    stacking_lr: float = 8.0
    """Learning rate of the head's local SGD (its inputs are probabilities, so its
    gradients are small; under DP they are also clipped to ``privacy.max_grad_norm``)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.unlabeled_fraction < 1.0, "unlabeled_fraction",
               f"must be in [0, 1), got {self.unlabeled_fraction}")
        _check(self.distill_steps >= 1, "distill_steps", "must be >= 1")
        _check(math.isfinite(self.distill_lr) and self.distill_lr > 0.0, "distill_lr",
               f"must be a finite number > 0, got {self.distill_lr}")
        _check(math.isfinite(self.temperature) and self.temperature > 0.0, "temperature",
               f"must be a finite number > 0, got {self.temperature}")
        _check(self.stacking_rounds >= 0, "stacking_rounds", "must be >= 0")
        _check(math.isfinite(self.stacking_lr) and self.stacking_lr > 0.0, "stacking_lr",
               f"must be a finite number > 0, got {self.stacking_lr}")
        if self.method == "stack" and self.stacking_rounds == 0:
            raise ConfigError("stacking_rounds", "method \"stack\" needs rounds to train "
                              "the head: set e.g. stacking_rounds = 10")
        if self.method == "distill" and self.unlabeled_fraction == 0.0:
            raise ConfigError("unlabeled_fraction", "method \"distill\" needs "
                              "transfer data: set a share of the coordinator's held-out "
                              "data, e.g. unlabeled_fraction = 0.5")

    @property
    def stacks(self) -> bool:
        """Whether the run trains a stacking head (``stack`` or ``auto`` with rounds)."""
        return self.stacking_rounds > 0 and self.method in ("auto", "stack")


@dataclass
class DeploymentConfig:
    """The coordinator's patience with partner sites (``fedfuse coordinator``)."""

    wait_for_sites: float = 300.0
    """Seconds to wait for every listed site to connect; after that the run starts with
    the sites present (each cohort still needs its minimum)."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.wait_for_sites) and self.wait_for_sites >= 0.0,
               "wait_for_sites", f"must be a finite number >= 0, got {self.wait_for_sites}")


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
    device: str = "cpu"
    """Where training and evaluation run: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a
    GPU when PyTorch sees one). In simulation it applies to the coordinator and every
    site; a deployed site picks its own (``fedfuse site --device``)."""
    round_timeout: float = 600.0
    """Seconds the coordinator waits for the answers to one message exchange (a round's
    training, evaluation, a secure-aggregation stage); a client that has not answered by
    then counts as failed for that exchange, so a silent client cannot stall the run."""

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "name", "must not be empty")
        _check(self.rounds >= 1, "rounds", "must be >= 1")
        check_device_name(self.device, "device")
        _check(math.isfinite(self.round_timeout) and self.round_timeout > 0.0, "round_timeout",
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
                                      f"{2 * r.max_malicious + 2}; cohort {cohort.arch!r} "
                                      f"trains {sampled} per round")
        if self.privacy.mode == "user":
            self._check_user_dp()
        archs = [c.arch for c in self.cohorts]
        if self.fusion.student and self.fusion.student not in archs:
            raise ConfigError("fusion.student", f"{self.fusion.student!r} is not a cohort's "
                              f"architecture; choose one of {', '.join(archs)}")
        names = [n for c in self.cohorts for n in c.sites or []]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError("cohorts", f"site {dup!r} is listed in two cohorts; a site "
                              "trains one architecture")
        _check(len(self.cohorts) >= 1, "cohorts", "at least one [[cohorts]] entry is needed")
        seen: set[str] = set()
        for i, cohort in enumerate(self.cohorts):
            if cohort.arch in seen:
                raise ConfigError(f"cohorts[{i}].arch", f"architecture {cohort.arch!r} "
                                  "appears in two cohorts; merge them into one")
            seen.add(cohort.arch)
            sampled = self.sampled_per_round(cohort)
            if self.secure_aggregation.enabled and sampled < 2:
                raise ConfigError(f"cohorts[{i}].clients", f"secure aggregation needs at "
                                  f"least 2 clients per cohort and round, and cohort "
                                  f"{cohort.arch!r} trains {sampled} (a sum over one client "
                                  "is its update); add clients, raise "
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
            _check(self.privacy.delta < 1.0 / smallest, "privacy.delta",
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


@dataclass
class ServeConfig:
    """The predict API server (``fedfuse serve``; a ``[serve]`` table, or CLI options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str | None = None
    """Keys file from ``fedfuse keys create``; without one, ``/v1/`` is open to anyone
    who can reach the port."""
    tls_cert: str | None = None
    """PEM certificate (chain) for HTTPS; needs ``tls_key``."""
    tls_key: str | None = None
    max_instances: int = 256
    """Most instances one request may carry."""
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch_size: int = 256
    """Most rows coalesced into one forward pass."""
    max_wait_ms: float = 0.0
    """How long a forming batch waits for more requests; 0 batches whatever queued up
    while the previous batch ran, adding no delay at low load."""
    rate_limit: str | None = None
    """Per API key (or per client address without keys), e.g. ``"100/second"``,
    ``"5000/minute"``; none by default."""
    reload_interval: float = 2.0
    """Seconds between rescans of the model directory and keys file; 0 turns it off."""
    threads: int = 1
    """torch threads for the forward pass."""
    device: str = "cpu"
    """Where the forward pass runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

    def __post_init__(self) -> None:
        check_device_name(self.device, "device")
        _check(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        _check((self.tls_cert is None) == (self.tls_key is None), "tls_key",
               "tls_cert and tls_key go together: give both for HTTPS, or neither")
        for key in ("max_instances", "max_body_bytes", "max_batch_size", "threads"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_wait_ms", "reload_interval"):
            value = getattr(self, key)
            _check(math.isfinite(value) and value >= 0.0, key,
                   f"must be a finite number >= 0, got {value}")
        if self.rate_limit is not None:
            from limits import parse

            try:
                parse(self.rate_limit)
            except ValueError:
                raise ConfigError("rate_limit", f"{self.rate_limit!r} is not a rate such as "
                                  "'100/second' or '5000/minute'") from None


def serve_config(path: Path | None, options: dict[str, Any]) -> ServeConfig:
    """The ``[serve]`` table of ``path`` (if given) with ``options`` (set CLI values) on
    top, validated; relative file paths are taken from the current directory."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = dict(tomllib.loads(path.read_text(encoding="utf-8")).get("serve", {}))
        except FileNotFoundError:
            raise ConfigError(None, f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(None, f"malformed TOML in {path}: {exc}") from None
    raw.update({k: v for k, v in options.items() if v is not None})
    return _build(ServeConfig, raw, "serve")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Loading: TOML -> dict -> overrides -> typed dataclasses


def load_config(path: str | Path, overrides: list[str] | None = None,
                rounds: int | None = None) -> FedfuseConfig:
    """Read a scenario file, apply ``key.path=value`` overrides, validate, return the config."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(None, f"scenario file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"malformed TOML in {path}: {exc}") from None
    for item in overrides or []:
        apply_override(raw, item)
    if rounds is not None:
        raw["rounds"] = rounds
    cfg = config_from_dict(raw)
    cfg.data.source = resolve_source(cfg.data.source, Path.cwd())
    return cfg


def resolve_source(source: str, base_dir: Path) -> str:
    """A data file path made absolute against ``base_dir``; embedded names pass unchanged."""
    if source in EMBEDDED_DATASETS or Path(source).is_absolute():
        return source
    return str((base_dir / source).resolve())


def config_from_dict(raw: dict[str, Any]) -> FedfuseConfig:
    return _build(FedfuseConfig, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is read as TOML, else as a plain string.

    List entries are addressed by index: ``cohorts.0.clients=5``.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(None, f"override {item!r} is not of the form key.path=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(where, "is a value, not a table; cannot set a key inside it")
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, key)
        node[int(last)] = value
    else:
        node[last] = value


def _list_item(items: list[Any], index: str, where: str) -> Any:
    if not index.isdigit() or int(index) >= len(items):
        raise ConfigError(where, f"no list entry {index!r} (the list has {len(items)} entries)")
    return items[int(index)]


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path or None, f"expected a table, got {_tname(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]),
                          f"unknown key (known keys here: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "is required")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.within(path) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {_tname(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_tname(value)} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_tname(value)} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_tname(value)} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_tname(value)} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tname(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
