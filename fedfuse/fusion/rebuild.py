"""``fedfuse fuse RUN_DIR``: rebuild a run's fused artifact from what the run kept.

Inputs are the cohort models (``cohorts/*.safetensors``), the stacking head and the
distilled student if the run made them (``stack_head.safetensors``,
``student.safetensors``) and the sites' summed validation statistics
(``fusion_stats.json``), so no site is contacted again. The weights are refitted
from those sums, the fused model is re-scored on the coordinator's test split, and the new
``model/`` replaces the old one only once it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedfuse.artifact.fused import SCORED_FILES, write_model
from fedfuse.artifact.manifest import EnsembleMember
from fedfuse.artifact.summary import fused_summary
from fedfuse.atomic import atomic_write_json
from fedfuse.config import load_config
from fedfuse.data.sites import run_test_split
from fedfuse.errors import FedfuseError
from fedfuse.fusion.result import SCORED, FusionResult
from fedfuse.fusion.stacking import StackedModel, load_head
from fedfuse.models.registry import load_model
from fedfuse.models.training import evaluate, predict_proba

MISSING = {"distill": ("distilled student", "fusion.unlabeled_fraction", "student"),
           "stack": ("stacking head", "fusion.stacking_rounds", "head")}
"""Why a run can lack a method's model: what it is, the setting that turns it on, and
its short name."""


def fuse_run(run_dir: Path, semver: str = "1.0.0", method: str | None = None) -> dict[str, Any]:
    """Refit and rewrite ``run_dir/model`` (and ``summary.json``'s fused figures) for
    ``method`` (default: the run's ``fusion.method``); returns the new manifest."""
    needed = ["config.toml", "summary.json", "fusion_stats.json"]
    missing = [n for n in needed if not (run_dir / n).is_file()]
    if missing:
        raise FedfuseError(f"{run_dir}: not a complete run directory (missing "
                           f"{', '.join(missing)})")
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = json.loads((run_dir / "fusion_stats.json").read_text())
    if method in SCORED and not saved.get(SCORED[method]):
        what, setting, noun = MISSING[method]
        raise FedfuseError(f"{run_dir}: the run has no {what} (it ran with {setting} = 0 "
                           f"or no site scored the {noun}); choose --method soft_vote")
    states = {key: load_weights(run_dir / SCORED_FILES[m], run_dir)
              for m, key in SCORED.items() if saved.get(key)}
    stats = FusionResult.from_dict(saved, states)
    test = run_test_split(run_dir)
    cfg = load_config(run_dir / "config.toml")
    members: list[EnsembleMember] = []
    models: list[torch.nn.Module] = []
    probas = []
    for arch in stats.members:
        state = load_weights(run_dir / "cohorts" / f"{arch}.safetensors", run_dir)
        spec = cfg.cohort_named(arch).model
        models.append(load_model(spec, test.schema, state, code=cfg.own_code, key=arch))
        probas.append(predict_proba(models[-1], test.X))
        cohort = summary["cohorts"][arch]
        members.append(EnsembleMember(arch, spec, state, cohort["clients"],
                                      cohort["test_accuracy"]))
    fusion = FusionResult.fit(stats.members, stats.A, stats.b, stats.num_examples,
                              stats.sites, probas, test.y)
    rescored = {}
    if stats.stack is not None:
        stacked = StackedModel(models, load_head(stats.stack.state))
        rescored["stack"] = replace(stats.stack,
                                    test_accuracy=evaluate(stacked, test.X, test.y).accuracy)
    if stats.student is not None:
        student = load_model(cfg.cohort_named(stats.student.arch).model, test.schema,
                             stats.student.state, code=cfg.own_code, key=stats.student.arch)
        rescored["student"] = replace(stats.student,
                                      test_accuracy=evaluate(student, test.X, test.y).accuracy)
    fusion = fusion.with_candidates(method or cfg.fusion.method, **rescored)
    partial = Path(tempfile.mkdtemp(prefix=".model.partial-", dir=run_dir))
    try:
        manifest = write_model(partial, test.schema, fusion, members,
                               summary["privacy"], semver)
        old = run_dir / "model"
        if old.exists():
            retired = Path(tempfile.mkdtemp(prefix=".model.old-", dir=run_dir))
            os.replace(old, retired / "model")
            os.replace(partial, old)
            shutil.rmtree(retired)
        else:
            os.replace(partial, old)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    summary["fused"] = fused_summary(fusion, summary["cohorts"])
    atomic_write_json(run_dir / "summary.json", summary)
    return manifest


def load_weights(path: Path, run_dir: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FedfuseError(f"{run_dir}: model weights {path.name} are missing")
    return load_file(path)
