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


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

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
    # every site makes its own keys (issue 23): the coordinator only ever holds auth.pub
    certs = tmp_path / "certs"
    assert run_cli("certs", "init", certs).returncode == 0
    for name in SITES:
        state = tmp_path / f"state-{name}"
        assert run_cli("site", "init", "--name", name, "--state", state).returncode == 0
        assert run_cli("certs", "add-site", certs, "--name", name,
                       "--pub", state / "auth.pub").returncode == 0
    assert not list(certs.rglob("auth.key"))  # keys the coordinator never saw
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
        # nothing fedfuse started phones home: SuperLink, its SuperExec and ServerApp,
        # every SuperNode (no flwr-clientapp process: the sites run their tasks)
        at_sites = {p: command(p) for s in sites.values() for p in descendants(s.proc.pid)}
        assert len(at_sites) == len(SITES), at_sites  # a SuperNode each, nothing per message
        assert all("fedfuse.deploy.supernode" in c for c in at_sites.values()), at_sites
        started = {**at_sites, **{p: command(p) for p in descendants(coord.proc.pid)}}
        names = " ".join(started.values())
        assert "fedfuse.deploy.superlink" in names and "flwr-serverapp" in names
        for pid, cmd in started.items():
            env = environment(pid)
            assert env.get("FLWR_TELEMETRY_ENABLED") == "0", cmd
            assert env.get("FLWR_DISABLE_UPDATE_CHECK") == "1", cmd
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
