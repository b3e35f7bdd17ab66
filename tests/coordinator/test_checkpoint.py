"""Checkpoints: written atomically, verified when read, holding every piece of state a
resumed run needs (models, strategies' momentum and samplers, ledgers); and a real run
killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from safetensors.numpy import load_file

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import load_config
from fedfuse.coordinator.checkpoint import (
    Checkpoint,
    load_latest,
    path_for,
    restore,
    snapshot,
    write_checkpoint,
)
from fedfuse.coordinator.cohorts import Cohort
from fedfuse.coordinator.records import CohortRound, Participant, RoundRecord
from fedfuse.data.sites import plan_federation, run_test_split
from fedfuse.strategies import cohort_strategy
from tests.helpers import (
    FEDFUSE,
    GLOBAL,
    ROOT,
    SMALL_SCENARIO,
    NodesGrid,
    honest,
    run_cli,
)
from tests.helpers import train_update as update

pytestmark = pytest.mark.usefixtures("task_identity")


# -- checkpoints ------------------------------------------------------------------------

def checkpoint(server_round: int) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    sampler = cohort_strategy("fedavg", "mlp", [1, 2, 3], seed=server_round).state_arrays()
    return Checkpoint(round=server_round,
                      cohorts={"mlp": {"z.weight": rng.normal(size=(2, 3)).astype(np.float32),
                                       "a.bias": rng.normal(size=2).astype(np.float32)}},
                      history=[{"round": r} for r in range(1, server_round + 1)],
                      strategies={"mlp": {"momentum/0": rng.normal(size=(2, 3)), **sampler}},
                      privacy={"client-1": {"epsilon": 1.5}}, retired={"mlp": ["client-2"]},
                      secure_sums=server_round)


def test_checkpoints_round_trip_and_keep_the_newest_two(tmp_path: Path):
    for r in (1, 2, 3):
        write_checkpoint(tmp_path, checkpoint(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0002.ckpt", "round-0003.ckpt"]
    loaded = load_latest(tmp_path)
    original = checkpoint(3)
    assert loaded.round == 3 and loaded.history == original.history
    assert list(loaded.cohorts["mlp"]) == ["z.weight", "a.bias"]  # the model's order
    assert np.array_equal(loaded.cohorts["mlp"]["z.weight"], original.cohorts["mlp"]["z.weight"])
    assert loaded.retired == {"mlp": ["client-2"]} and loaded.secure_sums == 3
    assert list(loaded.strategies["mlp"]) == ["momentum/0", "sampler"]
    assert np.array_equal(loaded.strategies["mlp"]["momentum/0"],
                          original.strategies["mlp"]["momentum/0"])
    sampler = loaded.strategies["mlp"]["sampler"]  # the cohort sampler's state, exactly
    assert sampler.dtype == np.int64 and sampler.shape == (626,)
    assert np.array_equal(sampler, original.strategies["mlp"]["sampler"])


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, caplog):
    for r in (1, 2):
        write_checkpoint(tmp_path, checkpoint(r))
    latest = path_for(tmp_path, 2)
    data = bytearray(latest.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in a tensor
    latest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fedfuse.checkpoint"):
        assert load_latest(tmp_path).round == 1
    assert "round-0002.ckpt is unusable (its SHA-256 does not match" in caplog.text
    path_for(tmp_path, 1).write_bytes(b"FFCKPT1\n" + b"\0" * 10)  # truncated
    assert load_latest(tmp_path) is None


# -- a real simulation: killed and resumed ----------------------------------------------

# 3 cohorts x 2, one of them a user factory in a module next to the scenario
RESUME_SCENARIO = SMALL_SCENARIO.replace("rounds = 2", "rounds = 4").replace(
    'arch = "mlp"', 'arch = "resumemodels:tanh_mlp"')

USER_MODULE = """
from torch import nn


def tanh_mlp(schema, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, hidden), nn.Tanh(),
                         nn.Linear(hidden, schema.num_classes))
