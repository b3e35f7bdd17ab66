"""The Flower apps a deployed federation runs: the components of the FAB that
``fedfuse coordinator`` submits to its SuperLink.

Everything a run needs arrives in Flower's own configs:

- run config (set by the coordinator, seen by every party): ``scenario`` (the resolved
  scenario as TOML), ``class-labels`` (JSON list: the coordinator's classes, which fix
  every site's label encoding), ``run-dir`` (where the coordinator writes the run),
  ``sites`` (JSON: registered node id -> site name) and ``resume`` ("true": continue the
  interrupted run of ``run-dir`` from its last checkpoint) and ``signing-key`` (the
  coordinator's key file that signs the fused artifact; only the ServerApp reads it);
- node config (set by ``fedfuse site`` at each site, never leaves it): ``name``,
  ``data`` (the site's data file), ``state-dir`` (privacy ledger, site secret) and
  ``device`` (where the site trains).
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedfuse.artifact.progress import Fanout, ProgressDisplay
from fedfuse.artifact.rundir import RunDirectory, partial_path
from fedfuse.artifact.signing import signing_key
from fedfuse.artifact.summary import build_summary
from fedfuse.artifact.tracking import tracking
from fedfuse.atomic import create_private
from fedfuse.compat import fast_grid_pulls
from fedfuse.config import DataConfig, FedfuseConfig, config_from_dict
from fedfuse.coordinator.loop import Coordinator
from fedfuse.data.datasets import Dataset, load_dataset
from fedfuse.data.partition import train_val_split
from fedfuse.data.sites import Site, cohort_models
from fedfuse.errors import FedfuseError
from fedfuse.models.spec import CodeAllowance
from fedfuse.site.app import build_client_app
from fedfuse.site.policy import SitePolicy, load_policy

SECRET_FILE = "site-secret"
SECRET_BYTES = 32


def scenario_of(context: Context) -> FedfuseConfig:
    return config_from_dict(tomllib.loads(str(context.run_config["scenario"])))


server_app = ServerApp()


@server_app.main()
def _coordinate(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("httpx", "flwr", "alembic"):  # API calls, Flower (it logs to the run), its store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    fast_grid_pulls()
    cfg = scenario_of(context)
    test = load_dataset(cfg.data)
    sites = {int(k): str(v) for k, v in json.loads(str(context.run_config["sites"])).items()}
    display = ProgressDisplay(Console(file=sys.stdout, width=120, no_color=True))
    resume = str(context.run_config.get("resume", "")) == "true"
    out = Path(str(context.run_config["run-dir"]))
    with tracking(cfg, partial_path(out), resume) as tracker:
        key_file = str(context.run_config.get("signing-key", ""))
        signer = signing_key(Path(key_file)) if key_file else None
        with RunDirectory(out, cfg, test.schema, resume=resume, signer=signer) as run:
            checkpoint = run.resume_point() if resume else None
            Coordinator(cfg, test, Fanout(run, display, tracker), sites,
                        checkpoints=run.checkpoints).run(grid, checkpoint)
            assert run.result is not None
            summary = build_summary(cfg, run.result, time.perf_counter() - started)
            run.write_summary(summary)
        tracker.finish(run.final, summary)


_SITES: dict[tuple[str, ...], Site] = {}


def deployed_site(context: Context) -> Site:
    """This site's architecture (the cohort that lists its name) and its train/validation
    split of its own data file; cached per process and run settings."""
    node, run = context.node_config, context.run_config
    key = (str(node["name"]), str(node["data"]), str(node["state-dir"]),
           str(node.get("device", "cpu")), str(node.get("policy", "")),
           str(node.get("allow-arch", "")),
           str(run["scenario"]), str(run["class-labels"]))
    if key not in _SITES:
        cfg = scenario_of(context)
        name = str(node["name"])
        if name not in cfg.site_names:
            raise FedfuseError(f"site {name!r} is not listed in any cohort of scenario "
                               f"{cfg.name!r} (sites: {', '.join(cfg.site_names)})")
        cohort = next(c for c in cfg.cohorts if name in (c.sites or []))
        labels = tuple(json.loads(str(run["class-labels"])))
        data = load_dataset(DataConfig(source=str(node["data"]),
                                       label_column=cfg.data.label_column),
                            class_labels=labels)
        if len(data) < cfg.partition.min_samples:
            raise FedfuseError(f"site {name!r}: {node['data']} holds {len(data)} records, "
                               f"fewer than partition.min_samples = {cfg.partition.min_samples}")
        state_dir = Path(str(node["state-dir"]))
        secret = site_secret(state_dir)
        train, val = split_site_data(data, cfg.data.val_fraction, secret)
        policy = load_policy(Path(str(node["policy"])) if node.get("policy") else None)
        policy = policy.allowing(tuple(a for a in str(node.get("allow-arch", "")).split(",")
                                       if a))
        _SITES[key] = Site(name=name, index=cfg.site_names.index(name), arch=cohort.name,
                           train=train, val=val, secret=secret, state_dir=state_dir,
                           device=str(node.get("device", "cpu")), policy=policy,
                           models=cohort_models(cfg), code=site_code(policy))
    return _SITES[key]


def site_code(policy: SitePolicy) -> CodeAllowance:
    """The model code a deployed site imports: only what its operator allowed, from its
    own environment (never the scenario's ``code_dir``, which the coordinator wrote)."""
    return CodeAllowance(policy.allow_arch, how="the site's operator allows one with "
                         "`fedfuse site --allow-arch PATH` or the policy's allow_arch")


def split_site_data(data: Dataset, val_fraction: float, secret: bytes) -> tuple[Dataset, Dataset]:
    """The site's train and validation subsets, the same on every restart (seeded by the
    site's secret, so nobody else can tell which records validate)."""
    seed = int.from_bytes(secret[:8], "big")
    split = train_val_split(np.arange(len(data)), val_fraction, seed)
    return data.subset(split.train), data.subset(split.val)


def site_secret(state_dir: Path) -> bytes:
    """The site's random secret (seeds its DP noise and data split), made once and kept
    in ``state_dir`` with 0600 permissions."""
    return secret_file(state_dir, SECRET_FILE).read_bytes()


def secret_file(state_dir: Path, name: str) -> Path:
    """``state_dir/name``, holding 32 random bytes (0600) made the first time it is asked
    for; a file another process of the site made first is kept. A write that fails (a
    full disk) leaves no file; a file of any other length is refused, never used."""
    path = state_dir / name
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            create_private(path, secrets.token_bytes(SECRET_BYTES))
        except FileExistsError:  # another process of this site made it first
            pass
        except OSError as exc:
            raise FedfuseError(f"could not write the secret {path}: {exc.strerror or exc}; "
                               "nothing was kept (free space there and start again)") from None
    size = path.stat().st_size
    if size != SECRET_BYTES:
        raise FedfuseError(
            f"{path} holds {size} bytes, not the {SECRET_BYTES} random bytes of a secret: "
            "a failed write left it, or it was changed. Move it away and start again to "
            "make a new one (a new site secret also changes the site's validation split "
            "and noise seeds)")
    return path


client_app = build_client_app(deployed_site)


def run_config(cfg: FedfuseConfig, class_labels: tuple[str, ...], run_dir: Path,
               sites: dict[int, str], resume: bool = False,
               signing_key: Path | None = None) -> dict[str, Any]:
    """The run config the coordinator hands its ServerApp and every site."""
    return {"scenario": cfg.to_toml(), "class-labels": json.dumps(list(class_labels)),
            "run-dir": str(run_dir), "sites": json.dumps({str(k): v for k, v in sites.items()}),
            "resume": "true" if resume else "false",
            "signing-key": str(signing_key.resolve()) if signing_key else ""}
