"""The run directory: everything a simulation leaves behind.

It is built in a hidden sibling ``.<name>.partial`` and renamed into place only when
the run succeeds. A run that fails before its first checkpoint removes it; one that
fails later keeps it, so ``fedfuse simulate --resume <name>`` can continue from the last
complete round (``fedfuse.checkpoint``). No half-written run directory is ever published.

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
    model/                 the fused predictor as a verifiable artifact (``fedfuse.artifact``)
    accuracy.png           test (solid) and validation (dashed) accuracy per round per cohort
    summary.json           the run's figures (see ``build_summary``)
    sites/client-<i>/      a simulated client's privacy ledger (runs with DP), and while
                           the run is in progress its replay store (``fedfuse.replay``)
    checkpoints/           while the run is in progress only: the newest round states
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from safetensors.torch import save as safetensors_bytes

from fedfuse.artifact.manifest import Member, write_artifact
from fedfuse.atomic import (atomic_write_bytes, atomic_write_figure, atomic_write_json,
                             atomic_write_text)
from fedfuse.config import FedfuseConfig
from fedfuse.data.datasets import DataSchema
from fedfuse.errors import FedfuseError
from fedfuse.fusion.result import FusionResult
from fedfuse.fusion.stacking import member_shares
from fedfuse.coordinator.loop import FederationResult
from fedfuse.coordinator.loop import Member as Client


PRIVACY_OFF: dict[str, Any] = {"mode": "off", "max_epsilon": None, "delta": None}
"""The privacy summary of a run without DP."""


def privacy_entries(result: FederationResult) -> list[dict[str, Any]]:
    """``privacy.json``'s per-client entries, from each site's last report."""
    entries = []
    for m in result.members:
        r = result.privacy.get(m.node_id)
        if r is None:
            continue
        entries.append({"client_id": m.name, "cohort": m.arch, "epsilon": float(r["epsilon"]),
                        "delta": float(r["delta"]),
                        "noise_multiplier": float(r["noise-multiplier"]),
                        "sample_rate": float(r["sample-rate"]), "steps": int(r["steps"]),
                        "accountant": str(r["accountant"]),
                        "budget": None if float(r["budget"]) < 0 else float(r["budget"]),
                        "status": str(r["status"])})
    return entries


def privacy_summary(cfg: FedfuseConfig, result: FederationResult) -> dict[str, Any]:
    """``summary.json``'s privacy block: the worst (largest) ε and δ over all clients."""
    entries = privacy_entries(result)
    if not cfg.privacy.enabled or not entries:
        return dict(PRIVACY_OFF)
    return {"mode": cfg.privacy.mode, "max_epsilon": max(e["epsilon"] for e in entries),
            "delta": max(e["delta"] for e in entries), "budget": cfg.privacy.budget,
            "accountant": cfg.privacy.accountant,
            "clients_at_budget": sum(e["status"] == "budget-exhausted" for e in entries)}


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
                 resume: bool = False) -> None:
        if final.exists():
            raise FedfuseError(f"output directory already exists: {final} (choose another --out)")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.cfg = cfg
        self.schema = schema
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

    def restore_history(self, history: list[dict[str, Any]]) -> None:
        """``metrics.jsonl`` as of a checkpoint (rounds after it are run again)."""
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))

    # RoundListener ------------------------------------------------------------------------

    def on_start(self, members: list[Client], rounds: int) -> None:
        atomic_write_json(self.path / "clients.json", [asdict(m) for m in members])

    def on_round(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
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

    # Summary ----------------------------------------------------------------------------

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)


def build_summary(cfg: FedfuseConfig, result: FederationResult, wall_seconds: float,
                  label_skew: float | None = None) -> dict[str, Any]:
    """The run's headline figures. ``secure_aggregation`` is true only when every cohort
    update the coordinator applied came out of a secure sum (and at least one did).
    ``label_skew`` is known in simulation only (a deployment's partition is the sites'
    own data), so a deployed run (``label_skew`` None) has ``deployment`` true and a
    null ``partition``. ``device`` is where the coordinator computed (in simulation,
    every site too)."""
    last = result.history[-1]["cohorts"]
    cohorts = {
        arch: {"clients": len(c.members), "test_accuracy": last[arch]["test_accuracy"],
               "test_loss": last[arch]["test_loss"],
               "best_test_accuracy": max(r["cohorts"][arch]["test_accuracy"]
                                         for r in result.history)}
        for arch, c in result.cohorts.items()
    }
    return {
        "scenario": cfg.name,
        "seed": cfg.seed,
        "rounds": len(result.history),
        "clients": len(result.members),
        "deployment": label_skew is None,
        "partition": None if label_skew is None else {
            "method": cfg.partition.method, "alpha": cfg.partition.alpha,
            "label_skew": round(label_skew, 4)},
        "cohorts": cohorts,
        "fused": None if result.fusion is None else fused_summary(result.fusion, cohorts),
        "privacy": privacy_summary(cfg, result),
        "secure_aggregation": cfg.secure_aggregation.enabled and result.secure_sums > 0,
        "secure_sums": result.secure_sums,
        "device": result.device,
        "wall_seconds": round(wall_seconds, 2),
    }


