"""``fedfuse serve --workers 2``: real worker processes on one port, one rate-limit budget
and one set of metrics across them, a dead worker started again, a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from fedfuse.serving.auth import create_key
from fedfuse.serving.workers import RESTART_GRACE
from tests.helpers import Server, free_port, make_artifact, run_cli
from tests.serving.test_serve import metric

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def established(pid: int, port: int) -> int:
    """How many established TCP connections on ``port`` process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def test_workers_share_the_port_the_limit_and_the_metrics(tmp_path):
    make_artifact(tmp_path / "model")
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, "a")
    body = {"instances": [[[[float(i + j) for j in range(8)] for i in range(8)]]]}
    headers = {"Authorization": f"Bearer {key}"}
    grpc_port = free_port()
    with Server(tmp_path / "model", "--workers", "2", "--api-keys", keys,
                "--rate-limit", "5/minute", "--grpc-port", grpc_port) as server:
        started = time.monotonic()
        assert server.proc is not None
        workers = children(server.proc.pid)
        assert len(workers) == 2
        # 16 clients, one connection each, kept open: the kernel spreads them by
        # address hash, so both workers answer (all 16 on one: p = 2^-15)
        clients = [httpx.Client(base_url=server.url) for _ in range(16)]
        statuses = [c.post("/v1/predict", json=body, headers=headers).status_code
                    for c in clients]
        held = [established(w, server.port) for w in workers]
        assert all(held) and sum(held) == 16, held
        assert sorted(statuses) == [200] * 5 + [429] * 11  # one budget of 5, not 5 each
        # the metrics of both workers, summed by whichever answers the scrape
        for _ in range(4):
            assert metric(server, "fedfuse_http_requests_total", route="/v1/predict",
                          method="POST", status="200") == 5
            assert metric(server, "fedfuse_http_errors_total", kind="rate_limited") == 11
        for c in clients:
            c.close()
        # gRPC on the workers' shared port, against the same budget (a third-party client)
        grpc_client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        metadata = {"authorization": f"Bearer {key}"}
        tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), dtype=np.float32))
        with pytest.raises(InferenceServerException) as limited:
            grpc_client.infer("fedfuse", [tensor], headers=dict(metadata))
        assert limited.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        grpc_client.close()

        # a worker killed after its start-up grace is started again, with the budget kept
        time.sleep(max(0.0, RESTART_GRACE + 1 - (time.monotonic() - started)))
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = children(server.proc.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and workers[0] not in now and workers[1] in now
        assert "worker 0 (pid" in server.output() and "starting it again" in server.output()
        answers = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 429 not in answers:
            with httpx.Client(base_url=server.url) as c:  # new connections reach both
                answers.add(c.post("/v1/predict", json=body, headers=headers).status_code)
        assert answers == {429}  # the restarted worker still knows the budget is spent

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == -signal.SIGTERM  # by the signal, as uvicorn
    assert not any(Path(f"/proc/{w}").exists() for w in now)


def test_workers_end_with_a_killed_supervisor(tmp_path):
    make_artifact(tmp_path / "model")
    with Server(tmp_path / "model", "--workers", "2") as server:
        assert server.proc is not None
        workers = children(server.proc.pid)
        server.proc.kill()  # SIGKILL: no handler runs in the supervisor
        server.proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert len(workers) == 2 and not any(alive(w) for w in workers)
    with socket.socket() as probe:  # and the port is free again
        probe.bind(("127.0.0.1", server.port))


def alive(pid: int) -> bool:
    """Running (a zombie, reaped by nobody yet, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_refuse_a_port_in_use(tmp_path):
    make_artifact(tmp_path / "model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", tmp_path / "model", "--workers", "2", "--port", str(port),
                       timeout=60)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_a_worker_that_cannot_start_stops_the_server(tmp_path):
    make_artifact(tmp_path / "model")
    keys = tmp_path / "keys.json"
    keys.write_text("{not json")  # each worker reads the keys file as it starts
    proc = run_cli("serve", tmp_path / "model", "--workers", "2", "--port",
                   str(free_port()), "--api-keys", keys, timeout=120)
    assert proc.returncode == 2
    assert "within" in proc.stderr and "of its start" in proc.stderr
