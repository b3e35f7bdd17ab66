"""Robustness: update gates, robust aggregation, checkpoints and exact resumption."""

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
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from safetensors.numpy import load_file

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.coordinator.checkpoint import Checkpoint, load_latest, path_for, write_checkpoint
from fedfuse.config import config_from_dict, load_config
from fedfuse.errors import ConfigError
from fedfuse.coordinator.gates import check_update, gate_updates
from fedfuse.data.sites import plan_federation, run_test_split
from fedfuse.strategies import cohort_strategy
from tests.conftest import FEDFUSE, ROOT, SMALL_SCENARIO, reply_from, run_cli

pytestmark = pytest.mark.usefixtures("task_identity")

GLOBAL = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32)),
                      "b": Array(np.zeros(3, dtype=np.float32))})


def update(node: int, w: np.ndarray, b: np.ndarray | None = None, n: float = 50):
    b = np.zeros(3, dtype=np.float32) if b is None else b
    return reply_from(node, RecordDict({
        "arrays": ArrayRecord({"w": Array(w), "b": Array(b)}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.1,
                                 "train-accuracy": 0.9})}))


def honest(node: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, (3, 4)).astype(np.float32)


# -- gates ------------------------------------------------------------------------------

def test_gates_reject_nan_scaled_misshapen_and_overweight_updates():
    good = honest(1, 1)
    assert check_update(GLOBAL, update(1, good), 50, max_norm=1.0) is None
    nan = good.copy()
    nan[0, 0] = np.nan
    assert "NaN or infinite" in check_update(GLOBAL, update(2, nan), 50, 1.0)
    scaled = 100 * good  # w + 100 (w_i - w), with w = 0
    assert "exceeds robustness.max_update_norm" in check_update(GLOBAL, update(3, scaled), 50,
                                                               1.0)
    assert "is float32[4, 3]" in check_update(GLOBAL, update(4, good.T.copy()), 50, 1.0)
    assert "float64" in check_update(GLOBAL, update(5, good.astype(np.float64)), 50, 1.0)
    assert "claims 5000" in check_update(GLOBAL, update(6, good, n=5000), 50, 1.0)
    assert "claims 0" in check_update(GLOBAL, update(7, good, n=0), 50, 1.0)
    accepted, rejected = gate_updates(GLOBAL, [update(1, good), update(2, nan),
                                               update(3, scaled)], {1: 50, 2: 50, 3: 50}, 1.0)
    assert [r.metadata.src_node_id for r in accepted] == [1]
    assert [r.node_id for r in rejected] == [2, 3]


# -- robust aggregation -----------------------------------------------------------------

@pytest.mark.parametrize("rule, extra", [("median", {}), ("trimmed_mean", {"trim_fraction": 0.3}),
                                         ("krum", {"max_malicious": 2}),
                                         ("multikrum", {"max_malicious": 2,
                                                        "multikrum_select": 2})])
def test_a_poisoned_minority_stays_within_the_honest_range(rule, extra):
    """7 clients, 2 of them colluding with +1000 in every coordinate: each robust rule
    keeps every coordinate of the aggregate within the honest clients' range; FedAvg
    does not. (Krum needs n > 2f + 2: with n = 5 the two identical attackers win.)"""
    honest_w = [honest(n, n) for n in (1, 2, 3, 4, 5)]
    lo, hi = np.min(honest_w, axis=0), np.max(honest_w, axis=0)

    def replies():  # fresh messages for each strategy (aggregation consumes them)
        return ([update(n, w) for n, w in zip((1, 2, 3, 4, 5), honest_w)]
                + [update(n, np.full((3, 4), 1000.0, dtype=np.float32)) for n in (6, 7)])

    strategy = cohort_strategy(rule, "logreg", list(range(1, 8)), **extra)
    arrays, _ = strategy.aggregate_train(1, replies())
    w = arrays["w"].numpy()
    assert np.all(w >= lo - 1e-6) and np.all(w <= hi + 1e-6), (rule, w)

    fedavg, _ = cohort_strategy("fedavg", "logreg", list(range(1, 8))).aggregate_train(
        1, replies())
    assert np.all(fedavg["w"].numpy() > 200)


