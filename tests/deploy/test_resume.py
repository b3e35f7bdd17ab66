"""A deployed coordinator killed with SIGKILL after round 2 and restarted with
``--resume``: the same sites carry on, no site is charged twice for a round, and the run
directory is complete (real ``fedfuse coordinator`` and ``fedfuse site`` processes on
127.0.0.1, TLS, node authentication, DP and secure aggregation)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from fedfuse.artifact.rundir import partial_path
from tests.deploy.test_deploy import Proc, ledger_steps, recorded_rounds, site, wait_for
from tests.helpers import free_port, run_cli

SITES = "abcd"

SCENARIO = """
name = "four-sites"
seed = 3
rounds = 4
round_timeout = 30.0

[data]
source = "{test_data}"
val_fraction = 0.2

[partition]
method = "iid"

[[cohorts]]
arch = "logreg"
sites = ["a", "b", "c", "d"]

[privacy]
mode = "sample"
target_epsilon = 8.0

[secure_aggregation]
enabled = true

[deployment]
wait_for_sites = 90.0
"""


@pytest.mark.slow
def test_a_killed_coordinator_resumes_with_the_same_sites(tmp_path: Path):
    scenario = tmp_path / "four.toml"
    scenario.write_text(SCENARIO.format(test_data=tmp_path / "data" / "test.npz"))
    assert run_cli("certs", "init", tmp_path / "certs", "--sites", ",".join(SITES)).returncode == 0
    res = run_cli("partition", scenario, "--out", tmp_path / "data", "--set", "data.source=digits")
    assert res.returncode == 0, res.stderr
    port, out = free_port(), tmp_path / "run"
    common = ("--certs", tmp_path / "certs", "--address", f"127.0.0.1:{port}",
              "--state", tmp_path / "coordinator-state")
    coord = Proc(tmp_path / "coordinator.log", "coordinator", scenario, "--out", out, *common)
    sites = {n: site(tmp_path, n, port) for n in SITES}
    checkpoints = partial_path(out) / "checkpoints"
    try:
        wait_for(lambda: all(ledger_steps(tmp_path, n) > 0 for n in SITES)
                 or coord.proc.poll() is not None, 240, "every site's first round")
        per_round = {n: ledger_steps(tmp_path, n) for n in SITES}
        wait_for(lambda: (checkpoints / "round-0002.ckpt").exists()
                 or coord.proc.poll() is not None, 240, "the checkpoint of round 2")
        assert coord.proc.poll() is None, coord.output()
        os.kill(coord.proc.pid, signal.SIGKILL)
        coord.proc.wait()
        assert not out.exists() and len(recorded_rounds(out)) >= 2

        resumed = Proc(tmp_path / "resumed.log", "coordinator", "--resume", out, *common)
        assert resumed.wait(600) == 0, resumed.output() + coord.output()
        assert all(p.proc.poll() is None for p in sites.values())  # they stayed on
    finally:
        for p in [*sites.values(), coord]:
            p.stop()
        if "resumed" in locals():
            resumed.stop()

    history = recorded_rounds(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert all(r["cohorts"]["logreg"]["train_clients"] == 4 for r in history), history
    privacy = {e["client_id"]: e for e in json.loads((out / "privacy.json").read_text())["clients"]}
    for name in SITES:  # four rounds, each charged once, whatever the kill interrupted
        assert ledger_steps(tmp_path, name) == 4 * per_round[name] == privacy[name]["steps"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["secure_aggregation"] is True
    assert not partial_path(out).exists() and not (out / "checkpoints").exists()
    from fedfuse import FusedPredictor

    test = np.load(tmp_path / "data" / "test.npz")
    accuracy = float((FusedPredictor.load(out / "model").predict(test["X"])
                      == test["y"].astype(str)).mean())
    assert accuracy == pytest.approx(summary["fused"]["test_accuracy"], abs=1e-9)
