"""``fedfuse simulate``: run a scenario on Flower's simulation engine into a run directory."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from rich.console import Console

from fedfuse.artifact.progress import Fanout, ProgressDisplay
from fedfuse.artifact.rundir import RunDirectory, partial_path
from fedfuse.artifact.summary import build_summary
from fedfuse.artifact.tracking import tracking
from fedfuse.compat import message_pickup, run_simulation
from fedfuse.config import FedfuseConfig
from fedfuse.config.preflight import check_scenario
from fedfuse.coordinator.app import build_server_app
from fedfuse.data.partition import label_skew
from fedfuse.data.sites import Site, plan_federation, simulated_site
from fedfuse.models.device import ray_gpus
from fedfuse.simulation.engine import pickup_interval
from fedfuse.site.app import build_client_app


def default_run_dir(cfg: FedfuseConfig, root: Path = Path("runs")) -> Path:
    return root / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def site_from_context(cfg: FedfuseConfig, state_root: Path | None, context: Context) -> Site:
    """The simulated client behind a Flower node: its ``partition-id`` picks its split;
    its state lives under ``state_root`` so that it outlives the engine (resume)."""
    return simulated_site(cfg, int(context.node_config["partition-id"]), state_root)


def backend_config(cfg: FedfuseConfig, gpus: int = 0) -> dict[str, Any]:
    """Ray's resources for ``cfg``: ``num_cpus`` in all and ``cpus_per_client`` each; on a
    GPU device, ``gpus`` GPUs shared by the clients that run at once (or
    ``gpus_per_client`` each). Ray hides the GPUs from a client that reserves none."""
    sim = cfg.simulation
    per_client = 0.0
    if gpus:
        per_client = sim.gpus_per_client or 1.0 / max(1, int(sim.num_cpus / sim.cpus_per_client))
    logs = {"log_to_driver": sim.verbose,
            "logging_level": logging.INFO if sim.verbose else logging.ERROR}
    # an existing cluster brings its own resources: ray.init refuses num_cpus/num_gpus
    where = ({"address": sim.ray_address} if sim.ray_address else
             {"num_cpus": sim.num_cpus, "num_gpus": gpus, "include_dashboard": False})
    return {"client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": per_client},
            "init_args": {**where, **logs}}


def simulate(cfg: FedfuseConfig, out: Path | None = None, console: Console | None = None,
             resume: bool = False, signer: Ed25519PrivateKey | None = None
             ) -> tuple[dict[str, Any], Path]:
    """Run ``cfg`` end to end; returns the summary and the published run directory.

    All input is checked (data loadable, architectures compatible, enough examples per
    client) before the run directory is created. With ``resume``, ``out`` is an
    interrupted run, continued from its newest checkpoint that verifies. ``signer``
    signs the fused artifact.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    plan = plan_federation(cfg)
    train_parts = [c.train for c in plan.federation.clients]
    check_scenario(cfg, plan.dataset.schema, plan.test, [len(p) for p in train_parts])
    gpus = ray_gpus(cfg.device)
    out = out or default_run_dir(cfg)
    display = ProgressDisplay(console)
    with tracking(cfg, partial_path(out), resume) as tracker:
        with RunDirectory(out, cfg, plan.dataset.schema, resume=resume, signer=signer) as run:
            checkpoint = run.resume_point() if resume else None
            server_app = build_server_app(cfg, plan.test, Fanout(run, display, tracker),
                                          run.checkpoints, checkpoint)
            client_app = build_client_app(partial(site_from_context, cfg, run.path / "sites"),
                                          cfg.simulation.threads_per_client)
            interval = pickup_interval(cfg.num_clients, cfg.simulation.pickup_interval)
            try:
                with message_pickup(interval):
                    run_simulation(server_app, client_app, cfg.num_clients,
                                   backend_config(cfg, gpus), cfg.simulation.verbose)
            finally:
                display.close()
            if run.result is None:
                raise RuntimeError("the simulation ended without a result")
            summary = build_summary(cfg, run.result, time.perf_counter() - started,
                                    label_skew(plan.dataset.y, train_parts))
            summary["ray"] = {"address": cfg.simulation.ray_address or "local",
                              "num_cpus": None if cfg.simulation.ray_address else
                              cfg.simulation.num_cpus}
            run.write_summary(summary)
        tracker.finish(run.final, summary)
    return summary, run.final
