"""Signed artifacts: a re-hashed tampered artifact, an unsigned one, one signed by another
key and a member file swapped after its check are each refused or harmless, offline and
behind ``fedfuse serve --trust``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import fedfuse.artifact.predictor as predictor_module
from fedfuse.artifact.manifest import MANIFEST, canonical_json, content_hash, sha256
from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.artifact.signing import (
    SIGNATURE,
    SIGNER_PUB,
    SignatureError,
    public_pem,
    sign_run_model,
    signing_key,
)
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from tests.helpers import Server, make_artifact, run_cli


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory's signed ``model/`` and the key file that signed it."""
    make_artifact(tmp_path / "run" / "model")
    key = tmp_path / "coordinator" / "signing-key.pem"
    sign_run_model(tmp_path / "run", signing_key(key))
    return tmp_path / "run", key


def rehash_with_tampered_member(model: Path) -> None:
    """What anyone who can write the registry can do: change a member's weights (every
    logit of class 7 raised) and recompute every hash the manifest holds."""
    rel = "members/logreg.safetensors"
    state = safetensors_load((model / rel).read_bytes())
    bias = next(k for k in state if k.endswith("bias"))
    state[bias][7] += 100.0
    data = safetensors_save(state, metadata={"arch": "logreg"})
    (model / rel).write_bytes(data)
    manifest = json.loads((model / MANIFEST).read_bytes())
    manifest["files"][rel] = sha256(data)
    manifest["content_sha256"] = content_hash(manifest)
    manifest["model_version"] = "1.0.0+" + manifest["content_sha256"][:12]
    (model / MANIFEST).write_bytes(canonical_json(manifest))


def test_the_key_is_made_private_and_signs_what_its_public_half_verifies(signed):
    run, key = signed
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (run / "model" / SIGNATURE).is_file() and (run / SIGNER_PUB).is_file()
    loaded = FusedPredictor.load(run / "model", trust=[run / SIGNER_PUB])
    assert loaded.version == FusedPredictor.load(run / "model").version
    # the same file read again is the same key
    assert signing_key(key).public_key().public_bytes_raw() == \
        signing_key(key).public_key().public_bytes_raw()


def test_a_rehashed_tampered_artifact_loads_by_hashes_but_not_by_signature(signed, tmp_path):
    run, _ = signed
    trusted = tmp_path / "trusted.pub"  # the copy taken out of band
    trusted.write_bytes((run / SIGNER_PUB).read_bytes())
    x = load_dataset(DataConfig()).X[:50]
    rehash_with_tampered_member(run / "model")
    forged = FusedPredictor.load(run / "model")  # every hash agrees: the attack works
    assert (forged.predict(x) == "7").mean() > 0.9
    with pytest.raises(SignatureError, match="does not match the manifest"):
        FusedPredictor.load(run / "model", trust=[trusted])


def test_unsigned_and_otherwise_signed_artifacts_are_refused(signed, tmp_path):
    run, key = signed
    trusted = tmp_path / "coordinator.pub"  # the coordinator's public half, kept apart
    trusted.write_bytes(public_pem(signing_key(key).public_key()))
    (run / "model" / SIGNATURE).unlink()
    with pytest.raises(SignatureError, match="not signed"):
        FusedPredictor.load(run / "model", trust=[trusted])
    sign_run_model(run, signing_key(tmp_path / "other.pem"))  # a key nobody trusts
    with pytest.raises(SignatureError, match="which is not trusted"):
        FusedPredictor.load(run / "model", trust=[trusted])
    (run / "model" / SIGNATURE).write_text('{"algorithm": "ed25519", "key_id": 1}')
    with pytest.raises(SignatureError, match="malformed signature"):
        FusedPredictor.load(run / "model", trust=[trusted])


def test_a_member_swapped_after_its_check_is_not_what_loads(signed, monkeypatch):
    """The bytes checked are the bytes loaded: a file swapped on disk right after the
    verification (the race a two-read loader had) changes nothing."""
    run, _ = signed
    model = run / "model"
    x = load_dataset(DataConfig()).X[:50]
    honest = FusedPredictor.load(model).predict_proba(x)
    real = predictor_module.read_verified
    rel = model / "members" / "logreg.safetensors"
    state = safetensors_load(rel.read_bytes())
    bias = next(k for k in state if k.endswith("bias"))
    state[bias][7] += 100.0
    evil = safetensors_save(state, metadata={"arch": "logreg"})

    def verified_then_swapped(directory, trust=None):
        checked = real(directory, trust)
        rel.write_bytes(evil)  # the attacker wins the race
        return checked

    monkeypatch.setattr(predictor_module, "read_verified", verified_then_swapped)
    loaded = FusedPredictor.load(model, trust=[run / SIGNER_PUB])
    assert rel.read_bytes() == evil
    np.testing.assert_array_equal(loaded.predict_proba(x), honest)


def test_serve_trust_refuses_a_forged_artifact_and_serves_a_signed_one(signed, tmp_path):
    run, key = signed
    trusted = tmp_path / "trusted.pub"
    trusted.write_bytes((run / SIGNER_PUB).read_bytes())
    with Server(run / "model", "--trust", trusted) as server:
        assert "serving model version" in server.output()
    rehash_with_tampered_member(run / "model")
    with pytest.raises(RuntimeError, match="does not match the manifest"):
        with Server(run / "model", "--trust", trusted):
            pass
    bad = run_cli("serve", run / "model", "--trust", tmp_path / "absent.pub")
    assert bad.returncode == 2 and "trusted key" in bad.stderr and "not found" in bad.stderr


def test_export_evaluate_and_compress_refuse_a_forged_artifact(signed, tmp_path):
    """``--trust`` on export and evaluate; compress, which re-signs, demands its own key's
    signature on the source, so a re-hashed tampered artifact is never laundered."""
    run, key = signed
    trusted = tmp_path / "trusted.pub"
    trusted.write_bytes((run / SIGNER_PUB).read_bytes())
    data = tmp_path / "digits.npz"
    digits = load_dataset(DataConfig())
    np.savez(data, X=digits.X[:40], y=digits.y[:40])
    ok = run_cli("evaluate", run / "model", "--data", data, "--trust", trusted,
                 "--png", tmp_path / "cm.png")
    assert ok.returncode == 0, ok.stderr
    rehash_with_tampered_member(run / "model")
    for args in (("export", run / "model", "--out", tmp_path / "m.onnx"),
                 ("evaluate", run / "model", "--data", data, "--png", tmp_path / "cm2.png")):
        refused = run_cli(*args, "--trust", trusted)
        assert refused.returncode == 2 and "does not match the manifest" in refused.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "cm2.png").exists()
    laundered = run_cli("compress", run / "model", "--int8", "--out", tmp_path / "small",
                        "--signing-key", key)
    assert laundered.returncode == 2 and "does not match the manifest" in laundered.stderr
    assert not (tmp_path / "small").exists()
