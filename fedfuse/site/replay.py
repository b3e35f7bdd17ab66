"""A site's recent DP-trained updates, kept so that a repeated request is answered
without training, and without charging the site's privacy ledger, again.

A coordinator resumed from a checkpoint repeats the rounds after it. A site that had
already trained one of them would train again and its ledger would charge a second
DP-SGD release for the same round, which can stop the site a round early. Answering
with the stored update instead sends the same mechanism output twice, which costs no
more privacy than sending it once.

An entry is keyed by everything the output depends on (the received weights and the
round's whole configuration, which carries the round number and the seed), and it is
written only after the ledger has recorded the charge, so no uncharged update is ever
stored. An unreadable entry, or one whose tensors do not match the SHA-256 stored with
them, is treated as absent: the site trains again, which is the safe side. For the same
reason entries are written atomically but not fsynced: an entry lost in a power cut
costs a second charge, never an uncharged release.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from fedfuse.atomic import atomic_write_bytes


def request_key(arrays: ArrayRecord, config: ConfigRecord) -> str:
    """SHA-256 over the configuration (as sorted JSON) and every received tensor's name
    and serialised bytes (which carry its dtype and shape)."""
    h = hashlib.sha256(json.dumps({k: config[k] for k in sorted(config.keys())},
                                  sort_keys=True, default=str).encode())
    for name, array in arrays.items():
        h.update(f"{name}|{len(array.data)}|".encode())
        h.update(array.data)
    return h.hexdigest()


def _digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class ReplayStore:
    """The newest ``keep`` trained updates as ``<directory>/<key>.safetensors``."""

    def __init__(self, directory: Path, keep: int = 4) -> None:
        self.directory = directory
        self.keep = keep

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The trained weights and the reply's figures stored for ``key``, if any."""
        path = self.directory / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata()
                metrics = json.loads(meta["metrics"])
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        if meta.get("sha256") != _digest(state):
            return None
        return state, metrics

    def save(self, key: str, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        data = safetensors_save(tensors, metadata={"metrics": json.dumps(metrics),
                                                   "sha256": _digest(tensors)})
        atomic_write_bytes(self.directory / f"{key}.safetensors", data, durable=False)
        entries = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-self.keep]:
            old.unlink(missing_ok=True)
