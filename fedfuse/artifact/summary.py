"""A run's figures: ``summary.json`` and the privacy entries of ``privacy.json``."""

from __future__ import annotations

from typing import Any

from fedfuse.config import FedfuseConfig
from fedfuse.coordinator.records import FederationResult
from fedfuse.fusion.result import FusionResult
from fedfuse.fusion.stacking import member_shares

PRIVACY_OFF: dict[str, Any] = {"mode": "off", "max_epsilon": None, "delta": None}
"""The privacy summary of a run without DP."""


def privacy_entries(result: FederationResult) -> list[dict[str, Any]]:
    """``privacy.json``'s per-client entries, from each site's last report."""
    entries = []
    for m in result.participants:
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


def build_summary(cfg: FedfuseConfig, result: FederationResult, wall_seconds: float,
                  label_skew: float | None = None) -> dict[str, Any]:
    """The run's headline figures. ``secure_aggregation`` is true only when every cohort
    update the coordinator applied came out of a secure sum (and at least one did).
    ``label_skew`` is known in simulation only (a deployment's partition is the sites'
    own data), so a deployed run (``label_skew`` None) has ``deployment`` true and a
    null ``partition``. ``device`` is where the coordinator computed (in simulation,
    every site too)."""
    last = result.history[-1].cohorts
    cohorts = {
        arch: {"clients": len(c.participants), "test_accuracy": last[arch].test_accuracy,
               "test_loss": last[arch].test_loss,
               "best_test_accuracy": max(r.cohorts[arch].test_accuracy or 0.0
                                         for r in result.history)}
        for arch, c in result.cohorts.items()
    }
    return {
        "scenario": cfg.name,
        "seed": cfg.seed,
        "rounds": len(result.history),
        "clients": len(result.participants),
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


def served_weights(fusion: FusionResult) -> dict[str, float]:
    """Each served model's weight: the soft vote's weights; for the stacking head each
    member's share of it (``fedfuse.stacking.member_shares``); the student alone: 1."""
    if fusion.method == "stack" and fusion.stack is not None:
        shares = member_shares(fusion.stack.state["weight"].numpy(), len(fusion.members))
        return dict(zip(fusion.members, map(float, shares)))
    if fusion.method == "distill" and fusion.student is not None:
        return {fusion.student.arch: 1.0}
    return dict(zip(fusion.members, map(float, fusion.weights)))
