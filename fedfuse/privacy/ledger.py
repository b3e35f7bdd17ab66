"""One site's privacy account (state), and where it is kept.

A :class:`PrivacyLedger` holds the accountant's history of ``(σ, q, steps)`` entries
across all rounds; it survives restarts in a :class:`FileLedgerStore` (a deployed site,
or a simulated one whose run keeps checkpoints) or lives in the Flower node's
``Context.state`` (:class:`RecordLedgerStore`). The ε math is ``fedfuse.privacy.accounting``.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedfuse.atomic import atomic_write_json
from fedfuse.errors import FedfuseError
from fedfuse.privacy.accounting import HistoryEntry, epsilon_of


@dataclass
class PrivacyLedger:
    """One site's privacy account across rounds (and restarts)."""

    accountant: str
    delta: float
    budget: float | None
    noise_multiplier: float | None = None
    """σ fixed at the first private round (calibrated once from the target ε)."""
    history: list[HistoryEntry] = field(default_factory=list)
    refused_rounds: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.history)

    @property
    def sample_rate(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε if ``steps`` more steps at (σ, q) were spent."""
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], self.delta,
                          self.accountant)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        if self.budget is None:
            return False
        return self.epsilon_after(noise_multiplier, sample_rate, steps) > self.budget * 1.0001

    def to_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "delta": self.delta, "budget": self.budget,
                "noise_multiplier": self.noise_multiplier,
                "history": [list(h) for h in self.history],
                "refused_rounds": list(self.refused_rounds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        return cls(str(d["accountant"]), float(d["delta"]),
                   None if d.get("budget") is None else float(d["budget"]),
                   None if d.get("noise_multiplier") is None else float(d["noise_multiplier"]),
                   [(float(s), float(q), int(t)) for s, q, t in d.get("history", [])],
                   [int(r) for r in d.get("refused_rounds", [])])


class LedgerStore(Protocol):
    def load(self) -> PrivacyLedger | None: ...

    def save(self, ledger: PrivacyLedger) -> None: ...

    def held(self) -> AbstractContextManager[None]:
        """Exclusive use of the ledger from load to save: a private round holds it, so
        that two runs at one site cannot both read the same balance and one charge be
        lost."""
        ...


class FileLedgerStore:
    """The ledger as a JSON file in a site's state directory, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> PrivacyLedger | None:
        if not self.path.exists():
            return None
        try:
            return PrivacyLedger.from_dict(json.loads(self.path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            # Never start a fresh (empty) account over an unreadable one: that would
            # silently reset the spent budget.
            raise FedfuseError(f"privacy ledger {self.path} is unreadable ({exc}); "
                               "restore it from backup before training again") from None

    def save(self, ledger: PrivacyLedger) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, ledger.to_dict())

    @contextmanager
    def held(self) -> Iterator[None]:
        """An exclusive ``flock`` on ``<ledger>.lock`` (released when the process dies,
        so a crash never leaves the ledger locked)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class RecordLedgerStore:
    """The ledger in a Flower ``Context.state`` (kept per node across rounds), as
    record ``key``."""

    def __init__(self, state: Any, key: str = "privacy-ledger") -> None:
        self.state = state
        self.key = key

    def load(self) -> PrivacyLedger | None:
        if self.key not in self.state:
            return None
        return PrivacyLedger.from_dict(json.loads(str(self.state[self.key]["json"])))

    def save(self, ledger: PrivacyLedger) -> None:
        from flwr.app import ConfigRecord

        self.state[self.key] = ConfigRecord({"json": json.dumps(ledger.to_dict())})

    def held(self) -> AbstractContextManager[None]:
        """Nothing to hold: a node's Context is used by one message at a time."""
        return nullcontext()


def ledger_store_for(state_dir: Path | None, context: Any,
                     name: str = "privacy-ledger") -> LedgerStore:
    """A site's ledger store ``name``: ``<state_dir>/<name>.json`` when the site has a
    state directory (a deployed site; a simulated one whose run keeps checkpoints), else
    the node's Flower ``Context.state`` (``privacy-ledger``: record-level DP-SGD's;
    ``client-level-ledger``: the client-level releases the site took part in)."""
    if state_dir is not None:
        return FileLedgerStore(state_dir / f"{name}.json")
    return RecordLedgerStore(context.state, name)