"""


def load(model: Path, code_dir: Path) -> FusedPredictor:
    """An artifact of this run: its user member's code allowed, from the scenario's dir
    (a module name no other test uses: the import stays cached in this process)."""
    return FusedPredictor.load(model, allow_arch=("resumemodels:*",), search=str(code_dir))


def final_models(run: Path) -> dict[str, np.ndarray]:
    return {f"{p.stem}/{k}": v for p in sorted((run / "cohorts").glob("*.safetensors"))
            for k, v in load_file(p).items()}


RESUME_EXTRAS = """
[privacy]
mode = "sample"
target_epsilon = 8.0

[fusion]
method = "distill"
unlabeled_fraction = 0.5
distill_steps = 150
student = "tanh_mlp"
"""


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_models(tmp_path: Path):
    """Killed with SIGKILL after round 3's checkpoint, with that checkpoint then
    corrupted: the resume warns, goes back to round 2, and ends with the same cohort
    models, bit for bit, and the same metrics as an uninterrupted run, under secure
    aggregation, DP-SGD and server momentum, whose state (with each cohort sampler's)
    is in the checkpoint; no site's ledger is charged twice for a repeated round. One
    cohort is a user factory's. Both runs then distil the same student of that user
    architecture (FedDF fusion), which is the artifact served."""
    (tmp_path / "resumemodels.py").write_text(USER_MODULE)
    scenario = tmp_path / "resume.toml"
    scenario.write_text(RESUME_SCENARIO.replace("local_epochs = 1",
                                                "local_epochs = 1\nserver_momentum = 0.5")
                        + RESUME_EXTRAS)
    straight = run_cli("simulate", scenario, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([*FEDFUSE, "simulate", str(scenario), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    ckpt3 = tmp_path / ".killed.partial" / "checkpoints" / "round-0003.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt3.exists():
        assert proc.poll() is None, "the run ended before its third checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    # the CLI and its Ray workers, as soon as round 3's checkpoint is there: a kill that
    # lands inside a site's round 4, between its ledger's charge and its replay entry,
    # leaves that round charged without a stored answer (the safe side, docs in
    # fedfuse/site/replay.py), so the resumed round 4 is charged twice and refused
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and ckpt3.exists()
    data = bytearray(ckpt3.read_bytes())
    data[100] ^= 0xFF
    ckpt3.write_bytes(bytes(data))

    again = run_cli("simulate", scenario, "--out", out)  # a fresh start is refused
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli("simulate", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "round-0003.ckpt is unusable" in resumed.stderr
    assert "resuming after round 2 of 4" in resumed.stderr

    a, b = final_models(tmp_path / "straight"), final_models(out)
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    history = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(line.split('"round": ')[1].split(",")[0]) for line in history] == [1, 2, 3, 4]
    assert rounds_without_times(out) == rounds_without_times(tmp_path / "straight")
    assert not (out / "checkpoints").exists()
    # round 3 (and round 4 where the kill came later) was trained before the kill and
    # requested again after the resume: each site answered from its replay store, so no
    # round is charged twice
    straight_ledgers = ledgers(tmp_path / "straight")
    assert ledgers(out) == straight_ledgers and len(straight_ledgers) == 9
    assert not list(out.glob("sites/*/replay"))  # needed only while the run can resume
    assert all(steps > 0 for steps, _ in straight_ledgers.values())
    check_distilled_artifact(tmp_path / "straight", tmp_path / "rebuilt", tmp_path)
    test = run_test_split(out)
    np.testing.assert_array_equal(load(out / "model", tmp_path).predict_proba(test.X),
                                  load(tmp_path / "straight" / "model", tmp_path)
                                  .predict_proba(test.X))


def rounds_without_times(run: Path) -> list[dict]:
    """``metrics.jsonl`` without the wall-clock times."""
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rounds]


def ledgers(run: Path) -> dict[str, tuple[int, float]]:
    """Each simulated site's spent steps and ε, from its ledger file in the run."""
    from fedfuse.privacy.ledger import FileLedgerStore

    found = {}
    for path in sorted((run / "sites").glob("*/privacy-ledger.json")):
        ledger = FileLedgerStore(path).load()
        found[path.parent.name] = (ledger.steps, round(ledger.epsilon(), 9))
    return found


def check_distilled_artifact(run: Path, copy: Path, code_dir: Path) -> None:
    """The served artifact is the distilled student alone; both methods are reported,
    scored on the same test split; ``fedfuse fuse`` rebuilds the same artifact."""
    import shutil

    summary = json.loads((run / "summary.json").read_text())
    fused = summary["fused"]
    assert fused["method"] == "distill"
    assert set(fused["methods"]) == {"soft_vote", "distill"}
    student = fused["methods"]["distill"]
    assert student["transfer_examples"] > 100 and student["student"] in summary["cohorts"]
    assert fused["weights"] == {student["student"]: 1.0}
    assert fused["test_accuracy"] == student["test_accuracy"] > 0.3
    predictor = load(run / "model", code_dir)
    assert [m["arch"] for m in predictor.manifest["members"]] == [student["student"]]
    assert predictor.manifest["members"][0]["model"]["arch"] == "resumemodels:tanh_mlp"
    fit = predictor.manifest["fusion"]["fit"]
    assert fit["objective"] == "kl_to_soft_vote" and fit["holdout_kl"] < fit["start_kl"]
    test = run_test_split(run)
    labels = np.array(test.schema.class_labels)[test.y]
    assert float((predictor.predict(test.X) == labels).mean()) == pytest.approx(
        fused["test_accuracy"], abs=1e-9)
    assert len(test) + student["transfer_examples"] == len(
        plan_federation(load_config(run / "config.toml")).test)
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    assert run_cli("fuse", copy).returncode == 0
    np.testing.assert_allclose(load(copy / "model", code_dir).predict_proba(test.X),
                               predictor.predict_proba(test.X), atol=1e-6, rtol=0)
    # the user prefers the ensemble after all: no federation needed to switch
    assert run_cli("fuse", copy, "--method", "soft_vote").returncode == 0
    ensemble = load(copy / "model", code_dir)
    assert sorted(m["arch"] for m in ensemble.manifest["members"]) == sorted(summary["cohorts"])
    switched = json.loads((copy / "summary.json").read_text())["fused"]
    assert switched["method"] == "soft_vote" and set(switched["methods"]) == {"soft_vote",
                                                                              "distill"}
    assert float((ensemble.predict(test.X) == labels).mean()) == pytest.approx(
        switched["test_accuracy"], abs=1e-9)
    assert switched["test_accuracy"] == fused["methods"]["soft_vote"]["test_accuracy"]
    shown = run_cli("report", copy)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split("│")[1].strip().split(":")[0]: line for line in shown.stderr.splitlines()
            if line.startswith("│ fused")}
    assert set(rows) == {"fused, soft_vote", "fused, distill"}
    assert "yes" in rows["fused, soft_vote"] and "yes" not in rows["fused, distill"]
    assert f"{student['test_accuracy']:.4f}" in rows["fused, distill"]
    gain = 100 * (switched["test_accuracy"] - fused["best_member_test_accuracy"])
    assert f"served predictor vs the best member: {gain:+.1f} points" in shown.stderr


