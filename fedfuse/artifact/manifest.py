"""The fused model as a verifiable, versioned artifact, and the predictor that loads it.

Layout of an artifact directory::

    manifest.json                 canonical JSON (sorted keys, 2-space indent)
    members/<name>.safetensors    each member's weights (no pickle anywhere), by cohort name
    head.safetensors              the stacking head (fusion method "stack" only)

The manifest lists the SHA-256 of every other file, and ``content_sha256`` hashes the
manifest's own content (all keys but ``content_sha256`` and ``model_version``). The
model version is ``<semver>+<first 12 hex of content_sha256>``. On load, every hash is
recomputed, and the manifest must be byte-identical to its canonical form. A flipped
byte anywhere is therefore refused: in a member file, in a manifest value, or in the
manifest's layout.

Each member records what builds it (``model``: the built-in's name or the user
factory's import path, its params, and for user code its module's SHA-256 and
distribution version); loading a user factory's member imports only what the caller
allows (``FusedPredictor.load(..., allow_arch=...)``).
"""


from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import save as safetensors_save

from fedfuse.artifact.signing import verify_manifest
from fedfuse.atomic import atomic_write_bytes
from fedfuse.data.datasets import DataSchema
from fedfuse.errors import ArtifactError, FedfuseError
from fedfuse.fusion.stacking import HEAD
from fedfuse.models.factory import code_identity
from fedfuse.models.registry import count_parameters, family, load_model, resolved
from fedfuse.models.spec import ModelSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"


class InputError(FedfuseError):
    """Input to a predictor does not match the artifact's data schema."""


@dataclass(frozen=True)
class EnsembleMember:
    arch: str
    """The cohort's name."""
    spec: ModelSpec
    state: Mapping[str, torch.Tensor]
    cohort_clients: int
    test_accuracy: float | None

def canonical_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("content_sha256", "model_version")}
    return sha256(canonical_json(body))


def write_artifact(directory: Path, *, members: list[EnsembleMember], weights: np.ndarray,
                   method: str, schema: DataSchema, fusion_fit: dict[str, Any],
                   privacy: dict[str, Any], fused_test_accuracy: float | None,
                   semver: str = "1.0.0",
                   head: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write members (and the stacking ``head``) and the manifest into ``directory``
    (weight files first, manifest last)."""
    (directory / "members").mkdir(parents=True, exist_ok=True)
    files, entries = {}, []
    if head is not None:
        data = safetensors_save({k: v.contiguous() for k, v in head.items()},
                                metadata={"arch": HEAD})
        atomic_write_bytes(directory / HEAD_FILE, data)
        files[HEAD_FILE] = sha256(data)
    for member in members:
        rel = f"members/{member.arch}.safetensors"
        data = safetensors_save({k: v.contiguous() for k, v in member.state.items()},
                                metadata={"arch": member.arch})
        atomic_write_bytes(directory / rel, data)
        files[rel] = sha256(data)
        model = {**resolved(member.spec, schema).to_dict(), "code": code_identity(member.spec)}
        entries.append({"arch": member.arch, "family": family(member.spec), "model": model,
                        "parameters": count_parameters(load_model(member.spec, schema,
                                                                  member.state)),
                        "cohort_clients": member.cohort_clients,
                        "test_accuracy": member.test_accuracy, "file": rel})
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": entries,
        "fusion": {"method": method,
                   "weights": {m.arch: float(w) for m, w in zip(members, weights)},
                   "fit": fusion_fit, **({"head": HEAD_FILE} if head is not None else {})},
        "fused_test_accuracy": fused_test_accuracy,
        "privacy": privacy,
        "schema": schema.to_dict(),
        "files": files,
    }
    manifest["content_sha256"] = content_hash(manifest)
    manifest["model_version"] = f"{semver}+{manifest['content_sha256'][:12]}"
    atomic_write_bytes(directory / MANIFEST, canonical_json(manifest))
    return manifest


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact's manifest and files as read once and checked: loading from these
    bytes, not from the files again, leaves no window for a file swapped after its check."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    signer: str | None
    """The key id that signed the manifest, when a trusted signer was required."""


def read_verified(directory: Path, trust: Sequence[Ed25519PublicKey] | None = None
                  ) -> VerifiedArtifact:
    """``directory``'s manifest and files after checking every hash, and with ``trust``
    the manifest's signature by one of those keys; raises ArtifactError (SignatureError
    for the signature)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an artifact ({MANIFEST} is missing)")
    raw = path.read_bytes()
    signer = verify_manifest(directory, raw, trust).key_id if trust is not None else None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else "?"
        raise ArtifactError(f"{path}: unsupported artifact format {found} (this fedfuse "
                            f"reads format {FORMAT_VERSION})")
    if canonical_json(manifest) != raw:
        raise ArtifactError(f"{path}: the manifest was modified (not in its canonical form)")
    expected = content_hash(manifest)
    if manifest.get("content_sha256") != expected or \
            not str(manifest.get("model_version", "")).endswith("+" + expected[:12]):
        raise ArtifactError(f"{path}: content hash mismatch; the manifest was tampered with")
    files = {}
    for rel, digest in manifest["files"].items():
        file = directory / rel
        try:
            files[rel] = file.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactError(f"{directory}: incomplete artifact, {rel} is missing") from None
        if sha256(files[rel]) != digest:
            raise ArtifactError(f"{file}: SHA-256 does not match the manifest; file corrupted "
                                "or tampered with")
    return VerifiedArtifact(manifest, files, signer)


def read_verified_manifest(directory: Path, trust: Sequence[Ed25519PublicKey] | None = None
                           ) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every hash (and the signature when
    ``trust`` is given); raises ArtifactError."""
    return read_verified(directory, trust).manifest