def test_robust_rules_and_norm_bounds_are_refused_with_secure_aggregation():
    raw = {"name": "t", "cohorts": [{"arch": "logreg", "clients": 4}]}
    with pytest.raises(ConfigError, match="robustness.aggregation: 'median' must see every"):
        config_from_dict({**raw, "robustness": {"aggregation": "median"}})
    with pytest.raises(ConfigError, match="robustness.max_update_norm: needs plaintext"):
        config_from_dict({**raw, "robustness": {"max_update_norm": 5.0}})
    cfg = config_from_dict({**raw, "robustness": {"aggregation": "median"},
                            "secure_aggregation": {"enabled": False}})
    assert cfg.robustness.aggregation == "median"


# -- checkpoints ------------------------------------------------------------------------

def checkpoint(server_round: int) -> Checkpoint:
    import random

    rng = np.random.default_rng(server_round)
    return Checkpoint(round=server_round,
                      cohorts={"mlp": {"z.weight": rng.normal(size=(2, 3)).astype(np.float32),
                                       "a.bias": rng.normal(size=2).astype(np.float32)}},
                      history=[{"round": r} for r in range(1, server_round + 1)],
                      strategies={"mlp": {"momentum/0": rng.normal(size=(2, 3))}},
                      privacy={"client-1": {"epsilon": 1.5}}, retired={"mlp": ["client-2"]},
                      secure_sums=server_round, random_state=random.getstate())


def test_checkpoints_round_trip_and_keep_the_newest_two(tmp_path: Path):
    for r in (1, 2, 3):
        write_checkpoint(tmp_path, checkpoint(r))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0002.ckpt", "round-0003.ckpt"]
    loaded = load_latest(tmp_path)
    original = checkpoint(3)
    assert loaded.round == 3 and loaded.history == original.history
    assert list(loaded.cohorts["mlp"]) == ["z.weight", "a.bias"]  # the model's order
    assert np.array_equal(loaded.cohorts["mlp"]["z.weight"], original.cohorts["mlp"]["z.weight"])
    assert loaded.random_state == original.random_state
    assert loaded.retired == {"mlp": ["client-2"]} and loaded.secure_sums == 3
    assert np.array_equal(loaded.strategies["mlp"]["momentum/0"],
                          original.strategies["mlp"]["momentum/0"])


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

RESUME_SCENARIO = SMALL_SCENARIO.replace("rounds = 2", "rounds = 4")  # 3 cohorts x 2


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
"""


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_models(tmp_path: Path):
    """Killed with SIGKILL after round 3's checkpoint, with that checkpoint then
    corrupted: the resume warns, goes back to round 2, and ends with the same cohort
    models as an uninterrupted run (within 1e-6), under secure aggregation, DP-SGD and
    server momentum, whose state is in the checkpoint; no site's ledger is charged twice
    for a repeated round. Both runs then distil the same student (FedDF fusion), which
    is the artifact served."""
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
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Ray workers
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
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0, err_msg=key)
    history = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(line.split('"round": ')[1].split(",")[0]) for line in history] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists()
    # rounds 3 and 4 were trained before the kill and requested again after the resume:
    # each site answered from its replay store, so no round is charged twice
    straight_ledgers = ledgers(tmp_path / "straight")
    assert ledgers(out) == straight_ledgers and len(straight_ledgers) == 6
    assert not list(out.glob("sites/*/replay"))  # needed only while the run can resume
    assert all(steps > 0 for steps, _ in straight_ledgers.values())
    check_distilled_artifact(tmp_path / "straight", tmp_path / "rebuilt")
    test = run_test_split(out)
    np.testing.assert_allclose(FusedPredictor.load(out / "model").predict_proba(test.X),
                               FusedPredictor.load(tmp_path / "straight" / "model")
                               .predict_proba(test.X), atol=1e-5, rtol=0)


def ledgers(run: Path) -> dict[str, tuple[int, float]]:
    """Each simulated site's spent steps and ε, from its ledger file in the run."""
    from fedfuse.privacy.ledger import FileLedgerStore

    found = {}
    for path in sorted((run / "sites").glob("*/privacy-ledger.json")):
        ledger = FileLedgerStore(path).load()
        found[path.parent.name] = (ledger.steps, round(ledger.epsilon(), 9))
    return found


def check_distilled_artifact(run: Path, copy: Path) -> None:
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
    predictor = FusedPredictor.load(run / "model")
    assert [m["arch"] for m in predictor.manifest["members"]] == [student["student"]]
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
    np.testing.assert_allclose(FusedPredictor.load(copy / "model").predict_proba(test.X),
                               predictor.predict_proba(test.X), atol=1e-6, rtol=0)
    # the user prefers the ensemble after all: no federation needed to switch
    assert run_cli("fuse", copy, "--method", "soft_vote").returncode == 0
    ensemble = FusedPredictor.load(copy / "model")
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