def test_server_momentum_state_survives_a_checkpoint():
    """FedAvgM's momentum is part of the checkpoint: aggregating round 2 after a restore
    gives the same model as without the interruption."""
    from flwr.app import ConfigRecord

    def round_replies(r: int):
        return [update(n, honest(n, 10 * r + n)) for n in (1, 2)]

    def fresh():
        return cohort_strategy("fedavg", "logreg", [1, 2], server_momentum=0.9, server_lr=0.5)

    straight = fresh()
    list(straight.configure_train(1, GLOBAL, ConfigRecord(), NodesGrid([1, 2])))
    after1, _ = straight.aggregate_train(1, round_replies(1))
    after2, _ = straight.aggregate_train(2, round_replies(2))

    first = fresh()
    list(first.configure_train(1, GLOBAL, ConfigRecord(), NodesGrid([1, 2])))
    saved_model, _ = first.aggregate_train(1, round_replies(1))
    ckpt = Checkpoint(round=1, cohorts={"logreg": {k: v.numpy() for k, v in saved_model.items()}},
                      history=[], strategies={"logreg": first.state_arrays()})
    restored = Checkpoint.from_bytes(ckpt.to_bytes())
    model = ArrayRecord({k: Array(v) for k, v in restored.cohorts["logreg"].items()})
    resumed = fresh()
    resumed.restore_state(restored.strategies["logreg"], model)
    again, _ = resumed.aggregate_train(2, round_replies(2))
    assert restored.strategies["logreg"]  # the momentum was saved
    for key in after2.keys():
        np.testing.assert_array_equal(again[key].numpy(), after2[key].numpy())
    assert not np.array_equal(after1["w"].numpy(), after2["w"].numpy())


