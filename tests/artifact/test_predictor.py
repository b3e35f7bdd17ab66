"""The fused artifact as a predictor: its output, its verification, its input checks."""

import json

import numpy as np
import pytest
import torch

from fedfuse.artifact.manifest import ArtifactError, InputError
from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.fusion.soft_vote import fuse_proba
from fedfuse.models.registry import build_model
from fedfuse.models.training import predict_proba
from tests.helpers import make_artifact


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "model"
    members, weights, schema = make_artifact(path)
    return path, members, weights, schema


def test_fused_output_is_the_weighted_member_combination(artifact):
    path, members, weights, schema = artifact
    predictor = FusedPredictor.load(path)
    X = load_dataset(DataConfig()).X[:64]
    probas = []
    for m in members:
        model = build_model(m.arch, schema)
        model.load_state_dict(m.state)
        probas.append(predict_proba(model, X))
    expected = fuse_proba(probas, weights)
    got = predictor.predict_proba(X)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert list(predictor.predict(X)) == [schema.class_labels[i] for i in expected.argmax(1)]


def test_save_load_round_trip_gives_identical_predictions(artifact):
    path, *_ = artifact
    X = load_dataset(DataConfig()).X[:100]
    a, b = FusedPredictor.load(path), FusedPredictor.load(path)
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model_version"].startswith("1.0.0+")
    assert manifest["model_version"] == a.version
    assert {m["arch"] for m in manifest["members"]} == {"cnn", "mlp", "logreg"}
    for entry, model in zip(manifest["members"], a.model.members):
        assert entry["parameters"] == sum(p.numel() for p in model.parameters()) > 0
    assert set(manifest["files"]) == {f"members/{a}.safetensors" for a in ("cnn", "mlp", "logreg")}


def test_a_flipped_byte_in_any_file_is_refused(artifact):
    path, *_ = artifact
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert len(files) == 4
    for file in files:
        original = file.read_bytes()
        for offset in (0, len(original) // 2, len(original) - 2):
            data = bytearray(original)
            data[offset] ^= 0x01
            file.write_bytes(bytes(data))
            with pytest.raises(ArtifactError):
                FusedPredictor.load(path)
        file.write_bytes(original)
    FusedPredictor.load(path)


def test_incomplete_artifact_is_refused(artifact):
    path, *_ = artifact
    (path / "members" / "mlp.safetensors").unlink()
    with pytest.raises(ArtifactError, match="incomplete artifact, members/mlp.safetensors"):
        FusedPredictor.load(path)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        FusedPredictor.load(path / "members")


@pytest.mark.parametrize("X, needle", [
    (np.zeros((2, 64), dtype=np.float32), "input shape (2, 64) does not match (n, 1, 8, 8)"),
    (np.zeros((1, 8, 8)), "input shape (1, 8, 8)"),
    (np.array([["a"] * 64]).reshape(1, 1, 8, 8), "not numeric"),
    (np.full((3, 1, 8, 8), np.nan), "NaN or infinite values in instance(s) [0, 1, 2]"),
    (np.zeros((0, 1, 8, 8)), "no instances"),
    ([[1, 2], [3]], "not a rectangular array"),
])
def test_bad_input_gets_a_clear_error(artifact, X, needle):
    predictor = FusedPredictor.load(artifact[0])
    with pytest.raises(InputError) as err:
        predictor.predict_proba(X)
    assert needle in str(err.value)


def test_integer_input_is_accepted(artifact):
    predictor = FusedPredictor.load(artifact[0])
    X = load_dataset(DataConfig()).X[:5]
    np.testing.assert_allclose(predictor.predict_proba(X.astype(np.int64)),
                               predictor.predict_proba(X), atol=1e-6)
    assert isinstance(predictor.model(torch.zeros(1, 1, 8, 8)), torch.Tensor)
