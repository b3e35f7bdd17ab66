"""The scenario's sections: one validated dataclass per TOML table.

Each section checks its own values when it is built (``__post_init__``) and names the
offending key; checks that span sections live in ``fedfuse.config.scenario``, and
checks that need the data or the models in ``fedfuse.config.preflight``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from fedfuse.data.flower import FlowerParams
from fedfuse.errors import ConfigError

EMBEDDED_DATASETS = ("digits", "breast_cancer")
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
"""A partner site's name: 1-63 letters, digits, '_', '.' or '-', not starting with a
symbol (it names a directory and appears in node configs)."""


@dataclass
class DataConfig:
    """Where the data come from and how much of it is held out."""

    source: str = "digits"
    """``digits`` or ``breast_cancer`` (embedded), a path to a ``.npz``/``.csv`` file, or
    a directory saved by Hugging Face datasets' ``save_to_disk``."""
    label_column: str = "label"
    """Name of the label column when ``source`` is a CSV file or a Hugging Face
    directory."""
    features: list[str] = field(default_factory=list)
    """A Hugging Face directory's feature columns (one image or array column, or scalar
    columns); none: every column but ``label_column``."""
    split: str = "train"
    """The split of a saved Hugging Face ``DatasetDict``."""
    test_fraction: float = 0.2
    """Share of the data held out for the coordinator's test evaluation."""
    val_fraction: float = 0.2
    """Share of each client's data kept as its local validation split."""
    standardize: Literal["auto", "feature", "channel"] = "auto"
    """How every model's first layer standardises its input, from the federated
    moments: per ``feature``, or per image ``channel`` (all pixels of a channel share one
    mean and std); ``auto``: per channel for images (C, H, W), per feature otherwise."""

    def by_channel(self, is_image: bool) -> bool:
        """Whether inputs of this kind are standardised per channel."""
        if self.standardize == "channel" and not is_image:
            raise ConfigError("data.standardize", "\"channel\" needs image-shaped input "
                              "(C, H, W); use \"feature\" or \"auto\"")
        return self.standardize == "channel" or (self.standardize == "auto" and is_image)

    def __post_init__(self) -> None:
        check(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        check(bool(self.source.strip()), "source", "must not be empty")


@dataclass
class PartitionConfig:
    """How the training pool is split across clients."""

    method: Literal["iid", "dirichlet", "pathological", "shard", "linear", "square",
                    "exponential", "flower_dirichlet"] = "dirichlet"
    """fedfuse's ``iid`` or ``dirichlet``, or a Flower Datasets partitioner (extra
    ``fedfuse[datasets]``; see fedfuse/data/flower.py)."""
    alpha: float = 0.5
    """Dirichlet concentration: smaller means stronger label skew."""
    min_samples: int = 10
    """Fewest examples (train + validation) a client may receive."""
    classes_per_client: int = 2
    """``pathological``: classes each client holds."""
    shards_per_client: int = 2
    """``shard``: label-sorted shards each client holds."""
    self_balancing: bool = False
    """``flower_dirichlet``: stop giving a class to clients already over the mean size."""
    by_cohort: bool = True
    """Give each cohort a stratified share of the pool (in proportion to its clients)
    before the label skew is drawn among its clients, so that cohorts differ by
    architecture, not by the luck of the split; ``false`` partitions all clients together."""

    def __post_init__(self) -> None:
        check(self.alpha > 0.0, "alpha", "must be > 0")
        check(self.min_samples >= 2, "min_samples", "must be >= 2 (one train, one validation)")
        check(self.classes_per_client >= 1, "classes_per_client", "must be >= 1")
        check(self.shards_per_client >= 1, "shards_per_client", "must be >= 1")

    def flower(self) -> FlowerParams:
        """The Flower Datasets partitioners' parameters."""
        return FlowerParams(self.alpha, self.min_samples, self.classes_per_client,
                            self.shards_per_client, self.self_balancing)


RAY_ADDRESS = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$")
"""A Ray head's ``HOST:PORT`` (its GCS address)."""


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
    ray_address: str = ""
    """An existing Ray cluster to run on (``"auto"``, or the head's ``HOST:PORT`` as
    ``ray start --head`` prints it) instead of a local Ray started for the run. The
    cluster's resources then decide how many clients run at once (``num_cpus`` is not
    used; ``cpus_per_client`` still is); see docs/scale.md."""

    def __post_init__(self) -> None:
        check(self.ray_address in ("", "auto") or bool(RAY_ADDRESS.match(self.ray_address)),
              "ray_address", f"{self.ray_address!r} is not 'auto' or a Ray head's HOST:PORT "
              "(for example 127.0.0.1:6379)")
        check(self.num_cpus >= 1, "num_cpus", "must be >= 1")
        check(0.0 < self.cpus_per_client <= self.num_cpus, "cpus_per_client",
               "must be in (0, num_cpus]")
        check(self.threads_per_client >= 1, "threads_per_client", "must be >= 1")
        check(self.gpus_per_client is None or 0.0 < self.gpus_per_client <= 1.0,
               "gpus_per_client", "must be in (0, 1]")
        check(0.0 < self.fraction_train <= 1.0, "fraction_train", "must be in (0, 1]")
        check(0.0 <= self.fraction_evaluate <= 1.0, "fraction_evaluate", "must be in [0, 1]")
        check(self.max_in_flight >= 0, "max_in_flight", "must be >= 0 (0: no window)")
        check(self.pickup_interval is None or 0.0 < self.pickup_interval <= 1.0,
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
    accountant: Literal["rdp", "prv", "pld"] = "pld"
    """How ε is computed, for calibration and the ledger alike: ``pld`` (Google's
    ``dp_accounting`` PLD, pessimistic: tight and fast; the default), ``rdp`` (Opacus's
    RDP: about a tenth of the budget looser) or ``prv`` (Opacus's PRV: tight, slow)."""

    def __post_init__(self) -> None:
        for key in ("target_epsilon", "noise_multiplier", "budget_epsilon"):
            value = getattr(self, key)
            check(value is None or (math.isfinite(value) and value > 0.0), key,
                   f"must be a finite number > 0, got {value}")
        check(self.delta is None or 0.0 < self.delta < 1.0, "delta",
               f"must be in (0, 1), got {self.delta}")
        check(self.max_grad_norm > 0.0 and math.isfinite(self.max_grad_norm), "max_grad_norm",
               f"must be a finite number > 0, got {self.max_grad_norm}")
        check(self.clipping_norm > 0.0 and math.isfinite(self.clipping_norm), "clipping_norm",
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
    threshold: float = 0.7
    """Share of a round's sampled cohort members needed to unmask the sum: t =
    max(2, ceil(threshold * n)). Up to n - t members may drop out after sharing keys.
    Must be > 0.5, so that no two disjoint groups of clients can each rebuild secrets,
    and > 2/3 with ``consistency_check``."""
    consistency_check: bool = True
    """Security against a coordinator that lies about who dropped (Bonawitz et al.'s
    active variant): between masked input and unmasking, every survivor signs the
    survivor set, and reveals only once more than 2/3 of the members signed the same
    one. One more exchange per round; sites with the default policy require it
    (docs/secure-aggregation.md#consistency-check)."""
    neighbours: int = 0
    """SecAgg+: each member shares its secrets with, and masks pairwise with, this many
    other members (half on either side of it on a ring in a random order), not with all
    of them, and its threshold is taken of its neighbourhood. 0 (the default): every
    member (the complete graph). An even number >= 2; cost and what it gives up in
    docs/secure-aggregation.md#neighbourhoods."""
    clip_range: float = 2.0
    """Each coordinate of a client's update (new minus received weights) is clipped to
    [-clip_range, clip_range] before quantisation; clipped coordinates are counted."""
    quantization_bits: int = 24
    """Levels of the stochastic quantiser, 2^bits - 1; its step 2 clip_range / (2^bits - 1)
    bounds the error of an aggregated coordinate."""

    def __post_init__(self) -> None:
        check(0.5 < self.threshold <= 1.0, "threshold",
               f"must be in (0.5, 1], got {self.threshold}: with half or fewer, two disjoint "
               "halves of a cohort could each rebuild the secrets of the other")
        check(not self.consistency_check or 3 * self.threshold > 2, "threshold",
              f"must be above 2/3 with consistency_check (the active-security variant "
              f"assumes it), got {self.threshold}; raise it or set consistency_check = "
              "false")
        check(self.neighbours == 0 or (self.neighbours >= 2 and self.neighbours % 2 == 0),
              "neighbours", f"must be 0 (every member) or an even number >= 2 (half on "
              f"either side of a member on the ring), got {self.neighbours}")
        check(math.isfinite(self.clip_range) and self.clip_range > 0.0, "clip_range",
               f"must be a finite number > 0, got {self.clip_range}")
        check(8 <= self.quantization_bits <= 40, "quantization_bits",
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
        check(0.0 <= self.trim_fraction < 0.5, "trim_fraction",
               f"must be in [0, 0.5), got {self.trim_fraction}")
        check(self.max_malicious >= 0, "max_malicious", "must be >= 0")
        check(self.multikrum_select >= 1, "multikrum_select", "must be >= 1")
        check(self.max_update_norm is None
               or (math.isfinite(self.max_update_norm) and self.max_update_norm > 0.0),
               "max_update_norm", f"must be a finite number > 0, got {self.max_update_norm}")
        check(self.min_clients >= 1, "min_clients", "must be >= 1")


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
        check(0.0 <= self.unlabeled_fraction < 1.0, "unlabeled_fraction",
               f"must be in [0, 1), got {self.unlabeled_fraction}")
        check(self.distill_steps >= 1, "distill_steps", "must be >= 1")
        check(math.isfinite(self.distill_lr) and self.distill_lr > 0.0, "distill_lr",
               f"must be a finite number > 0, got {self.distill_lr}")
        check(math.isfinite(self.temperature) and self.temperature > 0.0, "temperature",
               f"must be a finite number > 0, got {self.temperature}")
        check(self.stacking_rounds >= 0, "stacking_rounds", "must be >= 0")
        check(math.isfinite(self.stacking_lr) and self.stacking_lr > 0.0, "stacking_lr",
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
        check(math.isfinite(self.wait_for_sites) and self.wait_for_sites >= 0.0,
               "wait_for_sites", f"must be a finite number >= 0, got {self.wait_for_sites}")


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)
