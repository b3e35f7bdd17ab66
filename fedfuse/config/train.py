"""The ``[train]`` table: local training at each site and the cohort's aggregation rule
(FedAvg, FedAvgM, FedProx or a FedOpt server optimiser)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedfuse.config.sections import check

DP_BATCH = (32, 256)
"""The smallest and the largest default expected batch under DP-SGD."""


def dp_batch_size(examples: float) -> int:
    """The default expected batch of DP-SGD for sites of ``examples`` training records:
    ``clamp(2^round(log2(examples / 10)), 32, 256)``. Larger batches add less noise per
    example but take fewer steps; at ε = 8 the default scenario's sites (about 108
    records) did best with 32 (64 lost 1 point fused over seeds 7-11), and sites of about
    600 28x28 images with 64 (0.861 fused against 0.822 with 32 and 0.839 with 128)."""
    batch = 2 ** round(math.log2(max(examples, 1.0) / 10.0))
    return int(min(max(batch, DP_BATCH[0]), DP_BATCH[1]))


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int | None = None
    """Passes over the local data per round; default 2, or 1 under DP."""
    batch_size: int | None = None
    """Default 16; under DP the expected Poisson batch, :func:`dp_batch_size` of the
    cohort's median site (32 for sites of up to about 450 records)."""
    momentum: float | None = None
    """SGD momentum; default 0.9, or 0 under DP."""
    weight_decay: float = 0.0
    server_momentum: float = 0.0
    """Server-side momentum on each cohort's aggregate (FedAvgM): the coordinator steps
    along ``m = momentum * m + (w - w_avg)``; 0 is plain FedAvg."""
    server_lr: float = 1.0
    """Server-side learning rate: ``w <- w - server_lr * m``."""
    strategy: str = "fedavg"
    """Each cohort's rule: ``fedavg`` (FedAvgM with ``server_momentum``), ``fedprox``
    (with ``proximal_mu``), or a server optimiser on the averaged update, ``fedadam``,
    ``fedyogi``, ``fedadagrad`` (with ``server_eta``, ``server_beta_1``,
    ``server_beta_2``, ``server_tau``): Flower's strategies of those names."""
    proximal_mu: float = 0.0
    """FedProx's ``mu``: each site's step toward the received weights, ``mu/2 ||w - w0||²``."""
    server_eta: float = 0.1
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    """FedOpt's server learning rate, moment decays and adaptivity (Reddi et al. 2021);
    Flower's FedAdagrad takes the rate and ``server_tau`` only."""

    def __post_init__(self) -> None:
        check(self.strategy in STRATEGIES, "strategy",
              f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        check(math.isfinite(self.proximal_mu) and 0.0 <= self.proximal_mu <= 1000.0,
              "proximal_mu", f"must be in [0, 1000], got {self.proximal_mu}")
        check((self.strategy == "fedprox") == (self.proximal_mu > 0.0), "proximal_mu",
              "fedprox needs proximal_mu > 0, and only fedprox takes one")
        check(self.strategy in ("fedavg", "fedprox") or (self.server_momentum == 0.0
                                                         and self.server_lr == 1.0),
              "strategy", f"{self.strategy} is a server optimiser of its own: leave "
              "server_momentum and server_lr unset (use server_eta)")
        for key in ("server_eta", "server_tau"):
            value = getattr(self, key)
            check(math.isfinite(value) and value > 0.0, key, f"must be > 0, got {value}")
        for key in ("server_beta_1", "server_beta_2"):
            value = getattr(self, key)
            check(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")
        check(0.0 <= self.server_momentum < 1.0, "server_momentum", "must be in [0, 1)")
        check(math.isfinite(self.server_lr) and self.server_lr > 0.0, "server_lr",
               "must be a finite number > 0")
        check(self.local_epochs is None or self.local_epochs >= 1, "local_epochs",
               "must be >= 1")
        check(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.momentum is None or 0.0 <= self.momentum < 1.0, "momentum",
               "must be in [0, 1)")
        check(self.weight_decay >= 0.0, "weight_decay", "must be >= 0")

    def resolved(self, private: bool, examples: float | None = None) -> TrainConfig:
        """These settings with every unset field replaced by its tuned default, which
        differs between plain SGD and DP-SGD (``private``); under DP the batch follows
        the ``examples`` a site trains on (its cohort's median; None: 32)."""
        dp_batch = DP_BATCH[0] if examples is None else dp_batch_size(examples)
        return TrainConfig(
            local_epochs=self.local_epochs or (1 if private else 2),
            batch_size=self.batch_size or (dp_batch if private else 16),
            momentum=self.momentum if self.momentum is not None else (0.0 if private else 0.9),
            weight_decay=self.weight_decay, server_momentum=self.server_momentum,
            server_lr=self.server_lr, strategy=self.strategy, proximal_mu=self.proximal_mu,
            server_eta=self.server_eta, server_beta_1=self.server_beta_1,
            server_beta_2=self.server_beta_2, server_tau=self.server_tau)

    @property
    def server_optimizer(self) -> bool:
        return self.server_momentum > 0.0 or self.server_lr != 1.0
