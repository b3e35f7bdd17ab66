"""Plain helpers shared by the test suite (fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedfuse.secagg import SecAggSession, client, consistency, crypto
from fedfuse.secagg.messages import (
    CHECK_RECORD,
    MASKED,
    SETUP_RECORD,
    SHARE_RECORD,
    UNMASK_RECORD,
)

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


GLOBAL = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32)),
                      "b": Array(np.zeros(3, dtype=np.float32))})
"""A tiny global model (w: 3x4, b: 3) for the gates', strategies' and checkpoints' tests."""


def train_update(node: int, w: np.ndarray, b: np.ndarray | None = None,
                 n: float = 50) -> Message:
    """A train reply from ``node`` carrying weights (w, b) for ``GLOBAL``."""
    b = np.zeros(3, dtype=np.float32) if b is None else b
    return reply_from(node, RecordDict({
        "arrays": ArrayRecord({"w": Array(w), "b": Array(b)}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.1,
                                 "train-accuracy": 0.9})}))


def honest(node: int, seed: int) -> np.ndarray:
    """An honest client's small update of ``GLOBAL``'s w (``seed`` picks it)."""
    return np.random.default_rng(seed).normal(0, 0.1, (3, 4)).astype(np.float32)


class NodesGrid:
    """A Grid stand-in with a fixed set of connected nodes (enough for a strategy's
    ``configure_train`` and ``configure_evaluate``)."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)


SECAGG_LENGTH = 64
"""The length of the vectors a :class:`SecAggHarness` sums by default."""


class SecAggHarness:
    """n secure-aggregation clients (real stages, their own state) and one coordinator
    session, in process (tests/secagg/test_protocol.py; simulations/bench/secagg.py).
    Each stage's requests go out as carriers and are answered by ``client.answer``, as
    the ClientApp answers whatever message they ride on."""

    def __init__(self, n: int, fraction: float = 0.6, length: int = SECAGG_LENGTH,
                 states: dict[int, RecordDict] | None = None, neighbours: int = 0,
                 verify: bool = False, pinned: frozenset[bytes] = frozenset(),
                 consistency: bool = False) -> None:
        self.nodes = list(range(101, 101 + n))
        self.states = states if states is not None else {node: RecordDict()
                                                         for node in self.nodes}
        self.session = SecAggSession("test", self.nodes, fraction, length, neighbours,
                                     consistency)
        self.identities = {node: client.Identity(crypto.identity_key(bytes([node % 256]) * 32),
                                                 verify, pinned, consistency)
                           for node in self.nodes}
        """Each node's signing key (derived from a stand-in secret) and its demands."""
        self.inputs = {node: np.random.default_rng(node).integers(0, 2**20, length,
                                                                   dtype=np.uint64)
                       for node in self.nodes}
        self.received: dict[int, np.ndarray] = {}

    def requests(self, stage: str) -> dict[int, RecordDict]:
        """Each node's message content for ``stage`` (setup, share, check or unmask)."""
        s = self.session
        if stage == "setup":
            return {int(n): RecordDict({SETUP_RECORD: s.setup_record()}) for n in s.selected}
        if stage == "share":
            return {int(n): RecordDict({SHARE_RECORD: rec}) for n, rec in s.share_records().items()}
        if stage == "check":
            return {int(n): RecordDict({CHECK_RECORD: rec})
                    for n, rec in consistency.check_records(s).items()}
        return {int(n): RecordDict({UNMASK_RECORD: rec})
                for n, rec in s.unmask_records().items()}

    def answer(self, requests: dict[int, RecordDict], skip=()) -> list[Message]:
        return [reply_from(node, client.answer(self.states[node], content, str(node),
                                               self.identities[node]))
                for node, content in requests.items() if node not in skip]

    def keys(self, skip=()) -> None:
        self.session.receive_keys(self.answer(self.requests("setup"), skip))

    def shares(self, skip=(), edit=None) -> None:
        replies = self.answer(self.requests("share"), skip)
        self.session.receive_shares(edit(replies) if edit else replies)

    def masked(self, skip=()) -> None:
        replies = []
        for node in map(int, self.session.u2):
            if node in skip:
                continue
            vec = client.mask(self.states[node], self.session.mask_request(str(node)),
                              str(node), self.inputs[node])
            self.received[node] = vec
            replies.append(reply_from(node, RecordDict({MASKED: ArrayRecord(
                {"vector": Array(vec)})})))
        self.session.receive_masked(replies)

    def check(self, skip=()) -> None:
        """The consistency check: U3 to every survivor, its signature back."""
        consistency.receive_signatures(self.session, self.answer(self.requests("check"), skip))

    def unmask(self, edit=None) -> np.ndarray:
        replies = self.answer(self.requests("unmask"))
        return self.session.receive_unmask(edit(replies) if edit else replies)

    def run(self, drop_before_keys=(), drop_after_shares=(), edit_shares=None,
            edit_unmask=None) -> np.ndarray:
        self.keys(drop_before_keys)
        self.shares(edit=edit_shares)
        self.masked(drop_after_shares)
        if self.session.consistency:
            self.check()
        return self.unmask(edit_unmask)

    def plain_sum(self, nodes) -> np.ndarray:
        return sum((self.inputs[n] for n in nodes), np.zeros(SECAGG_LENGTH, dtype=np.uint64))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FEDFUSE, *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines a fedfuse command printed."""
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def assert_refused(proc: subprocess.CompletedProcess, out: Path, needle: str) -> None:
    """The command exited 2 with one ``error:`` line holding ``needle``, no traceback, and
    left no run directory (finished or partial) behind."""
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


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
clients = 3

[[cohorts]]
arch = "mlp"
clients = 3

[[cohorts]]
arch = "logreg"
clients = 3

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
    from fedfuse.models.spec import ModelSpec

    schema = load_dataset(DataConfig()).schema
    members = [EnsembleMember(arch, ModelSpec(arch),
                              build_model(arch, schema, seed=seed + i).state_dict(), 3,
                              0.5 + i / 10)
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
                 verify: bool | str = True, log: Path | None = None,
                 cwd: Path = ROOT) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify
        self.log = log or source.parent / f"serve-{self.port}.log"
        self.cmd = [*FEDFUSE, "serve", str(source), "--port", str(self.port), *map(str, args)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        from fedfuse.serving.client import tls_context

        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=self.log.open("wb"),
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


class ExchangeCounter:
    """A RoundListener and a Grid wrapper at once: counts the exchanges the coordinator
    makes through the Grid it is given (one ``send_and_receive``, or one batch of
    ``push_messages`` when the coordinator's window holds a whole exchange), and the
    message types of each, split into discovery, every round and the fusion after."""

    def __init__(self) -> None:
        self.exchanges: list[list[str]] = []
        self.marks: list[int] = []
        self.result = None

    def wrap(self, grid):
        from fedfuse.strategies import GridView

        counter = self

        class Counting(GridView):
            def push_messages(self, messages):
                batch = list(messages)
                counter.exchanges.append([m.metadata.message_type for m in batch])
                return self._base.push_messages(batch)

            def send_and_receive(self, messages, *, timeout=None):
                batch = list(messages)
                counter.exchanges.append([m.metadata.message_type for m in batch])
                return self._base.send_and_receive(batch, timeout=timeout)

        return Counting(grid)

    def on_start(self, participants, rounds) -> None:
        self.marks.append(len(self.exchanges))

    def on_round(self, record) -> None:
        self.marks.append(len(self.exchanges))

    def on_finish(self, result) -> None:
        self.marks.append(len(self.exchanges))
        self.result = result

    def per_round(self) -> list[list[list[str]]]:
        """The exchanges of every round, then of the fusion (discovery left out)."""
        return [self.exchanges[a:b] for a, b in zip(self.marks, self.marks[1:])]


def run_federation(cfg, mods=(), counter: ExchangeCounter | None = None):
    """``cfg`` through Flower's simulation engine with fedfuse's ClientApp (``mods``
    around it); the coordinator's window holds every exchange whole. Returns the
    counter that followed the run (its ``result`` is the FederationResult)."""
    from functools import partial

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedfuse.coordinator.loop import Coordinator
    from fedfuse.data.sites import plan_federation
    from fedfuse.simulation.runner import backend_config, site_from_context
    from fedfuse.site.app import build_client_app

    counter = counter or ExchangeCounter()
    test = plan_federation(cfg).test
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        Coordinator(cfg, test, counter, max_in_flight=10_000).run(counter.wrap(grid))

    client = build_client_app(partial(site_from_context, cfg, None), mods=list(mods))
    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.num_clients,
                   backend_config=backend_config(cfg))
    assert counter.result is not None
    return counter
