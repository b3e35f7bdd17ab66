"""The warm site (``fedfuse.deploy.warm``): the executor of a SuperNode's tasks inside
``fedfuse site``. Its Runtime API refuses an executor without the site's secret; only
fedfuse's own ClientApp runs; the run's state survives a restart of the site."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tomli_w
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedfuse.compat import RuntimeTasks, build_fab
from fedfuse.deploy.coordinator import fab_bytes
from fedfuse.deploy.site import executor_secret
from fedfuse.deploy.warm import COMPONENTS, RunContexts, WarmSite, fab_components
from tests.helpers import free_port, stop_process


def test_the_runtime_api_hands_tasks_only_to_the_executor_with_the_sites_secret(tmp_path):
    """A SuperNode from ``fedfuse.deploy.supernode`` in process isolation (its SuperLink
    is not there: it keeps retrying, its Runtime API is up). Another local process with
    the wrong secret, or none, cannot claim the site's tasks; the site's own can."""
    secret = executor_secret(tmp_path)
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    port = free_port()
    node = subprocess.Popen(
        [sys.executable, "-m", "fedfuse.deploy.supernode", "--insecure", "--superlink",
         f"127.0.0.1:{free_port()}", "--isolation", "process", "--superexec-auth-secret-file",
         str(secret), "--port", str(port)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={"FLWR_HOME": str(tmp_path / "flwr"), "PATH": ""})
    own = RuntimeTasks(f"127.0.0.1:{port}", secret.read_bytes())
    intruder = RuntimeTasks(f"127.0.0.1:{port}", b"not the site's secret")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert own.acquire() is None  # answered: no task pending
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and node.poll() is None
                time.sleep(0.2)
        with pytest.raises(httpx.HTTPStatusError) as refused:
            intruder.acquire()
        assert refused.value.response.status_code in (401, 403)
        bare = httpx.post(f"http://127.0.0.1:{port}/flwr.proto.Runtime/AcquireTask",
                          content=b"", timeout=5)
        assert bare.status_code in (401, 403, 404)
    finally:
        own.close()
        intruder.close()
        stop_process(node)


def test_only_fedfuses_own_client_app_answers(task_identity):
    """A run whose app bundle names other components is refused with an error reply;
    no code from any bundle is loaded (the site calls its installed app)."""
    assert fab_components(fab_bytes()) == COMPONENTS
    calls = []
    site = WarmSite(lambda message, context: calls.append(message) or message, None,
                    Path("/nonexistent"))  # type: ignore[arg-type]
    project = {"project": {"name": "other", "version": "1.0.0", "dependencies": []},
               "tool": {"flwr": {"app": {"publisher": "someone", "components": {
                   "serverapp": "evil:server", "clientapp": "evil:client"}, "config": {}}}}}
    foreign = build_fab({"pyproject.toml": tomli_w.dumps(project).encode()})
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    reply, failure = site.answer(msg, Context(1, 1, {}, RecordDict(), {}), foreign)
    assert reply.has_error() and "fedfuse's own ClientApp" in reply.error.reason
    assert failure and calls == []
    assert fab_components(b"not a zip") == {}
    reply, failure = site.answer(msg, Context(1, 1, {}, RecordDict(), {}), fab_bytes())
    assert failure is None and calls == [msg]


def test_a_runs_state_is_kept_across_tasks_and_restarts(tmp_path):
    """The executor's copy of the run's state wins over the SuperNode's (which lags a
    task); after a restart the state stored before the last reply comes back."""
    contexts = RunContexts(tmp_path / "runs")
    first = contexts.resume(Context(7, 1, {}, RecordDict(), {}))
    first.state["secagg/x"] = ConfigRecord({"session": b"s1"})
    contexts.store(first)
    stale = Context(7, 1, {}, RecordDict(), {})
    assert contexts.resume(stale) is first  # the SuperNode's older copy is ignored
    path = contexts.path(7)
    assert path.stat().st_mode & 0o777 == 0o600
    restarted = RunContexts(tmp_path / "runs").resume(Context(7, 1, {}, RecordDict(), {}))
    assert restarted.state.config_records["secagg/x"]["session"] == b"s1"
    other = RunContexts(tmp_path / "runs").resume(Context(8, 1, {}, RecordDict(), {}))
    assert "secagg/x" not in other.state  # runs do not share state
