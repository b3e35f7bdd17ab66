"""Experiment tracking in MLflow: a run's settings, every round's figures and its results,
logged where ten runs can be compared side by side (``[tracking] mlflow_uri``).

A :class:`Tracker` is one more listener of the coordinator's rounds. It logs:

- at the start, the resolved scenario as params (dotted keys: ``privacy.target_epsilon``)
  and tags for the privacy mode, secure aggregation and the scenario;
- every round, each cohort's training, validation and test figures and its largest ε as
  step metrics (``cnn/val_accuracy`` at step r; a stacking round k after the last
  training round R at step R + k), and the largest ε over all sites (``max_epsilon``);
- when the run is published, the fused model's test accuracy, a tag for the fusion
  method, and ``summary.json``, ``privacy.json``, ``accuracy.png`` and the fused
  artifact (``model/``) as artifacts.

The run's MLflow id is kept in the run directory (``tracking.json``), so ``fedfuse
simulate --resume`` continues the same MLflow run. MLflow is called from a thread of its
own, so a slow or unreachable tracking server never holds up a round; the first failure
is logged once and tracking stops for the run, which goes on. Publishing waits at most
``FINISH_TIMEOUT`` seconds for what is still queued.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfuse.atomic import atomic_write_text
from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.records import FederationResult, Participant, RoundRecord

log = logging.getLogger(__name__)

STATE = "tracking.json"
"""The run directory's record of its MLflow run: tracking URI, experiment, run id."""
FINISH_TIMEOUT = 60.0
"""Seconds publishing a run waits for queued tracking calls before it gives up on them."""
ROUND_FIGURES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                 "test_accuracy", "max_epsilon")
"""The per-cohort figures of a round that become step metrics."""
ARTIFACTS = ("summary.json", "privacy.json", "accuracy.png")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}``: nested tables
    become dotted keys; lists (the cohorts) are written as JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def round_step(record: RoundRecord, rounds: int) -> int:
    """The MLflow step of a round: its number; stacking round k (``"stacking k"``) after
    the ``rounds`` training rounds is step ``rounds + k``."""
    if isinstance(record.round, int):
        return record.round
    return rounds + int(str(record.round).rsplit(" ", 1)[-1])


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """``{cohort}/{figure}`` for every figure of :data:`ROUND_FIGURES` the round has, and
    ``max_epsilon``, the largest over the cohorts (when any site ran with DP)."""
    metrics: dict[str, float] = {}
    for cohort, figures in record.cohorts.items():
        for name in ROUND_FIGURES:
            value = getattr(figures, name)
            if value is not None:
                metrics[f"{cohort}/{name}"] = float(value)
    spent = [c.max_epsilon for c in record.cohorts.values() if c.max_epsilon is not None]
    if spent:
        metrics["max_epsilon"] = max(spent)
    return metrics


