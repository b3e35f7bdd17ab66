"""What each client holds: its architecture and its train/validation data.

In simulation every client is a partition of the scenario's data set, derived
deterministically from the config and the client's partition id, so no data crosses
process boundaries. The derived split is cached per process (Ray actors live across
rounds), keyed by the data-relevant part of the config.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedfuse.atomic import atomic_write_bytes
from fedfuse.config import FedfuseConfig, load_config
from fedfuse.data.datasets import Dataset, load_dataset, split_transfer
from fedfuse.data.partition import Federation, build_federation
from fedfuse.errors import FedfuseError
from fedfuse.models.device import worker_device
from fedfuse.models.spec import OWN_CODE, CodeAllowance, ModelSpec

if TYPE_CHECKING:
    from fedfuse.site.policy import SitePolicy


@dataclass(frozen=True)
class Site:
    """One client's local view: never leaves the client."""

    name: str
    index: int
    arch: str
    """The name of the site's cohort."""
    train: Dataset
    val: Dataset
    secret: bytes
    """Seeds the site's DP sampling and noise; never leaves the site."""
    state_dir: Path | None = None
    """Where the site keeps its privacy ledger across restarts (None: in the Flower
    node's ``Context.state``, which lives as long as the federation)."""
    device: str = "cpu"
    """Where the site trains and evaluates (``fedfuse.device``)."""
    policy: SitePolicy | None = None
    """What the site allows whatever the coordinator asks (``fedfuse.site.policy``): a
    deployed site's own file, or the default policy; None in simulation, where one party
    plays every site."""
    noise: Literal["request", "seed"] = "request"
    """What seeds the site's DP sampling and noise besides its secret: the whole request
    (received weights and the round's configuration; a deployed site, the default), so
    that no other request repeats its noise; or the round's seed (simulation, where one
    party plays every site and a run is reproducible per scenario seed). Set by the
    node, never by a message."""
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    """What builds each cohort's model, by cohort name (the scenario's cohorts)."""
    code: CodeAllowance = OWN_CODE
    """Which user model code the site imports: a simulation's own scenario's, or only
    what a deployed site's operator allowed (``fedfuse site --allow-arch``)."""


@dataclass(frozen=True)
class Plan:
    """The scenario's data set and how it is split; the coordinator keeps only ``test``."""

    dataset: Dataset
    federation: Federation

    @property
    def test(self) -> Dataset:
        return self.dataset.subset(self.federation.test)


_PLANS: dict[str, Plan] = {}


def plan_federation(cfg: FedfuseConfig) -> Plan:
    """Load and split the data as ``cfg`` says; raises DataError/ConfigError on bad input."""
    key = json.dumps([asdict(cfg.data), asdict(cfg.partition), cfg.num_clients, cfg.seed])
    if key not in _PLANS:
        dataset = load_dataset(cfg.data)
        p = cfg.partition
        federation = build_federation(
            dataset.y, [c.clients for c in cfg.cohorts], method=p.method, alpha=p.alpha,
            min_samples=p.min_samples, test_fraction=cfg.data.test_fraction,
            val_fraction=cfg.data.val_fraction, seed=cfg.seed, by_group=p.by_cohort,
            flower=p.flower())
        _PLANS[key] = Plan(dataset, federation)
    return _PLANS[key]


def run_test_split(run_dir: Path) -> Dataset:
    """The coordinator's test split of a finished run, rebuilt from its ``config.toml``:
    in simulation the held-out share of the data set (a function of the data, the
    partition settings and the seed), in a deployment (``summary.json`` says which) the
    coordinator's whole data file; less the distillation transfer inputs, if any."""
    config, summary = run_dir / "config.toml", run_dir / "summary.json"
    if not config.is_file():
        raise FedfuseError(f"{run_dir}: not a run directory (config.toml is missing)")
    cfg = load_config(config)
    deployed = summary.is_file() and json.loads(summary.read_text()).get("deployment", False)
    held_out = load_dataset(cfg.data) if deployed else plan_federation(cfg).test
    return split_transfer(held_out, cfg.fusion.unlabeled_fraction, cfg.seed)[0]


def simulated_site(cfg: FedfuseConfig, partition_id: int,
                   state_root: Path | None = None) -> Site:
    """Client ``partition_id`` of the scenario: its cohort's architecture and its split;
    with ``state_root`` its state persists in ``state_root/client-<id>``; on a GPU, the
    one Ray gave its worker (``fedfuse.device.worker_device``)."""
    plan = plan_federation(cfg)
    split = plan.federation.clients[partition_id]
    name = f"client-{partition_id}"
    return Site(name=name, index=partition_id, arch=cfg.cohort_of(partition_id).name,
                train=plan.dataset.subset(split.train), val=plan.dataset.subset(split.val),
                secret=simulated_secret(cfg.seed, partition_id),
                state_dir=None if state_root is None else state_root / name,
                device=worker_device(cfg.device), noise="seed",
                models=cohort_models(cfg), code=cfg.own_code)


def cohort_models(cfg: FedfuseConfig) -> dict[str, ModelSpec]:
    """Each cohort's model spec, by cohort name."""
    return {c.name: c.model for c in cfg.cohorts}


def write_partitions(cfg: FedfuseConfig, out: Path) -> list[Path]:
    """Each client's data (train and validation together) as ``<name>.npz``, named after
    the cohorts' ``sites`` where they list them, and the held-out ``test.npz``: files
    for trying a deployment on one machine. Labels are written as class names."""
    plan = plan_federation(cfg)
    names = cfg.site_names or [f"client-{i}" for i in range(cfg.num_clients)]
    if len(names) != cfg.num_clients:
        raise FedfuseError("list sites in every cohort, or in none")
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(plan.dataset.schema.class_labels)
    written = []
    parts = [np.concatenate([c.train, c.val]) for c in plan.federation.clients]
    for name, idx in [*zip(names, parts), ("test", plan.federation.test)]:
        path = out / f"{name}.npz"
        buf = io.BytesIO()
        np.savez(buf, X=plan.dataset.X[idx], y=labels[plan.dataset.y[idx]])
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def simulated_secret(seed: int, partition_id: int) -> bytes:
    """A simulated site's secret, derived from the scenario seed so reruns are identical.

    In simulation every site lives in one trust domain, so this is no weaker than the
    simulation itself; a deployed site draws its secret at random (``secrets``)."""
    return hashlib.sha256(f"fedfuse-simulated-site:{seed}:{partition_id}".encode()).digest()
