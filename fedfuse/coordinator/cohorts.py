"""The cohorts: one model and one strategy per architecture, built from discovery.

Every cohort model starts from a seeded initialisation with the federation's feature
standardisation (``fedfuse.data.stats``, pooled from the sites' moments); its strategy
is the configured aggregation over the cohort's sites (``fedfuse.strategies``), wrapped
in client-level DP under ``privacy.mode = "user"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.records import Participant
from fedfuse.data.datasets import DataSchema
from fedfuse.errors import FedfuseError
from fedfuse.models.registry import (
    build_model,
    learning_rate,
    load_model,
    set_standardization,
)
from fedfuse.models.spec import OWN_CODE, CodeAllowance, ModelSpec
from fedfuse.privacy.client_level import cohort_ledger
from fedfuse.strategies import ClientLevelDP, CohortStrategy, cohort_strategy

Strategy = Union[CohortStrategy, ClientLevelDP]


@dataclass
class Cohort:
    arch: str
    """The cohort's name (``cohorts[i].name``)."""
    strategy: Strategy
    arrays: ArrayRecord
    lr: float
    participants: list[Participant] = field(default_factory=list)
    extra: dict[str, ArrayRecord | ConfigRecord] = field(default_factory=dict)
    """Records sent with every train message besides the model (the stacking head's
    members)."""
    clip_range: float | None = None
    """Secure aggregation's per-coordinate clip for this group's updates (None: the
    configured ``secure_aggregation.clip_range``)."""
    spec: ModelSpec | None = None
    """What builds the model (``None`` for the stacking head, which is no cohort's)."""
    code: CodeAllowance = OWN_CODE

    @property
    def unit_weights(self) -> bool:
        """Whether every site counts once in the average (client-level DP), instead of
        by its training examples."""
        return isinstance(self.strategy, ClientLevelDP)

    def weight(self, participant: Participant) -> int:
        """A site's FedAvg weight: its training examples, or 1 under client-level DP."""
        return 1 if self.unit_weights else participant.num_train

    def model(self, schema: DataSchema, device: torch.device) -> torch.nn.Module:
        """The cohort's current model on ``device``."""
        assert self.spec is not None, f"{self.arch} is not built from a model spec"
        return load_model(self.spec, schema, self.arrays.to_torch_state_dict(),
                          code=self.code, key=self.arch).to(device)


def build_cohorts(cfg: FedfuseConfig, schema: DataSchema, participants: list[Participant],
                  standardisation: tuple[np.ndarray, np.ndarray],
                  noise_key: int) -> dict[str, Cohort]:
    """One cohort per configured architecture over the participants that train it,
    each model standardised with the sites' pooled (mean, std)
    (``fedfuse.coordinator.moments``); ``noise_key`` seeds client-level DP's noise."""
    mean, std = standardisation
    if cfg.secure_aggregation.enabled:
        from fedfuse.secagg.encoding import check_ring

        check_ring(cfg.secure_aggregation.quantization_bits,
                   sum(p.num_train for p in participants))
    cohorts: dict[str, Cohort] = {}
    for i, cc in enumerate(cfg.cohorts):
        mine = [p for p in participants if p.arch == cc.name]
        if not mine:
            raise FedfuseError(f"cohort {cc.name!r} has no connected client")
        model = build_model(cc.model, schema, seed=cfg.seed * 1000 + i, code=cfg.own_code,
                            key=f"cohorts[{i}].arch")
        set_standardization(model, mean, std)
        lr = cc.lr if cc.lr is not None else learning_rate(
            cc.model, cfg.privacy.mode == "sample", schema)
        cohorts[cc.name] = Cohort(cc.name, cohort_strategy_for(cfg, i, mine, noise_key),
                                  ArrayRecord(model.state_dict()), lr, mine,
                                  spec=cc.model, code=cfg.own_code)
    return cohorts


def cohort_strategy_for(cfg: FedfuseConfig, index: int, participants: list[Participant],
                        noise_key: int) -> Strategy:
    """The strategy of cohort ``index``: the configured aggregation over its sites,
    sampling with its own seeded generator; under client-level DP, wrapped with the
    cohort's ledger (σ calibrated for ``rounds`` releases)."""
    r, sim, arch = cfg.robustness, cfg.simulation, cfg.cohorts[index].name
    strategy = cohort_strategy(r.aggregation, arch, [p.node_id for p in participants],
                               trim_fraction=r.trim_fraction, max_malicious=r.max_malicious,
                               multikrum_select=r.multikrum_select,
                               server_momentum=cfg.train.server_momentum,
                               server_lr=cfg.train.server_lr, strategy=cfg.train.strategy,
                               proximal_mu=cfg.train.proximal_mu,
                               fedopt={"eta": cfg.train.server_eta,
                                       "beta_1": cfg.train.server_beta_1,
                                       "beta_2": cfg.train.server_beta_2,
                                       "tau": cfg.train.server_tau},
                               seed=cfg.seed * 1000 + index,
                               fraction_train=sim.fraction_train,
                               fraction_evaluate=sim.fraction_evaluate)
    p = cfg.privacy
    if p.mode != "user":
        return strategy
    ledger = cohort_ledger(p.accountant, p.delta, p.budget, p.target_epsilon,
                           p.noise_multiplier, len(participants), cfg.rounds)
    return ClientLevelDP(strategy, ledger, p.clipping_norm, noise_key=noise_key, index=index,
                         secure=cfg.secure_aggregation.enabled)