def test_the_cohort_samplers_state_survives_a_checkpoint():
    """With ``fraction_train`` < 1 each round's sample is drawn by the cohort's own seeded
    generator, whose state the checkpoint holds: a coordinator restarted after round 2
    (fresh strategies, node ids changed) samples the same sites in rounds 3 and 4 as the
    uninterrupted run, and the sites retired before the checkpoint stay retired."""
    names = [f"client-{i}" for i in range(10)]

    def cohort(first_id: int) -> tuple[Cohort, list[Participant], NodesGrid]:
        participants = [Participant(first_id + i, name, i, "logreg", 50, 10)
                        for i, name in enumerate(names)]
        ids = [p.node_id for p in participants]
        strategy = cohort_strategy("fedavg", "logreg", ids, seed=7, fraction_train=0.5)
        return Cohort("logreg", strategy, GLOBAL, 0.1, participants), participants, NodesGrid(ids)

    def sampled(c: Cohort, grid: NodesGrid, server_round: int) -> list[str]:
        names_of = {p.node_id: p.name for p in c.participants}
        msgs = c.strategy.configure_train(server_round, c.arrays, ConfigRecord(), grid)
        return [names_of[m.metadata.dst_node_id] for m in msgs]

    straight, _, grid = cohort(101)
    straight.strategy.retire(101)
    expected = [sampled(straight, grid, r) for r in (1, 2, 3, 4)]
    assert all(len(s) == 4 for s in expected)  # half of the 9 that may train
    assert len({tuple(s) for s in expected}) > 1  # the samples vary from round to round

    first, participants, grid = cohort(101)
    first.strategy.retire(101)
    assert [sampled(first, grid, r) for r in (1, 2)] == expected[:2]
    history = [RoundRecord(r, {"logreg": CohortRound(train_clients=4, test_accuracy=0.5)},
                           1.5) for r in (1, 2)]
    saved = Checkpoint.from_bytes(snapshot(2, {"logreg": first}, participants, history, {},
                                           0).to_bytes())
    assert "sampler" in saved.strategies["logreg"] and saved.retired == {"logreg": ["client-0"]}

    again, participants, grid = cohort(501)  # a new federation: other node ids
    back = restore(saved, {"logreg": again}, participants, {})
    assert [r.to_dict() for r in back] == [r.to_dict() for r in history]
    assert again.strategy.trainers == [p.node_id for p in participants[1:]]
    assert [sampled(again, grid, r) for r in (3, 4)] == expected[2:]
    fresh, _, grid = cohort(501)  # without the sampler's state: round 1's sample again
    fresh.strategy.retire(501)
    assert sampled(fresh, grid, 3) == expected[0] != expected[2]


def test_cohort_ledgers_survive_a_checkpoint_round_trip():
    from fedfuse.privacy.client_level import cohort_ledger
    from fedfuse.privacy.ledger import PrivacyLedger

    ledger = cohort_ledger("rdp", None, 8.0, 8.0, None, sites=4, planned_rounds=10)
    ledger.history += [(ledger.noise_multiplier, 1.0, 1)] * 3
    ckpt = Checkpoint(round=3, cohorts={"mlp": {"w": np.zeros(2, np.float32)}}, history=[],
                      ledgers={"mlp": ledger.to_dict()})
    back = PrivacyLedger.from_dict(Checkpoint.from_bytes(ckpt.to_bytes()).ledgers["mlp"])
    assert back == ledger and back.steps == 3
    assert back.epsilon() == pytest.approx(ledger.epsilon())
