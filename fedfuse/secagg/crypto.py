"""The protocol's primitives, all from the ``cryptography`` package.

- key agreement: X25519, the shared secret stretched by HKDF-SHA256 with a context label;
- authenticated encryption of shares: ChaCha20-Poly1305 with a random 96-bit nonce and
  associated data that binds a ciphertext to its session, sender and recipient;
- masks: the ChaCha20 keystream of a 256-bit key, read as little-endian uint64 words;
- identities: Ed25519, a site's long-term key signing its per-session advertisements.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class CryptoError(ValueError):
    """A key, ciphertext or share that does not verify."""


def new_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes)."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                     NoEncryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


_PROBE = X25519PrivateKey.generate()
"""A throwaway key that tries every advertised public key once."""


def usable_public_key(public: bytes) -> bool:
    """Whether ``public`` is a 32-byte X25519 key that agreements can use: not one of the
    small-order points (such as 32 zero bytes), with which every agreement is the
    all-zero secret, refused by the ``cryptography`` package. A clamped scalar is a
    multiple of the cofactor 8, so X25519(k, P) is zero exactly when P has small order."""
    if len(public) != KEY_BYTES:
        return False
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def agree(private: bytes, peer_public: bytes, label: bytes) -> bytes:
    """K = HKDF-SHA256(X25519(private, peer_public), info = label ‖ min(P, Q) ‖ max(P, Q)),
    32 bytes, P and Q the two public keys: symmetric, agree(a, B, l) == agree(b, A, l),
    and bound to the very pair of keys (the same shared point reached from other
    advertised keys gives another K). Raises CryptoError for an invalid public key."""
    return agree_all(private, [peer_public], label)[0]


def agree_all(private: bytes, peers: Sequence[bytes], label: bytes) -> list[bytes]:
    """``agree(private, P, label)`` for every P in ``peers``, loading the private key once
    (loading it costs as much as one agreement)."""
    key = X25519PrivateKey.from_private_bytes(private)
    own = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    out = []
    for peer in peers:
        try:
            shared = key.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:
            raise CryptoError(f"unusable public key: {exc}") from None
        pair = min(own, peer) + max(own, peer)
        out.append(HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=label + pair)
                   .derive(shared))
    return out


IDENTITY_LABEL = b"fedfuse/secagg/identity"


def identity_key(secret: bytes) -> bytes:
    """A site's long-term Ed25519 identity key (32 raw bytes), derived from its secret:
    made at the site, never sent; peers may pin its public half (``identity_public``).
    It signs the site's per-session key advertisements; it is not the node
    authentication key, whose signatures the coordinator's SuperLink sees."""
    return derive(secret, IDENTITY_LABEL)


def identity_public(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def sign(private: bytes, message: bytes) -> bytes:
    """An Ed25519 signature of ``message`` (64 bytes)."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def derive(key: bytes, label: bytes) -> bytes:
    """A 32-byte subkey HKDF-SHA256(key, info=label)."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=label).derive(key)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(key, nonce, plaintext, associated)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """The plaintext of ``seal``; CryptoError if the blob was altered, is foreign to this
    key, or belongs to another session, sender or recipient (``associated``)."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(f"ciphertext of {len(blob)} bytes is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag:
        raise CryptoError("ciphertext does not authenticate") from None


def mask_words(key: bytes, length: int) -> np.ndarray:
    """PRG(key): ``length`` uint64 words of the ChaCha20 keystream under ``key``."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def digest(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts (so no two part lists hash alike)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.digest()