@pytest.mark.slow
def test_gates_and_timeouts_in_a_real_simulation(tmp_path: Path):
    """Flower's simulation engine, one logreg cohort of 5 clients: client 0 answers NaN
    and client 1 a x100 scaled update in every round; client 2 goes silent in round 1
    (it answers long after round_timeout). The gates drop 0 and 1 each round, round 1
    goes on without 2, which is back in round 2; the model stays finite and learns."""
    import time as clock
    from functools import partial

    from flwr.simulation import run_simulation

    from fedfuse.site.app import build_client_app
    from fedfuse.coordinator.loop import build_server_app
    from fedfuse.simulation.runner import backend_config, site_from_context
    from fedfuse.data.sites import plan_federation

    cfg = config_from_dict({
        "name": "poisoned", "seed": 2, "rounds": 2, "round_timeout": 15.0,
        "data": {"source": "digits"}, "partition": {"method": "iid"},
        "cohorts": [{"arch": "logreg", "clients": 5}],
        "secure_aggregation": {"enabled": False},
        "robustness": {"max_update_norm": 25.0}})
    records: list[dict] = []

    class Recorder:
        def on_start(self, members, rounds): ...

        def on_round(self, record): records.append(record)

        def on_finish(self, result): records.append({"final": result})

    def misbehave(msg, context, call_next):
        pid = int(context.node_config["partition-id"])
        is_train = msg.metadata.message_type == "train"
        if is_train and pid == 2 and int(msg.content["config"]["server-round"]) == 1:
            clock.sleep(35.0)  # silent well past round_timeout
        reply = call_next(msg, context)
        if is_train and pid in (0, 1):
            sent, got = msg.content["arrays"], reply.content["arrays"]
            for key in list(got.keys()):
                delta = got[key].numpy() - sent[key].numpy()
                bad = np.full_like(delta, np.nan) if pid == 0 else sent[key].numpy() + 100 * delta
                got[key] = Array(bad.astype(delta.dtype))
        return reply

    plan = plan_federation(cfg)
    server = build_server_app(cfg, plan.test, Recorder())
    client = build_client_app(partial(site_from_context, cfg, tmp_path / "sites"),
                              mods=[misbehave])
    run_simulation(server_app=server, client_app=client, num_supernodes=5,
                   backend_config=backend_config(cfg))
    rounds = [r["cohorts"]["logreg"] for r in records if "round" in r]
    assert [r["rejected"] for r in rounds] == [2, 2]
    assert [(r["train_clients"], r["train_failures"]) for r in rounds] == [(4, 1), (5, 0)]
    result = records[-1]["final"]
    weights = [a.numpy() for a in result.cohorts["logreg"].arrays.values()]
    assert all(np.isfinite(w).all() for w in weights)
    assert rounds[-1]["test_accuracy"] > 0.8


def test_server_momentum_state_survives_a_checkpoint():
    """FedAvgM's momentum is part of the checkpoint: aggregating round 2 after a restore
    gives the same model as without the interruption."""
    from flwr.app import ConfigRecord

    def round_replies(r: int):
        return [update(n, honest(n, 10 * r + n)) for n in (1, 2)]

    def fresh():
        return cohort_strategy("fedavg", "logreg", [1, 2], server_momentum=0.9, server_lr=0.5)

    class Grid:
        def get_node_ids(self):
            return [1, 2]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            from flwr.app import Message
            return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    straight = fresh()
    list(straight.configure_train(1, GLOBAL, ConfigRecord(), Grid()))
    after1, _ = straight.aggregate_train(1, round_replies(1))
    after2, _ = straight.aggregate_train(2, round_replies(2))

    first = fresh()
    list(first.configure_train(1, GLOBAL, ConfigRecord(), Grid()))
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


