"""Client-level DP (``privacy.mode = "user"``): clipping, the noisy mean, the cohort's
account, and a real simulation under it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from fedfuse.config import config_from_dict
from fedfuse.errors import ConfigError
from fedfuse.privacy.accounting import default_delta
from fedfuse.privacy.client_level import clip_update, cohort_ledger, noisy_mean, release
from tests.helpers import SMALL_SCENARIO, incoming, run_cli


def test_clip_update_scales_to_the_bound_and_keeps_short_updates():
    delta = [np.full((3, 4), 1.0), np.full(4, 1.0)]  # norm 4
    clipped, norm = clip_update(delta, 2.0)
    assert norm == pytest.approx(4.0)
    assert np.sqrt(sum((c ** 2).sum() for c in clipped)) == pytest.approx(2.0)
    assert np.allclose(clipped[0], 0.5)
    short, _ = clip_update(delta, 10.0)
    assert all(np.array_equal(a, b) for a, b in zip(short, delta))
    zero, norm = clip_update([np.zeros(3)], 1.0)
    assert norm == 0.0 and not zero[0].any()


def test_noisy_mean_divides_by_the_sampled_count_and_adds_sigma_c_noise():
    total = [np.full(200_000, 6.0)]
    exact = noisy_mean(total, 4, 0.0, 1.5, np.random.default_rng(0))
    assert np.allclose(exact[0], 1.5)
    noisy = noisy_mean(total, 4, 2.0, 1.5, np.random.default_rng(0))
    noise = noisy[0] - 1.5
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(2.0 * 1.5 / 4, rel=0.01)


def test_cohort_ledger_calibrates_sigma_for_the_planned_releases():
    ledger = cohort_ledger("rdp", None, 8.0, 8.0, None, sites=8, planned_rounds=30)
    assert ledger.delta == default_delta(8)
    reference = RDPAccountant()
    reference.history = [(ledger.noise_multiplier, 1.0, 30)]
    eps = reference.get_epsilon(ledger.delta)
    assert 0.99 * 8.0 <= eps <= 8.0
    assert not ledger.would_exceed(ledger.noise_multiplier, 1.0, 30)
    assert ledger.would_exceed(ledger.noise_multiplier, 1.0, 31)
    fixed = cohort_ledger("rdp", 1e-3, None, None, 2.5, sites=8, planned_rounds=30)
    assert fixed.noise_multiplier == 2.5 and fixed.delta == 1e-3


def _reply(sent, weights: dict[str, np.ndarray], n: int):
    from flwr.app import Message
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                               "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0,
                                                        "train-accuracy": 0.5})}),
                   reply_to=sent)


def test_release_clips_each_site_and_divides_by_the_sampled_count(task_identity):
    w = {"a": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in w.items()})
    sent = [incoming(RecordDict(), node_id=i) for i in (1, 2, 3)]
    honest = _reply(sent[0], {"a": np.full(4, 0.1, np.float32), "b": np.ones(2, np.float32)}, 1)
    # a site claiming 5 examples still counts once without secure aggregation
    huge = _reply(sent[1], {"a": np.full(4, 100.0, np.float32), "b": np.ones(2, np.float32)}, 5)
    ledger = cohort_ledger("rdp", 1e-3, None, None, 0.0 + 1e-12, sites=3, planned_rounds=5)
    out = release(arrays, [honest, huge], sent, ledger, 1.0, np.random.default_rng(0),
                  secure=False)
    # Σ Δ = (0.1, 0.1, 0.1, 0.1) + (0.5, 0.5, 0.5, 0.5), the huge one clipped to norm 1,
    # over m = 3 sampled sites (site 3 did not answer)
    assert np.allclose(out.content["arrays"]["a"].numpy(), 0.6 / 3, atol=1e-6)
    assert np.allclose(out.content["arrays"]["b"].numpy(), 1.0, atol=1e-6)
    assert out.content["metrics"]["num-examples"] == 2
    assert out.metadata.src_node_id == 1  # a cohort member, so the strategy keeps it
    assert ledger.history == [(1e-12, 1.0, 1)]
    assert release(arrays, [], sent, ledger, 1.0, np.random.default_rng(0),
                   secure=False) is None
    assert len(ledger.history) == 1  # nothing released, nothing charged


BASE = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 4}],
        "privacy": {"mode": "user", "target_epsilon": 8.0}}


@pytest.mark.parametrize("extra, key", [
    ({"robustness": {"aggregation": "median"}, "secure_aggregation": {"enabled": False}},
     "robustness.aggregation"),
    ({"fusion": {"stacking_rounds": 2}}, "fusion.stacking_rounds"),
    ({"privacy": {"mode": "user", "target_epsilon": 8.0, "delta": 0.25}}, "privacy.delta"),
    ({"privacy": {"mode": "user", "target_epsilon": 8.0, "clipping_norm": 0.0}},
     "privacy.clipping_norm"),
    ({"privacy": {"mode": "user"}}, "privacy.target_epsilon"),
])
def test_bad_user_level_settings_are_refused(extra, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**BASE, **extra})
    assert err.value.key == key


NOISE = 0.8
BUDGET = 6.0
ROUNDS = 4


@pytest.mark.slow
def test_user_level_simulation_charges_every_site_and_stops_at_the_budget(tmp_path: Path):
    """Secure aggregation on: the coordinator adds noise to each cohort's masked sum.
    With σ = 0.8 and a budget of 6, the third release would cost ε > 6, so each cohort
    releases twice and then stops; every site's ε (the default PLD accountant's) agrees
    with Opacus's PRV accountant for two Gaussian releases at sample rate 1, and is below
    Opacus's RDP bound."""
    scenario = tmp_path / "user.toml"
    scenario.write_text(SMALL_SCENARIO.replace("rounds = 2", f"rounds = {ROUNDS}")
                        + f'\n[privacy]\nmode = "user"\nnoise_multiplier = {NOISE}\n'
                        f'budget_epsilon = {BUDGET}\nclipping_norm = 0.5\n')
    proc = run_cli("simulate", scenario, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    entries = json.loads((run / "privacy.json").read_text())["clients"]
    assert len(entries) == 9
    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history = prv.history = [(NOISE, 1.0, 2)]
    for e in entries:
        assert e["steps"] == 2 and e["sample_rate"] == 1.0
        assert e["noise_multiplier"] == NOISE and e["delta"] == default_delta(3)
        assert e["epsilon"] == pytest.approx(prv.get_epsilon(e["delta"]), rel=0.01)
        assert e["epsilon"] < rdp.get_epsilon(e["delta"])
        assert e["epsilon"] <= BUDGET and e["status"] == "budget-exhausted"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for arch in ("cnn", "mlp", "logreg"):
        trained = [r["cohorts"][arch].get("train_clients", 0) for r in rounds]
        assert trained[:2] == [3, 3] and not any(trained[2:])
        spent = [r["cohorts"][arch]["max_epsilon"] for r in rounds[:2]]
        assert 0 < spent[0] < spent[1]
        assert rounds[0]["cohorts"][arch]["secagg_clients"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "user"
    assert summary["privacy"]["max_epsilon"] == pytest.approx(entries[0]["epsilon"])
