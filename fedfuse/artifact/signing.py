"""Signed artifacts: the coordinator's Ed25519 key signs each manifest.

The manifest's hashes make an artifact tamper-evident only against someone who cannot
write the registry: anyone who can may change a file and recompute every hash. A
signature binds the exact manifest bytes (and through their SHA-256s every member file)
to a key that never leaves the coordinator. ``manifest.sig`` beside ``manifest.json``
holds::

    {"algorithm": "ed25519", "key_id": <first 16 hex of SHA-256(raw public key)>,
     "signature": <base64 of Ed25519(private key, manifest.json bytes)>}

Trust comes from a public key the operator copied out of band (``fedfuse serve --trust
PUBKEY``); the run directory's ``signer.pub`` is only a convenience copy, as trustworthy
as the directory it sits in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedfuse.atomic import atomic_write_bytes
from fedfuse.errors import ArtifactError

SIGNATURE = "manifest.sig"
SIGNER_PUB = "signer.pub"


class SignatureError(ArtifactError):
    """An artifact is unsigned, signed by an untrusted key, or its signature is wrong; or a
    key file is unusable."""


def key_id(public: Ed25519PublicKey) -> str:
    """``SHA-256(raw public key)[:16 hex]``: names a key in signatures and messages."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in ``path`` (PEM, PKCS#8), made there (mode 0600) if absent."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(path, 0o600)
        return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key")
    return loaded


def trusted_keys(paths: Sequence[str | Path]) -> tuple[Ed25519PublicKey, ...]:
    """The Ed25519 public keys in PEM files ``paths`` (``signer.pub`` copies)."""
    keys = []
    for path in map(Path, paths):
        try:
            loaded = serialization.load_pem_public_key(path.read_bytes())
        except FileNotFoundError:
            raise SignatureError(f"trusted key {path} not found") from None
        except (OSError, ValueError) as exc:
            raise SignatureError(f"{path}: not a PEM public key ({exc})") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise SignatureError(f"{path}: not an Ed25519 public key")
        keys.append(loaded)
    return tuple(keys)


def sign_artifact(directory: Path, key: Ed25519PrivateKey) -> str:
    """Sign ``directory``'s manifest (write ``manifest.sig``); returns the key id."""
    from fedfuse.artifact.manifest import MANIFEST

    signature = key.sign((directory / MANIFEST).read_bytes())
    kid = key_id(key.public_key())
    atomic_write_bytes(directory / SIGNATURE, (json.dumps(
        {"algorithm": "ed25519", "key_id": kid,
         "signature": base64.b64encode(signature).decode()}, indent=2) + "\n").encode())
    return kid


@dataclass(frozen=True)
class Signed:
    """Who signed a verified manifest."""

    key_id: str


def verify_manifest(directory: Path, manifest: bytes,
                    trust: Sequence[Ed25519PublicKey]) -> Signed:
    """Check that ``manifest`` (the bytes read from ``directory``'s manifest, the same
    ones whose hashes are then checked) is signed by one of ``trust``; raises
    SignatureError naming what is wrong."""
    path = directory / SIGNATURE
    try:
        record = json.loads(path.read_bytes())
        kid, signature = str(record["key_id"]), base64.b64decode(record["signature"],
                                                                 validate=True)
        if record.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {record.get('algorithm')!r}")
    except FileNotFoundError:
        raise SignatureError(f"{directory}: the artifact is not signed (no {SIGNATURE}), "
                             "and a trusted signer is required") from None
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"{path}: malformed signature ({exc})") from None
    known = {key_id(k): k for k in trust}
    if kid not in known:
        raise SignatureError(f"{directory}: signed by key {kid}, which is not trusted "
                             f"(trusted: {', '.join(known) or 'none'})")
    try:
        known[kid].verify(signature, manifest)
    except InvalidSignature:
        raise SignatureError(f"{directory}: the signature does not match the manifest; "
                             "it was changed after signing") from None
    return Signed(kid)


def sign_run_model(run: Path, key: Ed25519PrivateKey) -> str:
    """Sign a run directory's ``model/`` and put the public half beside it as
    ``signer.pub`` (a convenience copy: trust the one copied out of band)."""
    kid = sign_artifact(run / "model", key)
    atomic_write_bytes(run / SIGNER_PUB, public_pem(key.public_key()))
    return kid
