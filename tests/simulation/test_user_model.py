"""A user's own model end to end (issue 24): a factory in a module next to the scenario,
one cohort of it beside a built-in cohort, trained with DP-SGD and secure aggregation
through Flower's engine, fused, saved, exported to ONNX and served over HTTP, with its
code imported only where allowed."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.data.sites import run_test_split
from fedfuse.models.factory import CodeNotAllowed
from tests.helpers import Server, run_cli

FACTORY = '''
from torch import nn


def small_cnn(schema, channels=6, groups=2):
    """Convolution, GroupNorm, tanh, pooling and a linear read-out, for (C, H, W)."""
    c, h, w = schema.input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(channels * (h // 2) * (w // 2), schema.num_classes))
'''

SCENARIO = """
name = "user-model"
seed = 5
rounds = 2

[[cohorts]]
arch = "mymodels:small_cnn"
params = {channels = 4}
clients = 3

[[cohorts]]
arch = "logreg"
clients = 3

[privacy]
mode = "sample"
target_epsilon = 8.0

[secure_aggregation]
enabled = true

[fusion]
method = "auto"
stacking_rounds = 1
unlabeled_fraction = 0.3
student = "small_cnn"
"""

ALLOW = "mymodels:small_cnn"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("user-model")
    (home / "mymodels.py").write_text(FACTORY)
    (home / "scenario.toml").write_text(SCENARIO)
    elsewhere = tmp_path_factory.mktemp("cwd")  # the module is found next to the scenario
    proc = run_cli("simulate", home / "scenario.toml", "--out", home / "run", "--baseline",
                   cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    (home / "simulate.out").write_text(proc.stdout + proc.stderr)
    yield home
    sys.modules.pop("mymodels", None)  # imported in this process by the tests below


@pytest.mark.slow
def test_a_user_cohort_trains_with_dp_and_secure_aggregation_and_is_fused(run):
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert set(summary["cohorts"]) == {"small_cnn", "logreg"}
    assert summary["cohorts"]["small_cnn"]["test_accuracy"] > 0.2  # learns (10 classes)
    assert 0 < summary["privacy"]["max_epsilon"] <= 8.0
    manifest = json.loads((run / "run" / "model" / "manifest.json").read_text())
    member = next(m for m in manifest["members"] if m["arch"] == "small_cnn")
    assert member["model"]["arch"] == ALLOW and member["model"]["params"] == {"channels": 4}
    assert member["model"]["code"]["module_sha256"] == hashlib.sha256(
        (run / "mymodels.py").read_bytes()).hexdigest()
    assert member["family"] == f"user factory {ALLOW}"
    methods = summary["fused"]["methods"]  # every fusion method ran over the user cohort
    assert {"soft_vote", "stack", "distill"} <= set(methods)
    assert methods["distill"]["student"] == "small_cnn"


@pytest.mark.slow
def test_loading_imports_the_factory_only_when_allowed(run):
    with pytest.raises(CodeNotAllowed, match="'mymodels:small_cnn' is not allowed"):
        FusedPredictor.load(run / "run" / "model", search=str(run))
    # the distilled student (the user's architecture) as its own artifact
    proc = run_cli("fuse", run / "run", "--method", "distill")
    assert proc.returncode == 0, proc.stderr
    student = FusedPredictor.load(run / "run" / "model", allow_arch=("mymodels:*",),
                                  search=str(run))
    assert [m["model"]["arch"] for m in student.manifest["members"]] == [ALLOW]
    proc = run_cli("fuse", run / "run")  # back to the run's own method
    assert proc.returncode == 0, proc.stderr
    predictor = FusedPredictor.load(run / "run" / "model", allow_arch=(ALLOW,), search=str(run))
    test = run_test_split(run / "run")
    accuracy = float((predictor.predict_proba(test.X[:200]).argmax(1) == test.y[:200]).mean())
    assert accuracy > 0.3


@pytest.mark.slow
def test_export_to_onnx_and_serve_over_http(run):
    import onnxruntime as ort

    onnx = run / "fused.onnx"
    refused = run_cli("export", run / "run" / "model", "--out", onnx, cwd=run)
    assert refused.returncode == 2 and "not allowed to run here" in refused.stderr
    proc = run_cli("export", run / "run" / "model", "--out", onnx, "--allow-arch", ALLOW,
                   cwd=run)
    assert proc.returncode == 0, proc.stderr
    predictor = FusedPredictor.load(run / "run" / "model", allow_arch=(ALLOW,), search=str(run))
    X = run_test_split(run / "run").X[:32].astype(np.float32)
    session = ort.InferenceSession(str(onnx))
    exported = session.run(None, {session.get_inputs()[0].name: X})[0]
    assert np.abs(exported - predictor.predict_proba(X)).max() < 1e-4

    with Server(run / "run" / "model", "--allow-arch", ALLOW, cwd=run) as server:
        reply = httpx.post(f"{server.url}/v1/predict", json={"instances": X.tolist()})
        assert reply.status_code == 200, reply.text
        served = np.array(reply.json()["probabilities"])
        assert np.abs(served - predictor.predict_proba(X)).max() < 1e-5
    unallowed = run_cli("serve", run / "run" / "model", "--port", "0", cwd=run, timeout=60)
    assert unallowed.returncode != 0  # nothing it may load: it does not start
    assert "'mymodels:small_cnn' is not allowed to run here" in unallowed.stdout + \
        unallowed.stderr


@pytest.mark.slow
def test_the_centralised_baseline_is_in_the_summary_and_printed_against_the_run(run):
    summary = json.loads((run / "run" / "summary.json").read_text())
    base = summary["baseline"]
    assert set(base["cohorts"]) == {"small_cnn", "logreg"}
    for r in base["cohorts"].values():
        assert r["epochs"] == 2 and 0.0 < r["epsilon"] <= 8.0 and r["epsilon"] > 7.5
        assert 0.1 < r["test_accuracy"] <= 1.0
    assert base["best_test_accuracy"] == max(r["test_accuracy"]
                                             for r in base["cohorts"].values())
    assert "against federated test accuracy" in (run / "simulate.out").read_text()
    proc = run_cli("baseline", run / "scenario.toml", "--run", run / "run", "--epochs", "1",
                   "--json", run / "baseline.json")
    assert proc.returncode == 0, proc.stderr
    fused = summary["fused"]["test_accuracy"]
    assert f"{fused:.4f}" in proc.stdout + proc.stderr  # the run's fused accuracy in the federated column
    again = json.loads((run / "baseline.json").read_text())
    assert {r["epochs"] for r in again["cohorts"].values()} == {1}
