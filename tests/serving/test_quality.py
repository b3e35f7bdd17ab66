"""Model-quality monitoring against a real ``fedfuse serve``: drift scores move when the
served inputs shift, per version, on the quality endpoint and in Prometheus."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from fedfuse.artifact.manifest import EnsembleMember, write_artifact
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.models.registry import build_model, set_standardization
from fedfuse.models.spec import ModelSpec
from fedfuse.serving.quality import decayed_update, drift_scores
from tests.serving.test_serve import metric
from tests.helpers import ROOT, Server


def standardised_artifact(path, X: np.ndarray, schema, semver: str) -> None:
    """Two digits members standardising with the data's own per-feature moments, as a
    federation's pooled moments would."""
    mean, std = X.mean(axis=0), np.maximum(X.std(axis=0), 1e-6)
    members = []
    for i, arch in enumerate(("mlp", "logreg")):
        model = build_model(arch, schema, seed=i)
        set_standardization(model, mean, std)
        members.append(EnsembleMember(arch, ModelSpec(arch), model.state_dict(), 3, 0.5))
    write_artifact(path, members=members, weights=np.array([0.5, 0.5]), method="soft_vote",
                   schema=schema, fusion_fit={"objective": "brier"},
                   privacy={"mode": "off", "max_epsilon": None, "delta": None},
                   fused_test_accuracy=0.5, semver=semver)


def test_decayed_sums_follow_the_recent_inputs():
    rng = np.random.default_rng(0)
    sums = np.zeros((3, 4))
    for _ in range(20):
        sums = decayed_update(sums, rng.normal(0, 1, (50, 4)), half_life=100)
    shift, spread = drift_scores(sums)
    assert shift < 0.15 and 0.9 < spread < 1.1
    for _ in range(20):  # every feature moved by 2 standard deviations, spread doubled
        sums = decayed_update(sums, rng.normal(2, 2, (50, 4)), half_life=100)
    shift, spread = drift_scores(sums)
    assert 1.8 < shift < 2.2 and 1.7 < spread < 2.3


def test_drift_moves_when_the_served_inputs_shift(tmp_path):
    data = load_dataset(DataConfig())
    X = data.X.astype(np.float32)
    standardised_artifact(tmp_path / "registry" / "v1", X, data.schema, "1.0.0")
    standardised_artifact(tmp_path / "registry" / "v2", X, data.schema, "1.1.0")
    with Server(tmp_path / "registry") as server, httpx.Client(base_url=server.url) as http:
        def send(rows: np.ndarray, path: str = "/v1/predict") -> None:
            for i in range(0, len(rows), 200):
                answer = http.post(path, json={"instances": rows[i:i + 200].tolist()})
                assert answer.status_code == 200, answer.text

        versions = [v["model_version"] for v in http.get("/v1/models").json()["versions"]]
        send(X[:1000])
        calm = http.get("/v1/models/1.1.0/quality").json()
        assert calm["model_version"] == versions[1] and calm["instances"] == 1000
        assert calm["drift"]["mean_shift"] < 0.3
        assert sum(calm["predicted_classes"].values()) == pytest.approx(1.0)
        assert 0 < calm["mean_confidence"] <= 1
        std = X.std(axis=0)
        send(X[:1000] + 3 * std)  # every feature 3 training standard deviations away
        shifted = http.get("/v1/models/1.1.0/quality").json()
        assert shifted["drift"]["mean_shift"] > 2.0 > calm["drift"]["mean_shift"] + 1.0
        assert metric(server, "fedfuse_input_drift_mean_shift", version=versions[1]) == \
            pytest.approx(shifted["drift"]["mean_shift"], rel=1e-3)
        # per version: the pinned version saw none of it
        untouched = http.get("/v1/models/1.0.0/quality").json()
        assert untouched["instances"] == 0 and untouched["drift"] is None
        send(X[:200], "/v1/models/1.0.0/predict")
        assert http.get("/v1/models/1.0.0/quality").json()["instances"] == 200
        assert http.get("/v1/models/9.9.9/quality").status_code == 404
        total = sum(metric(server, "fedfuse_predicted_class_total", version=versions[1],
                           label=lab) for lab in data.schema.class_labels)
        assert total == 2000
        # every series the shipped Grafana dashboard plots is one the server exports
        exported = {line.split("{")[0].split(" ")[0] for line in
                    http.get("/metrics").text.splitlines() if not line.startswith("#")}
        dashboard = json.loads((ROOT / "docs" / "grafana" / "fedfuse-serving.json").read_text())
        plotted = {name for p in dashboard["panels"] for t in p["targets"]
                   for name in re.findall(r"fedfuse_[a-z_]+", t["expr"])}
        assert len(plotted) >= 8 and plotted <= exported, plotted - exported
