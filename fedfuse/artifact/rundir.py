"""The run directory: everything a simulation leaves behind.

It is built in a hidden sibling ``.<name>.partial`` and renamed into place only when
the run succeeds. A run that fails before its first checkpoint removes it; one that
fails later keeps it, so ``fedfuse simulate --resume <name>`` can continue from the last
complete round (``fedfuse.coordinator.checkpoint``). No half-written run directory is ever
published.

Layout::

    config.toml            the resolved scenario
    clients.json           each client's name, cohort and example counts
    metrics.jsonl          one JSON line per round
    privacy.json           each client's ε, δ, σ, sample rate, steps (runs with DP)
    cohorts/<arch>.safetensors   final cohort models (arch and schema in the metadata)
    fusion_stats.json      the sites' summed Brier statistics (A, b, N), fitted weights,
                           and the stacking head's and distilled student's statistics and
                           fit (if any)
    stack_head.safetensors the stacking head (``fusion.stacking_rounds`` > 0)
    student.safetensors    the distilled student (``fusion.unlabeled_fraction`` > 0)
    model/                 the fused predictor, a verifiable artifact (``artifact.manifest``)
    accuracy.png           test (solid) and validation (dashed) accuracy per round per cohort
    summary.json           the run's figures (``fedfuse.artifact.summary.build_summary``)
    sites/client-<i>/      a simulated client's privacy ledger (runs with DP), and while
                           the run is in progress its replay store (``fedfuse.site.replay``)
    checkpoints/           while the run is in progress only: the newest round states
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedfuse.artifact.fused import save_weights, write_fused_artifact
from fedfuse.artifact.signing import sign_run_model
from fedfuse.artifact.summary import privacy_entries, privacy_summary
from fedfuse.atomic import atomic_write_figure, atomic_write_json, atomic_write_text
from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.checkpoint import Checkpoint, load_latest
from fedfuse.coordinator.records import FederationResult, Participant, RoundRecord
from fedfuse.data.datasets import DataSchema
from fedfuse.errors import FedfuseError

log = logging.getLogger("fedfuse")


def partial_path(final: Path) -> Path:
    """Where the run that will become ``final`` is built (and can be resumed from)."""
    return final.parent / f".{final.name}.partial"


def resumable_config(final: Path) -> Path:
    """The resolved scenario of the interrupted run that was to become ``final``."""
    config = partial_path(final) / "config.toml"
    if not config.is_file():
        raise FedfuseError(f"nothing to resume for {final}: {partial_path(final)} holds no "
                           "interrupted run")
    return config


class RunDirectory:
    """Writes a run's files into a partial directory, published atomically when the
    ``with`` block ends without error. A run that fails after its first checkpoint keeps
    the partial directory, for ``fedfuse simulate --resume``; otherwise it is removed."""

    def __init__(self, final: Path, cfg: FedfuseConfig, schema: DataSchema,
                 resume: bool = False, signer: Ed25519PrivateKey | None = None) -> None:
        if final.exists():
            raise FedfuseError(f"output directory already exists: {final} (choose another --out)")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.cfg = cfg
        self.schema = schema
        self.signer = signer
        """The coordinator's key: it signs the fused artifact (``signing.sign_run_model``)."""
        self.path = partial_path(final)
        self.result: FederationResult | None = None
        if resume:
            resumable_config(final)
        elif self.path.exists():
            raise FedfuseError(f"an interrupted run of {final} is in {self.path}: continue it "
                               f"with `fedfuse simulate --resume {final}`, or delete it")
        else:
            self.path.mkdir()
            atomic_write_text(self.path / "config.toml", cfg.to_toml())

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            for replays in self.path.glob("sites/*/replay"):  # only a resume needs them
                shutil.rmtree(replays, ignore_errors=True)
            os.rename(self.path, self.final)
            self.path = self.final
        elif not any(self.checkpoints.glob("round-*.ckpt")):
            shutil.rmtree(self.path, ignore_errors=True)

    def resume_point(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, with ``metrics.jsonl`` put back to it;
        None (and the run starts again from round 1) if there is none."""
        checkpoint = load_latest(self.checkpoints)
        if checkpoint is None:
            log.warning("no usable checkpoint in %s; starting again from round 1",
                        self.checkpoints)
        self.restore_history(checkpoint.history if checkpoint else [])
        return checkpoint

    def restore_history(self, history: list[dict[str, Any]]) -> None:
        """``metrics.jsonl`` as of a checkpoint (rounds after it are run again)."""
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))

    # RoundListener ------------------------------------------------------------------------

    def on_start(self, participants: list[Participant], rounds: int) -> None:
        atomic_write_json(self.path / "clients.json", [asdict(p) for p in participants])

    def on_round(self, record: RoundRecord) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def on_finish(self, result: FederationResult) -> None:
        self.result = result
        (self.path / "cohorts").mkdir(exist_ok=True)
        for arch, cohort in result.cohorts.items():
            save_weights(self.path / "cohorts" / f"{arch}.safetensors", arch,
                         cohort.arrays.to_torch_state_dict(), self.schema)
        plot_accuracy(result.history, self.path / "accuracy.png")
        if self.cfg.privacy.enabled:
            atomic_write_json(self.path / "privacy.json",
                              {"mode": self.cfg.privacy.mode, "clients": privacy_entries(result)})
        if result.fusion is not None:
            write_fused_artifact(self.path, self.schema, result,
                                 privacy_summary(self.cfg, result))
            if self.signer is not None:
                sign_run_model(self.path, self.signer)

    # Summary ----------------------------------------------------------------------------

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)


def plot_accuracy(history: list[RoundRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, arch in enumerate(history[0].cohorts):
        color = f"C{i}"
        test = [r.cohorts[arch].test_accuracy for r in history]
        ax.plot(rounds, [float("nan") if v is None else v for v in test], color=color,
                marker="o", ms=3, label=f"{arch} (test)")
        val = [r.cohorts[arch].val_accuracy for r in history]
        if all(v is not None for v in val):
            ax.plot(rounds, [float(v or 0.0) for v in val], color=color, ls="--", alpha=0.6,
                    label=f"{arch} (val)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy per round per cohort")
    fig.tight_layout()
    atomic_write_figure(fig, path)
