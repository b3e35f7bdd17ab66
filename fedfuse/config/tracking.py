"""``[tracking]``: where a run is logged for comparison with others (MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from fedfuse.config.sections import check


@dataclass
class TrackingConfig:
    """Experiment tracking in MLflow (extra ``fedfuse[tracking]``); off while
    ``mlflow_uri`` is empty. The ``fedfuse`` commands fill ``mlflow_uri`` from MLflow's
    own ``MLFLOW_TRACKING_URI`` when the scenario sets none."""

    mlflow_uri: str = ""
    """An MLflow tracking URI: ``sqlite:///mlflow.db`` (MLflow 3's default store), a
    ``file:`` directory, or a tracking server's ``http(s)://`` address."""
    experiment: str = "fedfuse"
    """The MLflow experiment the run goes into (created when missing)."""
    run_name: str = ""
    """The MLflow run's name; default the scenario's name and seed."""

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "experiment", "must not be empty")
