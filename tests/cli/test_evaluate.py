import json

import numpy as np
from sklearn.datasets import load_digits

from fedfuse.artifact.predictor import FusedPredictor
from tests.helpers import make_artifact, run_cli


def test_evaluate_prints_metrics_and_writes_png_and_json(tmp_path):
    model = tmp_path / "model"
    make_artifact(model)
    digits = load_digits()
    X, y = digits.data.reshape(-1, 1, 8, 8)[:200], digits.target[:200]
    data = tmp_path / "eval.npz"
    np.savez(data, X=X, y=y)
    png, report = tmp_path / "cm.png", tmp_path / "report.json"
    proc = run_cli("evaluate", model, "--data", data, "--png", png, "--json", report)
    assert proc.returncode == 0, proc.stderr
    assert "confusion matrix" in proc.stderr and "accuracy" in proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    got = json.loads(report.read_text())
    expected = float((FusedPredictor.load(model).predict(X) == y.astype(str)).mean())
    assert got["accuracy"] == expected
    cm = np.array(got["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 200
    assert np.trace(cm) / 200 == expected
    assert sum(c["support"] for c in got["per_class"].values()) == 200


def test_evaluate_refuses_a_tampered_artifact_and_foreign_labels(tmp_path):
    model = tmp_path / "model"
    make_artifact(model)
    data = tmp_path / "eval.npz"
    np.savez(data, X=np.zeros((3, 1, 8, 8)), y=np.array([0, 1, 42]))
    proc = run_cli("evaluate", model, "--data", data, "--png", tmp_path / "cm.png")
    assert proc.returncode == 2 and "labels ['42'] are not classes of this model" in proc.stderr
    member = model / "members" / "mlp.safetensors"
    raw = member.read_bytes()
    member.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    proc = run_cli("evaluate", model, "--data", data, "--png", tmp_path / "cm.png")
    assert proc.returncode == 2 and "SHA-256 does not match" in proc.stderr
    assert not (tmp_path / "cm.png").exists()