def test_messages_expire_when_the_wait_for_their_replies_ends(task_identity):
    """A message not picked up within the phase's timeout is dropped by the SuperLink
    (created_at + ttl), so a site that reconnects late never trains for a finished round."""
    from flwr.app import Message

    from fedfuse.coordinator.loop import BoundedGrid

    class Recording:
        def send_and_receive(self, messages, timeout=None):
            self.sent, self.timeout = list(messages), timeout
            return []

    inner = Recording()
    old = Message(RecordDict(), dst_node_id=7, message_type="train")
    old.metadata.created_at -= 30.0  # built 30 s before it is sent
    fresh = Message(RecordDict(), dst_node_id=8, message_type="train")
    before = time.time()
    BoundedGrid(inner, timeout=25.0).send_and_receive([old, fresh])
    after = time.time()
    assert inner.timeout == 25.0
    for msg in inner.sent:
        expires = msg.metadata.created_at + msg.metadata.ttl
        assert before + 25.0 <= expires <= after + 25.0
    BoundedGrid(inner, timeout=25.0).send_and_receive([fresh], timeout=5.0)
    assert inner.timeout == 5.0
    assert fresh.metadata.created_at + fresh.metadata.ttl <= time.time() + 5.0


def test_a_window_keeps_at_most_n_messages_in_flight(task_identity):
    """With a window of 3, at most 3 messages are pushed before their replies come back;
    every answered message's reply is returned; a node that never answers holds its
    slot until the deadline, and messages not yet sent by then count as unanswered."""
    from flwr.app import Message

    from fedfuse.coordinator.loop import BoundedGrid

    class Engine:
        """Answers each pushed message on the next pull, except those to node 99."""

        def __init__(self):
            self.queued, self.in_flight, self.most, self.pushed = {}, set(), 0, []

        def push_messages(self, messages):
            ids = []
            for m in messages:
                mid = f"m{len(self.pushed)}"
                m.metadata.__dict__["_message_id"] = mid
                self.pushed.append(m.metadata.dst_node_id)
                self.queued[mid] = m
                ids.append(mid)
            self.in_flight |= set(ids)
            self.most = max(self.most, len(self.in_flight))
            return ids

        def pull_messages(self, ids):
            out = [Message(RecordDict(), reply_to=self.queued[i]) for i in ids
                   if i in self.in_flight and self.queued[i].metadata.dst_node_id != 99]
            self.in_flight -= {r.metadata.reply_to_message_id for r in out}
            return out

    engine = Engine()
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(1, 11)]
    replies = BoundedGrid(engine, timeout=5.0, window=3).send_and_receive(msgs)
    assert engine.most == 3 and engine.pushed == list(range(1, 11))
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(1, 11))

    engine = Engine()
    stuck = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (99, 99, 1, 2)]
    start = time.monotonic()
    replies = BoundedGrid(engine, timeout=0.5, window=2).send_and_receive(stuck)
    assert 0.5 <= time.monotonic() - start < 2.0
    assert replies == [] and engine.pushed == [99, 99]  # 1 and 2 never got a slot


def test_replay_store_keys_on_the_whole_request_and_keeps_the_newest(tmp_path: Path):
    import torch
    from flwr.app import ConfigRecord

    from fedfuse.site.replay import ReplayStore, request_key

    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    config = ConfigRecord({"server-round": 3, "lr": 0.5, "seed": 11})
    key = request_key(arrays, config)
    reshaped = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(3, 2))})
    assert request_key(reshaped, config) != key  # same bytes, another shape
    assert key == request_key(ArrayRecord({"w": Array(np.arange(6, dtype=np.float32)
                                                      .reshape(2, 3))}), config)
    other_round = ConfigRecord({"server-round": 4, "lr": 0.5, "seed": 11})
    nudged = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3) + 1e-7)})
    assert len({key, request_key(arrays, other_round), request_key(nudged, config)}) == 3

    store = ReplayStore(tmp_path / "replay", keep=2)
    assert store.load(key) is None
    store.save(key, {"w": torch.ones(2, 3)}, {"loss": 0.5, "accuracy": 0.75,
                                              "num_examples": 40})
    state, metrics = store.load(key)
    assert torch.equal(state["w"], torch.ones(2, 3))
    assert metrics == {"loss": 0.5, "accuracy": 0.75, "num_examples": 40}
    for i in range(3):
        time.sleep(0.01)
        store.save(f"k{i}", {"w": torch.zeros(1)}, {})
    assert sorted(p.stem for p in (tmp_path / "replay").iterdir()) == ["k1", "k2"]
    (tmp_path / "replay" / "k2.safetensors").write_bytes(b"\x00garbage")
    assert store.load("k2") is None  # unreadable: the site trains (and is charged) again
    entry = tmp_path / "replay" / "k1.safetensors"
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0x40  # a flipped bit in the tensor bytes still parses
    entry.write_bytes(bytes(data))
    assert store.load("k1") is None  # but its SHA-256 no longer matches
