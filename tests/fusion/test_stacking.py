import math

import numpy as np
import pytest
import torch

from fedfuse.artifact.export import export_model, run_exported
from fedfuse.artifact.manifest import ArtifactError, EnsembleMember, write_artifact
from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import DataConfig, config_from_dict
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.fusion.soft_vote import fuse_proba
from fedfuse.fusion.stacking import (
    StackedModel,
    build_head,
    initial_head,
    load_head,
    member_shares,
    stack_features,
)
from fedfuse.models.spec import ModelSpec
from fedfuse.models.registry import build_model, readout
from fedfuse.models.training import predict_proba

ARCHS = ("cnn", "mlp", "logreg")


@pytest.fixture(scope="module")
def setting():
    data = load_dataset(DataConfig())
    members = [build_model(a, data.schema, seed=i) for i, a in enumerate(ARCHS)]
    for model in members:  # a random read-out instead of the zero one: distinct votes
        torch.nn.init.normal_(readout(model).weight, std=0.5)
    return data, members


def test_the_starting_head_makes_the_soft_votes_decisions(setting):
    data, members = setting
    weights = np.array([0.5, 0.3, 0.2])
    X = data.X[:200]
    z = stack_features(members, X)
    assert z.shape == (200, 3 * 10) and z.dtype == np.float32
    head = initial_head(weights, 10)
    logits = head(torch.as_tensor(z)).detach().numpy()
    vote = fuse_proba([predict_proba(m, X) for m in members], weights)
    # logits = τ q_w(x) with τ = ln(9 (K - 1))
    np.testing.assert_allclose(logits, math.log(81) * vote, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(1) == vote.argmax(1)).all()
    np.testing.assert_allclose(member_shares(head.weight.detach().numpy(), 3), weights,
                               rtol=1e-6)


def test_the_stacked_model_is_the_head_over_the_members_probabilities(setting):
    data, members = setting
    head = build_head(3, 10)
    torch.nn.init.normal_(head.weight, std=2.0)
    X = data.X[:64]
    W, c = head.weight.detach().numpy(), head.bias.detach().numpy()
    expected = np.hstack([predict_proba(m, X) for m in members]) @ W.T + c
    got = StackedModel(members, head)(torch.as_tensor(X)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    reloaded = load_head({k: v.clone() for k, v in head.state_dict().items()})
    assert reloaded.in_features == 30 and reloaded.out_features == 10
    np.testing.assert_array_equal(reloaded.weight.detach().numpy(), W)


def test_member_shares_follow_the_head_blocks():
    W = np.hstack([np.full((2, 2), 3.0), np.zeros((2, 2)), np.full((2, 2), 1.0)])
    np.testing.assert_allclose(member_shares(W, 3), [0.75, 0.0, 0.25])


def test_a_stacked_artifact_round_trips_and_refuses_a_tampered_head(setting, tmp_path):
    data, members = setting
    head = initial_head(np.array([0.2, 0.3, 0.5]), 10)
    with torch.no_grad():
        head.bias.copy_(torch.linspace(-1, 1, 10))
    path = tmp_path / "model"
    manifest = write_artifact(
        path, members=[EnsembleMember(a, ModelSpec(a), m.state_dict(), 2, None)
                       for a, m in zip(ARCHS, members)],
        weights=np.array([0.2, 0.3, 0.5]), method="stack", schema=data.schema,
        fusion_fit={}, privacy={"mode": "off"}, fused_test_accuracy=None,
        head=head.state_dict())
    assert manifest["fusion"]["head"] == "head.safetensors"
    assert "head.safetensors" in manifest["files"]
    predictor = FusedPredictor.load(path)
    X = data.X[:50]
    expected = torch.softmax(StackedModel(members, head)(torch.as_tensor(X)), 1)
    np.testing.assert_allclose(predictor.predict_proba(X), expected.detach().numpy(),
                               atol=1e-6)
    for fmt in ("onnx", "torchscript"):  # the whole stacked graph exports
        out = tmp_path / f"stacked.{fmt}"
        export_model(predictor, out, fmt)
        np.testing.assert_allclose(run_exported(out, fmt, X), predictor.predict_proba(X),
                                   atol=1e-5)
    original = (path / "head.safetensors").read_bytes()
    for offset in (0, len(original) // 2, len(original) - 2):
        data_ = bytearray(original)
        data_[offset] ^= 0x01
        (path / "head.safetensors").write_bytes(bytes(data_))
        with pytest.raises(ArtifactError, match="head.safetensors"):
            FusedPredictor.load(path)
    (path / "head.safetensors").unlink()
    with pytest.raises(ArtifactError, match="incomplete artifact, head.safetensors"):
        FusedPredictor.load(path)


def test_stacking_settings_are_checked():
    base = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 3},
                                     {"arch": "logreg", "clients": 3}]}
    with pytest.raises(ConfigError, match="fusion.stacking_rounds: method \"stack\" needs"):
        config_from_dict({**base, "fusion": {"method": "stack"}})
    with pytest.raises(ConfigError, match="fusion.stacking_lr"):
        config_from_dict({**base, "fusion": {"stacking_rounds": 2, "stacking_lr": -1.0}})
    cfg = config_from_dict({**base, "fusion": {"stacking_rounds": 3}})
    assert cfg.fusion.stacks
    soft = config_from_dict({**base, "fusion": {"stacking_rounds": 3, "method": "soft_vote"}})
    assert not soft.fusion.stacks  # nothing would use the head
