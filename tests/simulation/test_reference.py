"""The default scenario's outcome, pinned: a change of behaviour has to update these on
purpose.

The cohort digests were taken from a run of commit 7bfb207 (before the package layout
of issue 21) and are reproduced bit for bit by the layout and by issue 22's fewer
exchanges. The metrics digest was retaken for issue 22: federated evaluation rides on
the train exchange, so the validation figures of round r are those of the model the
sites received in round r (what round r - 1's figures were before); every other figure
is unchanged. A change that moves the default
scenario's results (a new default, a different order of summation) must update them
and say why in its commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.helpers import ROOT, run_cli

COHORT_SHA256 = {
    "cnn": "7f8e2c844781b9a7bf23b6bccc63fc827605d4631a2621ceca8bda7a2ce9b318",
    "logreg": "bd2ca866e43a9c161652434ec9a49e0c93e6144a229d0108f7548ad2ead2f275",
    "mlp": "42269351ed45c4e1a873325fda88bb9bc756a3b5142d0b2db0ec1e4e37c1a29d",
}
"""SHA-256 over each final cohort model's tensors (name, dtype, shape, bytes; by name)."""
METRICS_SHA256 = "072787356417917fb08f159c2c8b33eb56093433d95b211798d9f9fc3a5ba88b"
"""SHA-256 of metrics.jsonl without the wall-clock times, lines joined by newlines."""
TEST_ACCURACY = {"cnn": 0.8384401114206128, "logreg": 0.8857938718662952,
                 "mlp": 0.8440111420612814}
FUSED_TEST_ACCURACY = 0.9025069637883009


def tensors_sha256(path: Path) -> str:
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}|{a.dtype}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def metrics_sha256(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_seconds", None)
        lines.append(json.dumps(record, sort_keys=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.mark.slow
def test_the_default_scenario_reproduces_its_pinned_models_and_metrics(tmp_path: Path):
    out = tmp_path / "digits"
    done = run_cli("simulate", ROOT / "simulations" / "digits.toml", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {a: c["test_accuracy"] for a, c in summary["cohorts"].items()} == TEST_ACCURACY
    assert summary["fused"]["test_accuracy"] == FUSED_TEST_ACCURACY
    assert {a: tensors_sha256(out / "cohorts" / f"{a}.safetensors")
            for a in COHORT_SHA256} == COHORT_SHA256
    assert metrics_sha256(out / "metrics.jsonl") == METRICS_SHA256