def fused_summary(fusion: FusionResult, cohorts: dict[str, Any]) -> dict[str, Any]:
    """The served method and its test accuracy, its artifact weights, and every method
    beside the best member (FedAvg's best single model)."""
    return {
        "method": fusion.method,
        "test_accuracy": fusion.fused_test_accuracy,
        "weights": served_weights(fusion),
        "best_member_test_accuracy": max(c["test_accuracy"] for c in cohorts.values()),
        "methods": fusion.scores(),
    }


SCORED_FILES = {"stack": "stack_head.safetensors", "distill": "student.safetensors"}
"""Where a run directory keeps the stacking head and the distilled student."""


def served_weights(fusion: FusionResult) -> dict[str, float]:
    """Each served model's weight: the soft vote's weights; for the stacking head each
    member's share of it (``fedfuse.stacking.member_shares``); the student alone: 1."""
    if fusion.method == "stack" and fusion.stack is not None:
        shares = member_shares(fusion.stack.state["weight"].numpy(), len(fusion.members))
        return dict(zip(fusion.members, map(float, shares)))
    if fusion.method == "distill" and fusion.student is not None:
        return {fusion.student.arch: 1.0}
    return dict(zip(fusion.members, map(float, fusion.weights)))


def plot_accuracy(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, arch in enumerate(history[0]["cohorts"]):
        color = f"C{i}"
        ax.plot(rounds, [r["cohorts"][arch]["test_accuracy"] for r in history], color=color,
                marker="o", ms=3, label=f"{arch} (test)")
        val = [r["cohorts"][arch].get("val_accuracy") for r in history]
        if all(v is not None for v in val):
            ax.plot(rounds, val, color=color, ls="--", alpha=0.6, label=f"{arch} (val)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy per round per cohort")
    fig.tight_layout()
    atomic_write_figure(fig, path)


def save_weights(path: Path, arch: str, state: dict[str, Any], schema: DataSchema) -> None:
    """A model's weights as safetensors, with its architecture and data schema."""
    atomic_write_bytes(path, safetensors_bytes(
        {k: v.contiguous() for k, v in state.items()},
        metadata={"schema": json.dumps(schema.to_dict()), "arch": arch}))


def write_fused_artifact(run_path: Path, schema: DataSchema, result: FederationResult,
                         privacy: dict[str, Any]) -> None:
    """``fusion_stats.json`` (and ``student.safetensors``) and ``model/`` from a finished
    federation."""
    assert result.fusion is not None
    atomic_write_json(run_path / "fusion_stats.json", result.fusion.to_dict())
    for method, scored in result.fusion.candidates.items():
        save_weights(run_path / SCORED_FILES[method], scored.arch, scored.state, schema)
    last = result.history[-1]["cohorts"]
    members = [Member(arch, result.cohorts[arch].arrays.to_torch_state_dict(),
                      len(result.cohorts[arch].members), last[arch]["test_accuracy"])
               for arch in result.fusion.members]
    write_model(run_path / "model", schema, result.fusion, members, privacy)


def write_model(directory: Path, schema: DataSchema, fusion: FusionResult,
                members: list[Member], privacy: dict[str, Any],
                semver: str = "1.0.0") -> dict[str, Any]:
    """The fused artifact of the method ``fusion`` serves: the soft vote over
    ``members``, the members with the stacking head, or the distilled student alone
    (weight 1)."""
    if fusion.method == "stack":
        stack = fusion.stack
        assert stack is not None
        weights = served_weights(fusion)
        return write_artifact(
            directory, members=members, weights=np.array([weights[m.arch] for m in members]),
            method="stack", schema=schema,
            fusion_fit={"objective": "cross_entropy", "sites": fusion.sites,
                        "val_examples": stack.num_examples,
                        "val_brier": round(stack.val_brier, 6),
                        "weights": "each member's share of the head's weight norm", **stack.fit},
            privacy=privacy, fused_test_accuracy=stack.test_accuracy, semver=semver,
            head=stack.state)
    student = fusion.served_model
    if student is not None:
        clients = sum(m.cohort_clients for m in members)
        return write_artifact(
            directory, members=[Member(student.arch, student.state, clients,
                                       student.test_accuracy)],
            weights=np.ones(1), method="distill", schema=schema,
            fusion_fit={"objective": "kl_to_soft_vote", "sites": fusion.sites,
                        "val_examples": student.num_examples,
                        "val_brier": round(student.val_brier, 6),
                        "teacher": dict(zip(fusion.members, map(float, fusion.weights))),
                        **student.fit},
            privacy=privacy, fused_test_accuracy=student.test_accuracy, semver=semver)
    return write_artifact(directory, members=members, weights=fusion.weights,
                          method=fusion.method, schema=schema,
                          fusion_fit={"objective": "brier", "sites": fusion.sites,
                                      "val_examples": fusion.num_examples,
                                      "val_brier": round(fusion.val_brier, 6)},
                          privacy=privacy, fused_test_accuracy=fusion.test_accuracy,
                          semver=semver)
