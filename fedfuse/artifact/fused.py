"""The fused predictor a federation made, written as the run's artifact ``model/`` (and
its ``fusion_stats.json``, stacking head and student), by ``fedfuse simulate``, a
deployed coordinator and ``fedfuse fuse`` alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save as safetensors_bytes

from fedfuse.artifact.manifest import EnsembleMember, write_artifact
from fedfuse.artifact.summary import served_weights
from fedfuse.atomic import atomic_write_bytes, atomic_write_json
from fedfuse.coordinator.records import FederationResult
from fedfuse.data.datasets import DataSchema
from fedfuse.fusion.result import FusionResult
from fedfuse.models.spec import ModelSpec

SCORED_FILES = {"stack": "stack_head.safetensors", "distill": "student.safetensors"}
"""Where a run directory keeps the stacking head and the distilled student."""


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
    last = result.history[-1].cohorts
    members = []
    for arch in result.fusion.members:
        cohort = result.cohorts[arch]
        assert cohort.spec is not None
        members.append(EnsembleMember(arch, cohort.spec, cohort.arrays.to_torch_state_dict(),
                                      len(cohort.participants), last[arch].test_accuracy))
    write_model(run_path / "model", schema, result.fusion, members, privacy)


def write_model(directory: Path, schema: DataSchema, fusion: FusionResult,
                members: list[EnsembleMember], privacy: dict[str, Any],
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
            directory, members=[EnsembleMember(student.arch, spec_of(members, student.arch),
                                               student.state, clients,
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


def spec_of(members: list[EnsembleMember], name: str) -> ModelSpec:
    """What builds cohort ``name``'s model (the distilled student takes one cohort's)."""
    return next(m.spec for m in members if m.arch == name)
