"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Message, Metadata, RecordDict

ROOT = Path(__file__).resolve().parent.parent
FEDFUSE = [sys.executable, "-m", "fedfuse"]


def reply_from(node_id: int, content: RecordDict, message_type: str = "train") -> Message:
    """A reply Message as the coordinator receives it from ``node_id``."""
    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id=f"q{node_id}", group_id="1", created_at=time.time(),
                    ttl=60.0, message_type=message_type)
    return Message(metadata=meta, content=content)


def incoming(content: RecordDict, message_type: str = "train", node_id: int = 7) -> Message:
    """A message from the coordinator as a ClientApp receives it on ``node_id``."""
    meta = Metadata(run_id=1, message_id=f"in{time.monotonic_ns()}", src_node_id=0,
                    dst_node_id=node_id, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type=message_type)
    return Message(metadata=meta, content=content)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FEDFUSE, *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def task_identity():
    """Messages created outside a running ServerApp need Flower's task identity."""
    from flwr.supercore.task_identity import TaskIdentity
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def scenario(tmp_path: Path):
    """Write a small scenario file; keyword overrides replace whole tables/values."""

    def write(text: str = "", name: str = "tiny") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(text or SMALL_SCENARIO)
        return path

    return write


SMALL_SCENARIO = """
name = "tiny"
seed = 3
rounds = 2

[data]
source = "digits"

[partition]
method = "dirichlet"
alpha = 0.5
min_samples = 20

[[cohorts]]
arch = "cnn"
clients = 2

[[cohorts]]
arch = "mlp"
clients = 2

[[cohorts]]
arch = "logreg"
clients = 2

[train]
local_epochs = 1
"""


def make_artifact(path: Path, weights=(0.5, 0.3, 0.2), semver: str = "1.0.0", seed: int = 0):
    """A real fused artifact of three freshly initialised digits models."""
    import numpy as np

    from fedfuse.artifact.manifest import EnsembleMember, write_artifact
    from fedfuse.config import DataConfig
    from fedfuse.data.datasets import load_dataset
    from fedfuse.models.registry import build_model

    schema = load_dataset(DataConfig()).schema
    members = [EnsembleMember(arch, build_model(arch, schema, seed=seed + i).state_dict(), 3, 0.5 + i / 10)
               for i, arch in enumerate(("cnn", "mlp", "logreg"))]
    write_artifact(path, members=members, weights=np.array(weights), method="soft_vote",
                   schema=schema, fusion_fit={"objective": "brier"},
                   privacy={"mode": "off", "max_epsilon": None, "delta": None},
                   fused_test_accuracy=0.9, semver=semver)
    return members, np.array(weights), schema


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``fedfuse serve`` process on 127.0.0.1, stopped with SIGTERM on exit."""

    def __init__(self, source: Path, *args: str, scheme: str = "http",
                 verify: bool | str = True, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify
        self.log = log or source.parent / f"serve-{self.port}.log"
        self.cmd = [*FEDFUSE, "serve", str(source), "--port", str(self.port), *map(str, args)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        from fedfuse.serving.client import tls_context

        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n"
                                   f"{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz",
                             verify=tls_context(self.verify)).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"server not ready in 60 s:\n{self.log.read_text()}")

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def output(self) -> str:
        return self.log.read_text()
