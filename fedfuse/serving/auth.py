"""API keys: created once and shown once; the server stores and compares only their hashes.

A key reads ``ffk_<id>_<secret>``: ``id`` (8 hex digits) names the key in logs, metrics
and rate limits, and ``secret`` holds 256 random bits. The keys file keeps, per key, its
id, a label and ``sha256(key)``; a plain SHA-256 suffices because the secret is random
and long, not a password. Verification compares digests with ``hmac.compare_digest``,
and an unknown id is compared against a dummy digest, so a wrong key costs the same time
whether or not its id exists.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedfuse.atomic import atomic_write_bytes
from fedfuse.errors import FedfuseError

PREFIX = "ffk"
_KEY = re.compile(rf"^{PREFIX}_([0-9a-f]{{8}})_[A-Za-z0-9_-]{{43}}$")
_DUMMY = hashlib.sha256(b"fedfuse: no such key").hexdigest()


class KeysFileError(FedfuseError):
    """The API keys file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class StoredKey:
    id: str
    name: str
    sha256: str
    created_at: str


def new_key() -> tuple[str, str]:
    """A fresh ``(key id, key)`` pair."""
    key_id = secrets.token_hex(4)
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_digest(key: str) -> str:
    """``sha256(key)`` in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The hashed keys of one keys file, checked in constant time per key."""

    def __init__(self, keys: list[StoredKey]) -> None:
        self._by_id = {k.id: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_id)

    def verify(self, key: str) -> str | None:
        """The key's id when ``key`` is one of the stored keys, else None."""
        match = _KEY.match(key)
        key_id = match.group(1) if match else ""
        stored = self._by_id.get(key_id)
        ok = hmac.compare_digest(key_digest(key), stored.sha256 if stored else _DUMMY)
        return key_id if ok and stored is not None else None


def read_keys(path: Path) -> list[StoredKey]:
    """The keys in ``path``; raises KeysFileError naming what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeysFileError(f"API keys file not found: {path} (create one with "
                            "`fedfuse keys create --file ...`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeysFileError(f"{path}: not a readable keys file ({exc})") from None
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: expected a JSON object with a \"keys\" list")
    keys = []
    for i, entry in enumerate(entries):
        try:
            key = StoredKey(**entry)
        except TypeError:
            raise KeysFileError(f"{path}: keys[{i}] must have exactly id, name, sha256 and "
                                "created_at") from None
        if not re.fullmatch(r"[0-9a-f]{8}", str(key.id)) or \
                not re.fullmatch(r"[0-9a-f]{64}", str(key.sha256)):
            raise KeysFileError(f"{path}: keys[{i}]: malformed id or sha256")
        keys.append(key)
    return keys


def write_keys(path: Path, keys: list[StoredKey]) -> None:
    """Replace the keys file atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps({"keys": [asdict(k) for k in keys]}, indent=2) + "\n").encode()
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def create_key(path: Path, name: str) -> tuple[StoredKey, str]:
    """Add a new key to ``path`` (created if absent); returns its record and the key itself,
    which is not stored anywhere."""
    keys = read_keys(path) if path.exists() else []
    key_id, key = new_key()
    stored = StoredKey(id=key_id, name=name, sha256=key_digest(key),
                       created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    write_keys(path, [*keys, stored])
    return stored, key


def revoke_key(path: Path, key_id: str) -> StoredKey:
    """Remove key ``key_id`` from ``path``; raises KeysFileError if it is not there."""
    keys = read_keys(path)
    kept = [k for k in keys if k.id != key_id]
    if len(kept) == len(keys):
        raise KeysFileError(f"{path}: no key with id {key_id!r} "
                            f"(ids: {', '.join(k.id for k in keys) or 'none'})")
    write_keys(path, kept)
    return next(k for k in keys if k.id == key_id)
