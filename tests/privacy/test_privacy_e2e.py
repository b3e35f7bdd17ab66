"""DP-SGD through Flower's real simulation engine: the ledger as the run records it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.torch import load_file

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.data.sites import run_test_split
from fedfuse.fusion.stacking import StackedModel, initial_head, load_head
from fedfuse.models.registry import load_model
from fedfuse.privacy.accounting import default_delta, epsilon_of, steps_per_epoch
from tests.helpers import SMALL_SCENARIO, run_cli

pytestmark = pytest.mark.slow

TARGET = 4.0


def simulate(root: Path, name: str, privacy: str, rounds: int) -> Path:
    scenario = root / f"{name}.toml"
    scenario.write_text(SMALL_SCENARIO.replace("rounds = 2", f"rounds = {rounds}")
                        .replace("[train]\nlocal_epochs = 1\n", "") + privacy)
    proc = run_cli("simulate", scenario, "--out", root / name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / name


STACKING_ROUNDS = 2


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    """Three training rounds and two stacking rounds, all DP-SGD under one budget, with
    secure aggregation; the stacking head is served. The coordinator keeps at most two
    messages in the engine at once (``simulation.max_in_flight``)."""
    return simulate(tmp_path_factory.mktemp("dp"), "dp",
                    f'\n[privacy]\nmode = "sample"\ntarget_epsilon = {TARGET}\n'
                    f'\n[fusion]\nmethod = "stack"\nstacking_rounds = {STACKING_ROUNDS}\n'
                    # two messages at a time in the engine: every exchange is windowed
                    '\n[simulation]\nmax_in_flight = 2\n', rounds=3)


def load(run: Path, name: str):
    text = (run / name).read_text()
    return [json.loads(x) for x in text.splitlines()] if name.endswith("l") else json.loads(text)


def test_reported_epsilon_is_tight_and_below_opacus_rdp_bound(dp_run):
    """The default accountant is PLD: its ε agrees with Opacus's PRV accountant (an
    independent tight bound) and is below Opacus's RDP bound for the same history."""
    clients = {c["name"]: c for c in load(dp_run, "clients.json")}
    entries = load(dp_run, "privacy.json")["clients"]
    assert sorted(e["client_id"] for e in entries) == sorted(clients)
    for e in entries:
        n = clients[e["client_id"]]["num_train"]
        per_round = steps_per_epoch(n, 32)  # DP defaults: batch 32, one local epoch
        assert e["sample_rate"] == pytest.approx(1 / per_round)
        planned = (3 + STACKING_ROUNDS) * per_round
        assert planned - 1 <= e["steps"] <= planned
        assert e["delta"] == default_delta(n)
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"])]
        rdp = RDPAccountant()
        rdp.history = history
        assert e["epsilon"] < rdp.get_epsilon(e["delta"])
        prv = PRVAccountant()
        prv.history = history
        assert e["epsilon"] == pytest.approx(prv.get_epsilon(e["delta"]), rel=0.01)
        # σ was calibrated so the 3 + 2 planned rounds spend the target, no more
        assert 0.9 * TARGET < e["epsilon"] <= TARGET
        assert e["status"] == "trained" and e["accountant"] == "pld"


def test_epsilon_grows_every_round(dp_run):
    for arch in ("cnn", "mlp", "logreg"):
        spent = [r["cohorts"][arch]["max_epsilon"] for r in load(dp_run, "metrics.jsonl")]
        assert len(spent) == 3 and spent[0] > 0
        assert all(b > a for a, b in zip(spent, spent[1:]))


def test_summary_and_artifact_carry_the_privacy_figures(dp_run):
    entries = load(dp_run, "privacy.json")["clients"]
    privacy = load(dp_run, "summary.json")["privacy"]
    assert privacy["mode"] == "sample" and privacy["budget"] == TARGET
    assert privacy["max_epsilon"] == max(e["epsilon"] for e in entries)
    assert privacy["delta"] == max(e["delta"] for e in entries)
    assert FusedPredictor.load(dp_run / "model").manifest["privacy"] == privacy


