"""The models benchmark's path on a small generated image set (``--smoke``): the
default scenario with only ``data.source`` changed, DP and not, each with its
centralised baseline (the full bench runs on 10,000 images; docs/models.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_the_models_bench_runs_the_default_scenario_on_images(tmp_path):
    out = tmp_path / "models.json"
    proc = subprocess.run([sys.executable, str(ROOT / "simulations" / "bench" / "models.py"),
                           "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["setting"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"dp", "off"}
    assert set(runs["dp"]["federated"]) == set(runs["dp"]["centralised"]) == {"cnn", "mlp",
                                                                             "logreg"}
    assert 0 < runs["dp"]["epsilon"] <= 8.0 and runs["off"]["epsilon"] is None
    for r in runs.values():
        assert 0.1 <= r["fused"] <= 1.0 and 0.1 <= r["best_centralised"] <= 1.0
    assert "fused − best central" in proc.stdout