class Tracker:
    """Logs one fedfuse run to one MLflow run (module docstring); a ``RoundListener``."""

    def __init__(self, cfg: FedfuseConfig, run_path: Path, resume: bool) -> None:
        self.cfg, self.run_path, self.resume = cfg, run_path, resume
        self.rounds = cfg.rounds
        self.run_id: str | None = None
        self.client: Any = None
        self.started = self.failed = False
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.worker = threading.Thread(target=self._work, name="fedfuse-mlflow", daemon=True)
        self.worker.start()

    # -- the coordinator's events (queued; never wait on MLflow) ------------------------

    def on_start(self, participants: list[Participant], rounds: int) -> None:
        """The run directory exists now: open (or, resuming, reopen) the MLflow run."""
        self.rounds, self.started = rounds, True
        self.jobs.put(self._open)

    def on_round(self, record: RoundRecord) -> None:
        step, metrics = round_step(record, self.rounds), round_metrics(record)
        self.jobs.put(lambda: self._log(metrics, step))

    def on_finish(self, result: FederationResult) -> None:
        return None

    def finish(self, final: Path, summary: Mapping[str, Any]) -> None:
        """The published run's results and files; then the MLflow run ends FINISHED."""
        fused = summary.get("fused") or {}
        metrics = {"fused/test_accuracy": float(fused["test_accuracy"])} if fused else {}
        tags = {"fedfuse.fusion": str(fused.get("method", "none"))}
        self.jobs.put(lambda: self._log(metrics, self.rounds, tags))
        self.jobs.put(lambda: self._upload(final))
        self.close("FINISHED")

    def close(self, status: str) -> None:
        """End the MLflow run with ``status`` and stop the worker, waiting at most
        :data:`FINISH_TIMEOUT` seconds for what is queued."""
        if self.started:
            self.jobs.put(lambda: self.client.set_terminated(self.run_id, status=status))
        self.jobs.put(None)
        self.worker.join(FINISH_TIMEOUT)
        if self.worker.is_alive():
            log.warning("MLflow tracking at %s did not finish within %.0f s; the run "
                        "directory has everything", self.cfg.tracking.mlflow_uri,
                        FINISH_TIMEOUT)

    # -- the worker: every MLflow call ---------------------------------------------------

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.failed:
                continue
            try:
                job()
            except Exception as exc:  # a tracking failure never fails the run
                self.failed = True
                log.warning("MLflow tracking at %s failed (%s: %s); the run goes on "
                            "without it", self.cfg.tracking.mlflow_uri, type(exc).__name__,
                            exc)

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        track = self.cfg.tracking
        if track.mlflow_uri.startswith("file:"):  # MLflow 3 keeps file stores behind a flag
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=track.mlflow_uri)
        state = self.run_path / STATE
        if self.resume and state.exists():
            self.run_id = str(json.loads(state.read_text())["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(track.experiment)
        experiment = (found.experiment_id if found is not None
                      else self.client.create_experiment(track.experiment))
        tags = {"fedfuse.scenario": self.cfg.name, "fedfuse.privacy": self.cfg.privacy.mode,
                "fedfuse.secure_aggregation": str(self.cfg.secure_aggregation.enabled).lower()}
        run = self.client.create_run(experiment, tags=tags, run_name=track.run_name or
                                     f"{self.cfg.name}-seed{self.cfg.seed}")
        self.run_id = run.info.run_id
        atomic_write_text(state, json.dumps({"mlflow_uri": track.mlflow_uri,
                                             "experiment": track.experiment,
                                             "run_id": self.run_id}, indent=2))
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in sorted(flatten(self.cfg.to_dict()).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _log(self, metrics: Mapping[str, float], step: int,
             tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id,
                              metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def _upload(self, final: Path) -> None:
        for name in ARTIFACTS:
            if (final / name).exists():
                self.client.log_artifact(self.run_id, str(final / name))
        if (final / "model").is_dir():
            self.client.log_artifacts(self.run_id, str(final / "model"), artifact_path="model")


class NoTracking:
    """What runs when ``[tracking]`` names no URI: nothing."""

    def on_start(self, participants: list[Participant], rounds: int) -> None:
        return None

    def on_round(self, record: RoundRecord) -> None:
        return None

    def on_finish(self, result: FederationResult) -> None:
        return None

    def finish(self, final: Path, summary: Mapping[str, Any]) -> None:
        return None

    def close(self, status: str) -> None:
        return None


@contextmanager
def tracking(cfg: FedfuseConfig, run_path: Path, resume: bool) -> Iterator[Tracker | NoTracking]:
    """The run's tracker for the run directory ``run_path`` (its partial path while it
    runs); a run that raises ends its MLflow run FAILED."""
    tracker: Tracker | NoTracking = (Tracker(cfg, run_path, resume) if cfg.tracking.mlflow_uri
                                     else NoTracking())
    try:
        yield tracker
    except BaseException:
        tracker.close("FAILED")
        raise
