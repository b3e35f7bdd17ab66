"""Coordinator checkpoints: the full state after a round, written atomically, verified
when read.

A file ``round-NNNN.ckpt`` is::

    b"FFCKPT1\\n" | SHA-256 of the rest (32 bytes) | u64 length of J | J | S

with J the JSON state (round, history, privacy reports and retired trainers by site
name, secure-sum count, client-level privacy ledgers) and S the cohort models and the
strategies' own state (their samplers, server momentum) as safetensors (``model/<arch>/<tensor>``,
``strategy/<arch>/<name>``). Files are replaced atomically (temporary file,
fsync, rename); the newest ``KEEP`` are kept. Reading takes the newest file that
verifies and warns about every newer one that does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedfuse.atomic import atomic_write_bytes
from fedfuse.coordinator.records import Participant, RoundRecord
from fedfuse.errors import FedfuseError

if TYPE_CHECKING:
    from fedfuse.coordinator.cohorts import Cohort

log = logging.getLogger("fedfuse.checkpoint")

MAGIC = b"FFCKPT1\n"
KEEP = 2


@dataclass
class Checkpoint:
    round: int
    cohorts: dict[str, dict[str, np.ndarray]]
    """Each cohort's model after ``round``: arch -> tensor name -> values."""
    history: list[dict[str, Any]]
    strategies: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Each cohort strategy's own state (its sampler, server momentum), likewise."""
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each site's last privacy report, by site name."""
    retired: dict[str, list[str]] = field(default_factory=dict)
    """Per cohort, the sites no longer sampled for training, by name."""
    secure_sums: int = 0
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each cohort's client-level privacy ledger (``privacy.mode = "user"``)."""

    def to_bytes(self) -> bytes:
        state = {"round": self.round, "history": self.history, "privacy": self.privacy,
                 "retired": self.retired, "secure_sums": self.secure_sums,
                 "ledgers": self.ledgers,
                 "order": {part: {arch: list(arrays) for arch, arrays in by_arch.items()}
                           for part, by_arch in (("model", self.cohorts),
                                                 ("strategy", self.strategies))}}
        head = json.dumps(state, sort_keys=True).encode()
        tensors = {f"{part}/{arch}/{name}": np.ascontiguousarray(value)
                   for part, by_arch in (("model", self.cohorts), ("strategy", self.strategies))
                   for arch, arrays in by_arch.items() for name, value in arrays.items()}
        body = struct.pack("<Q", len(head)) + head + save_tensors(tensors)
        return MAGIC + hashlib.sha256(body).digest() + body

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Parse and verify; raises ValueError naming what is wrong."""
        if not data.startswith(MAGIC):
            raise ValueError("not a fedfuse checkpoint (bad magic)")
        digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("its SHA-256 does not match (truncated or altered)")
        (length,) = struct.unpack("<Q", body[:8])
        state = json.loads(body[8:8 + length])
        tensors = load_tensors(body[8 + length:])
        # tensor order matters (Flower aggregates ArrayRecords position by position);
        # safetensors sorts names, so the order is kept in the JSON
        parts = {part: {arch: {name: tensors[f"{part}/{arch}/{name}"] for name in names}
                        for arch, names in by_arch.items()}
                 for part, by_arch in state["order"].items()}
        return cls(round=int(state["round"]), cohorts=parts["model"],
                   strategies=parts["strategy"], history=state["history"],
                   privacy=state["privacy"], retired=state["retired"],
                   secure_sums=int(state["secure_sums"]),
                   ledgers=state.get("ledgers", {}))


def path_for(directory: Path, server_round: int) -> Path:
    return directory / f"round-{server_round:04d}.ckpt"


def write_checkpoint(directory: Path, checkpoint: Checkpoint, keep: int = KEEP) -> Path:
    """Write ``checkpoint`` atomically and delete all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = path_for(directory, checkpoint.round)
    atomic_write_bytes(path, checkpoint.to_bytes())
    for old in sorted(directory.glob("round-*.ckpt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that verifies; each newer one that does
    not is reported with a warning and skipped. None when there is none."""
    for path in sorted(directory.glob("round-*.ckpt"), reverse=True):
        try:
            return Checkpoint.from_bytes(path.read_bytes())
        except (ValueError, KeyError, TypeError, OSError, struct.error, SafetensorError) as exc:
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one",
                        path, exc)
    return None



def snapshot(server_round: int, cohorts: dict[str, Cohort], participants: list[Participant],
             history: list[RoundRecord], reports: dict[int, dict[str, Any]],
             secure_sums: int) -> Checkpoint:
    """Everything a run needs to continue after ``server_round``, sites by name (node ids
    change when a federation restarts)."""
    names = {p.node_id: p.name for p in participants}
    return Checkpoint(
        round=server_round,
        cohorts={a: {k: v.numpy() for k, v in c.arrays.items()} for a, c in cohorts.items()},
        strategies={a: c.strategy.state_arrays() for a, c in cohorts.items()},
        history=[r.to_dict() for r in history],
        privacy={names[n]: r for n, r in reports.items() if n in names},
        retired={a: [names[n] for n in c.strategy.members if n not in c.strategy.trainers]
                 for a, c in cohorts.items()},
        secure_sums=secure_sums,
        ledgers={a: c.strategy.ledger.to_dict() for a, c in cohorts.items()
                 if c.strategy.ledger is not None})


def restore(ckpt: Checkpoint, cohorts: dict[str, Cohort], participants: list[Participant],
            reports: dict[int, dict[str, Any]]) -> list[RoundRecord]:
    """Put ``ckpt``'s state in place of a fresh run's (``reports``: filled with the
    sites' privacy reports); returns its history."""
    from flwr.app import Array, ArrayRecord

    from fedfuse.privacy.ledger import PrivacyLedger

    if set(ckpt.cohorts) != set(cohorts):
        raise FedfuseError(f"the checkpoint holds cohorts {sorted(ckpt.cohorts)}, the "
                           f"scenario has {sorted(cohorts)}")
    ids = {p.name: p.node_id for p in participants}
    for arch, cohort in cohorts.items():
        cohort.arrays = ArrayRecord({k: Array(v) for k, v in ckpt.cohorts[arch].items()})
        cohort.strategy.restore_state(ckpt.strategies.get(arch, {}), cohort.arrays)
        for name in ckpt.retired.get(arch, []):
            if name in ids:
                cohort.strategy.retire(ids[name])
        if cohort.strategy.ledger is not None and arch in ckpt.ledgers:
            cohort.strategy.ledger = PrivacyLedger.from_dict(ckpt.ledgers[arch])
    reports.update({ids[name]: r for name, r in ckpt.privacy.items() if name in ids})
    return [RoundRecord.from_dict(r) for r in ckpt.history]
