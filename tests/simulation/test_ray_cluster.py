"""``simulation.ray_address``: a simulation on a Ray cluster started on its own
(``ray start --head`` on 127.0.0.1, stopped by the test), through Flower's engine,
instead of a local Ray started for the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedfuse.config import config_from_dict
from fedfuse.errors import ConfigError
from fedfuse.simulation.runner import backend_config
from tests.helpers import SMALL_SCENARIO, free_port, run_cli

RAY = str(Path(sys.executable).with_name("ray"))


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_cluster(head: subprocess.Popen, temp_dir: str) -> None:
    """The head's process group, then anything still running from its temp dir (Ray's
    daemons start sessions of their own); never `ray stop`, which would stop every
    Ray on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if temp_dir.encode() in cmdline:
                try:
                    os.kill(int(pid), sig)
                except ProcessLookupError:
                    pass
        time.sleep(1.0)
    head.wait(timeout=30)


@pytest.fixture
def cluster():
    """A one-node Ray cluster (2 CPUs) in a process of its own: (address, temp dir)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", Path(temp_dir)
    finally:
        kill_cluster(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_simulation_runs_on_a_separately_started_ray_cluster(cluster, tmp_path):
    address, temp_dir = cluster
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SMALL_SCENARIO.replace("rounds = 2", "rounds = 1"))
    proc = run_cli("simulate", scenario, "--out", tmp_path / "run",
                   "--set", f'simulation.ray_address="{address}"', timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ray"] == {"address": address, "num_cpus": None}
    assert summary["rounds"] == 1 and summary["clients"] == 9
    assert all(0.0 < c["test_accuracy"] <= 1.0 for c in summary["cohorts"].values())
    # the run's driver and the ClientApp actors ran in this cluster's session
    logs = next(temp_dir.glob("session_2*")) / "logs"
    assert list(logs.glob("python-core-driver-*")), sorted(p.name for p in logs.iterdir())
    assert list(logs.glob("worker-*"))


def test_ray_address_is_checked_and_replaces_the_local_resources():
    def cfg(address: str):
        return config_from_dict({"name": "t", "cohorts": [{"arch": "logreg", "clients": 3}],
                                 "simulation": {"ray_address": address}})

    init = backend_config(cfg("10.0.0.5:6379"))["init_args"]
    assert init["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in init and "num_gpus" not in init  # ray.init refuses them
    assert backend_config(cfg("auto"))["init_args"]["address"] == "auto"
    local = backend_config(cfg(""))["init_args"]
    assert local["num_cpus"] == 2 and "address" not in local
    with pytest.raises(ConfigError) as err:
        cfg("ray-head")
    assert err.value.key == "simulation.ray_address"
    assert "is not 'auto' or a Ray head's HOST:PORT" in err.value.message
