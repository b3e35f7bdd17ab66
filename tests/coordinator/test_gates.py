"""Update gates: what the coordinator checks in every plaintext update, on their own and
in a real simulation with poisoned and silent sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

from fedfuse.config import config_from_dict
from fedfuse.coordinator.gates import check_update, gate_updates
from tests.helpers import GLOBAL, honest
from tests.helpers import train_update as update


@pytest.mark.usefixtures("task_identity")
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


@pytest.mark.slow
def test_gates_and_timeouts_in_a_real_simulation(tmp_path: Path):
    """Flower's simulation engine, one logreg cohort of 5 clients: client 0 answers NaN
    and client 1 a x100 scaled update in every round; client 2 goes silent in round 1
    (it answers long after round_timeout). The gates drop 0 and 1 each round, round 1
    goes on without 2, which is back in round 2; the model stays finite and learns."""
    import time as clock
    from functools import partial

    from flwr.simulation import run_simulation

    from fedfuse.coordinator.app import build_server_app
    from fedfuse.coordinator.records import FederationResult, RoundRecord
    from fedfuse.data.sites import plan_federation
    from fedfuse.simulation.runner import backend_config, site_from_context
    from fedfuse.site.app import build_client_app

    cfg = config_from_dict({
        "name": "poisoned", "seed": 2, "rounds": 2, "round_timeout": 30.0,
        "data": {"source": "digits"}, "partition": {"method": "iid"},
        "cohorts": [{"arch": "logreg", "clients": 5}],
        "secure_aggregation": {"enabled": False},
        "robustness": {"max_update_norm": 25.0}})

    class Recorder:
        def __init__(self) -> None:
            self.rounds: list[RoundRecord] = []
            self.result: FederationResult | None = None

        def on_start(self, participants, rounds): ...

        def on_round(self, record: RoundRecord) -> None:
            self.rounds.append(record)

        def on_finish(self, result: FederationResult) -> None:
            self.result = result

    def misbehave(msg, context, call_next):
        pid = int(context.node_config["partition-id"])
        is_train = msg.metadata.message_type == "train"
        if is_train and pid == 2 and int(msg.content["config"]["server-round"]) == 1:
            clock.sleep(50.0)  # silent well past round_timeout
        reply = call_next(msg, context)
        if is_train and pid in (0, 1):
            sent, got = msg.content["arrays"], reply.content["arrays"]
            for key in list(got.keys()):
                delta = got[key].numpy() - sent[key].numpy()
                bad = np.full_like(delta, np.nan) if pid == 0 else sent[key].numpy() + 100 * delta
                got[key] = Array(bad.astype(delta.dtype))
        return reply

    plan = plan_federation(cfg)
    recorder = Recorder()
    server = build_server_app(cfg, plan.test, recorder)
    client = build_client_app(partial(site_from_context, cfg, tmp_path / "sites"),
                              mods=[misbehave])
    run_simulation(server_app=server, client_app=client, num_supernodes=5,
                   backend_config=backend_config(cfg))
    assert [r.round for r in recorder.rounds] == [1, 2]
    rounds = [r.cohorts["logreg"] for r in recorder.rounds]
    assert [r.rejected for r in rounds] == [2, 2]
    assert [(r.train_clients, r.train_failures) for r in rounds] == [(4, 1), (5, 0)]
    result = recorder.result
    assert result is not None
    weights = [a.numpy() for a in result.cohorts["logreg"].arrays.values()]
    assert all(np.isfinite(w).all() for w in weights)
    assert rounds[-1].test_accuracy > 0.8
