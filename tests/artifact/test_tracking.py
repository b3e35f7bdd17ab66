"""Experiment tracking in MLflow (``[tracking]``), against a real local MLflow store read
back through MLflow's client API: the scenario as params, every round's figures as step
metrics, the results and the artifact; a resumed run continues its MLflow run; a
tracking failure never fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedfuse.artifact.tracking import Tracker, flatten, round_metrics, round_step
from fedfuse.config import config_from_dict
from fedfuse.coordinator.records import CohortRound, RoundRecord
from tests.helpers import SMALL_SCENARIO, run_cli


def test_the_scenario_flattens_to_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, {"f": "x"}], "g": "s"}) == {
        "a.b": "1", "a.c.d": "null", "e": '[1, {"f": "x"}]', "g": "s"}


def test_round_figures_become_step_metrics():
    record = RoundRecord(3, {"cnn": CohortRound(val_accuracy=0.5, max_epsilon=2.0),
                             "mlp": CohortRound(train_loss=1.25, max_epsilon=3.5)})
    assert round_metrics(record) == {"cnn/val_accuracy": 0.5, "cnn/max_epsilon": 2.0,
                                     "mlp/train_loss": 1.25, "mlp/max_epsilon": 3.5,
                                     "max_epsilon": 3.5}
    assert round_step(record, 30) == 3
    assert round_step(RoundRecord("stacking 2"), 30) == 32
    assert round_metrics(RoundRecord(1, {"cnn": CohortRound()})) == {}


@pytest.fixture(autouse=True)
def file_stores(monkeypatch):
    """MLflow 3 reads ``file:`` stores only with this opt-in (fedfuse's tracker sets it
    for its own process; this test process reads the store back)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def only_run(store: str):
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("fedfuse")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path):
    store = f"file:{tmp_path / 'mlruns'}"
    cfg = config_from_dict({"name": "t", "rounds": 2, "tracking": {"mlflow_uri": store},
                            "cohorts": [{"arch": "logreg", "clients": 3}]})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = Tracker(cfg, run_dir, resume=False)
    first.on_start([], 2)
    first.on_round(RoundRecord(1, {"logreg": CohortRound(val_accuracy=0.4)}))
    first.close("KILLED")  # the process dies after round 1
    state = json.loads((run_dir / "tracking.json").read_text())
    again = Tracker(cfg, run_dir, resume=True)
    again.on_start([], 2)
    again.on_round(RoundRecord(2, {"logreg": CohortRound(val_accuracy=0.6)}))
    (run_dir / "summary.json").write_text("{}")
    again.finish(run_dir, {"fused": {"method": "soft_vote", "test_accuracy": 0.7}})
    client, run = only_run(store)
    assert run.info.run_id == state["run_id"] and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "logreg/val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.4), (2, 0.6)]
    assert run.data.metrics["fused/test_accuracy"] == 0.7
    assert run.data.tags["fedfuse.fusion"] == "soft_vote"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]


@pytest.mark.slow
def test_a_simulation_is_logged_to_a_local_mlflow_store(tmp_path: Path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SMALL_SCENARIO)
    store = f"file:{tmp_path / 'mlruns'}"
    proc = run_cli("simulate", scenario, "--out", tmp_path / "run", "--rounds", "2",
                   "--set", f'tracking.mlflow_uri="{store}"')
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-seed3"
    params = run.data.params
    assert params["rounds"] == "2" and params["partition.alpha"] == "0.5"
    assert json.loads(params["cohorts"])[0]["arch"] == "cnn"
    assert run.data.tags["fedfuse.privacy"] == "off"
    assert run.data.tags["fedfuse.secure_aggregation"] == "true"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert run.data.tags["fedfuse.fusion"] == summary["fused"]["method"]
    for cohort, figures in summary["cohorts"].items():
        history = client.get_metric_history(run.info.run_id, f"{cohort}/test_accuracy")
        assert [m.step for m in history] == [1, 2]
        assert history[-1].value == pytest.approx(figures["test_accuracy"])
    assert run.data.metrics["fused/test_accuracy"] == pytest.approx(
        summary["fused"]["test_accuracy"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "accuracy.png", "model"} <= files
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/manifest.json" in model
    recorded = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert recorded["run_id"] == run.info.run_id


@pytest.mark.slow
def test_a_tracking_failure_never_fails_the_run(tmp_path: Path):
    (tmp_path / "not-a-dir").write_text("a file where the store should be")
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SMALL_SCENARIO)
    proc = run_cli("simulate", scenario, "--out", tmp_path / "run", "--rounds", "1",
                   "--set", f'tracking.mlflow_uri="file:{tmp_path / "not-a-dir" / "mlruns"}"')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("MLflow tracking at") == 1, proc.stderr[-3000:]
    assert "the run goes on without it" in proc.stderr
    assert (tmp_path / "run" / "model" / "manifest.json").exists()
