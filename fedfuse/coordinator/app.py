"""The fedfuse ServerApp of a simulation: the coordinator's loop inside Flower's
``ServerApp`` (a deployment's is ``fedfuse.deploy.apps.server_app``)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.checkpoint import Checkpoint
from fedfuse.coordinator.loop import Coordinator
from fedfuse.coordinator.records import RoundListener
from fedfuse.data.datasets import Dataset


def build_server_app(cfg: FedfuseConfig, test: Dataset, listener: RoundListener,
                     checkpoints: Path | None = None,
                     resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp running ``cfg``'s cohorts and evaluating them on ``test``; with
    ``checkpoints`` it saves its state there after every round, and with ``resume`` it
    continues after that checkpoint's round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        Coordinator(cfg, test, listener, checkpoints=checkpoints,
                    max_in_flight=cfg.simulation.max_in_flight).run(grid, resume)

    return app