def test_the_private_stacking_head_is_trained_scored_and_served(dp_run, tmp_path):
    summary = load(dp_run, "summary.json")
    fused = summary["fused"]
    assert fused["method"] == "stack" and set(fused["methods"]) == {"soft_vote", "stack"}
    assert fused["methods"]["stack"]["rounds"] == STACKING_ROUNDS
    assert summary["secure_sums"] == 3 * 3 + STACKING_ROUNDS  # the head's sums were secure
    assert summary["secure_aggregation"] is True
    fit = load(dp_run, "fusion_stats.json")["stack"]["fit"]
    assert len(fit["train_loss"]) == STACKING_ROUNDS and all(v > 0 for v in fit["train_loss"])
    assert fit["secagg_clipped"] == [0] * STACKING_ROUNDS  # its own clip range fits it

    test = run_test_split(dp_run)
    predictor = FusedPredictor.load(dp_run / "model")
    assert predictor.manifest["fusion"]["method"] == "stack"
    members = [load_model(m["arch"], test.schema,
                          load_file(dp_run / "cohorts" / f"{m['arch']}.safetensors"))
               for m in predictor.manifest["members"]]
    head = load_head(load_file(dp_run / "stack_head.safetensors"))
    expected = torch.softmax(StackedModel(members, head)(torch.as_tensor(test.X)), 1)
    np.testing.assert_allclose(predictor.predict_proba(test.X), expected.detach().numpy(),
                               atol=1e-6)
    labels = np.array(test.schema.class_labels)[test.y]
    assert float((predictor.predict(test.X) == labels).mean()) == pytest.approx(
        fused["test_accuracy"], abs=1e-9)
    vote = fused["methods"]["soft_vote"]["weights"]
    start = initial_head(np.array([vote[m["arch"]] for m in predictor.manifest["members"]]),
                         test.schema.num_classes)
    assert np.abs(head.weight.detach().numpy() - start.weight.detach().numpy()).max() > 1e-3
    assert sum(fused["weights"].values()) == pytest.approx(1.0)

    copy = tmp_path / "copy"
    shutil.copytree(dp_run, copy)
    assert run_cli("fuse", copy, "--method", "soft_vote").returncode == 0
    assert not (copy / "model" / "head.safetensors").exists()
    assert load(copy, "summary.json")["fused"]["method"] == "soft_vote"
    assert run_cli("fuse", copy, "--method", "stack").returncode == 0
    np.testing.assert_allclose(FusedPredictor.load(copy / "model").predict_proba(test.X),
                               predictor.predict_proba(test.X), atol=1e-6)
    assert load(copy, "summary.json")["fused"] == fused


def test_sites_stop_at_their_budget_and_the_run_ends(tmp_path):
    # without secure aggregation: with it, a cohort of three stops training when its
    # first site is at its budget (test_lone_site_stops_training_under_secure_aggregation)
    budget = 4.0
    run = simulate(tmp_path, "capped", f'\n[privacy]\nmode = "sample"\nnoise_multiplier = 1.0'
                   f"\nbudget_epsilon = {budget}\n[secure_aggregation]\nenabled = false\n",
                   rounds=6)
    entries = load(run, "privacy.json")["clients"]
    for e in entries:
        assert e["status"] == "budget-exhausted" and e["epsilon"] <= budget
        one_more = round(1 / e["sample_rate"])
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"] + one_more)]
        # it stopped only when it had to
        assert epsilon_of(history, e["delta"], e["accountant"]) > budget
    rounds = load(run, "metrics.jsonl")
    assert len(rounds) < 6  # every site at its budget: the coordinator stopped early
    refused = sum(c["budget_exhausted"] for r in rounds for c in r["cohorts"].values())
    assert refused == len(entries) == 9  # each site refused once, then was not sampled
    assert all(c["train_clients"] == 0 for c in rounds[-1]["cohorts"].values())
    assert load(run, "summary.json")["privacy"]["clients_at_budget"] == 9


def test_lone_site_stops_training_under_secure_aggregation(tmp_path):
    budget = 4.0
    run = simulate(tmp_path, "capped-secure", f'\n[privacy]\nmode = "sample"\n'
                   f"noise_multiplier = 1.0\nbudget_epsilon = {budget}\n", rounds=6)
    entries = load(run, "privacy.json")["clients"]
    assert all(e["epsilon"] <= budget for e in entries)
    by_cohort: dict[str, list[str]] = {}
    for e in entries:
        by_cohort.setdefault(e["cohort"], []).append(e["status"])
    # in each cohort of three, the first site at its budget ends the cohort's training
    # (two left could not hide their updates from each other)
    assert all("budget-exhausted" in s for s in by_cohort.values())
    rounds = load(run, "metrics.jsonl")
    assert len(rounds) < 6
    assert all(c["train_clients"] == 0 for c in rounds[-1]["cohorts"].values())
    assert load(run, "summary.json")["secure_aggregation"] is True
