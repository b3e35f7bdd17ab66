"""fedfuse/compat/ is the one place that reaches into Flower's internals: these tests
fail loudly when an internal it relies on moves or changes shape in a new Flower."""

from __future__ import annotations

import ast
import inspect
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fedfuse import compat
from tests.helpers import ROOT

COMPAT = ROOT / "fedfuse" / "compat"

PUBLIC_FLOWER = ("flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp",
                 "flwr.clientapp.typing", "flwr.simulation")
"""Flower's public surface: what any module may import (the bench's bare Flower baseline
calls ``flwr.simulation.run_simulation`` itself, as Flower's quickstart apps do)."""


def flower_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [m for m in found if m == "flwr" or m.startswith("flwr.")]


def test_only_the_compat_module_imports_flower_beyond_its_public_surface():
    offenders = {}
    for folder in ("fedfuse", "strategies", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if COMPAT in path.parents:
                continue
            private = [m for m in flower_imports(path) if m not in PUBLIC_FLOWER]
            if private:
                offenders[str(path.relative_to(ROOT))] = private
    assert offenders == {}
    for part in sorted(COMPAT.glob("*.py")):
        if part.name != "__init__.py":
            assert set(flower_imports(part)) - set(PUBLIC_FLOWER), part


def test_the_compat_module_imports_neither_flower_nor_torch():
    probe = ("import sys, fedfuse.compat; "
             "print(sorted(m for m in ('torch', 'flwr', 'opacus') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_installed_flower_is_a_tested_version():
    import flwr

    assert flwr.__version__ == compat.FLOWER_VERSION
    assert any(flwr.__version__.startswith(f"{v}.") for v in compat.TESTED_FLOWER)


def test_the_engine_loop_fedfuse_replaces_keeps_its_shape():
    from flwr.server.superlink.fleet.vce import vce_api

    params = list(inspect.signature(vce_api.add_messages_to_queue).parameters)
    assert params == ["state", "queue", "nodes_mapping", "f_stop"]
    original = vce_api.add_messages_to_queue
    with compat.message_pickup(0.01):
        assert vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original
    with pytest.raises(RuntimeError, match="boom"):  # a failing run puts Flower's loop back
        with compat.message_pickup(0.01):
            assert vce_api.add_messages_to_queue is not original
            raise RuntimeError("boom")
    assert vce_api.add_messages_to_queue is original


def test_the_link_state_fields_the_sweep_reads_are_still_there():
    """The sweep reads the in-memory link state's message store under its lock."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    init = inspect.getsource(InMemoryLinkState.__init__)
    assert "self.message_ins_store: dict[str, Message] = {}" in init
    assert "self.lock = threading.RLock()" in init or "self.lock = threading.Lock()" in init
    scan = inspect.getsource(InMemoryLinkState.get_message_ins)
    assert 'msg_ins.metadata.delivered_at == ""' in scan


def test_run_simulation_is_still_there_with_the_arguments_fedfuse_passes():
    """Flower 1.41 deprecates ``run_simulation``; this fails when it is removed or its
    arguments change (docs/architecture.md says what moving to ``flwr run`` takes)."""
    from flwr.simulation import run_simulation

    params = inspect.signature(run_simulation).parameters
    for name in ("server_app", "client_app", "num_supernodes", "backend_config",
                 "verbose_logging"):
        assert name in params


def test_the_deprecation_banner_is_recognised_and_nothing_else_is_dropped():
    from flwr.supercore.logger import warn_deprecated_feature

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    flower = logging.getLogger("flwr")
    handler, banner = Keep(), compat.simulation._DropDeprecationBanner()
    flower.addHandler(handler)
    flower.addFilter(banner)
    try:
        warn_deprecated_feature("The `run_simulation` function is deprecated")
        warn_deprecated_feature("something else")
        flower.warning("an ordinary warning")
    finally:
        flower.removeFilter(banner)
        flower.removeHandler(handler)
    messages = [r.getMessage() for r in seen]
    assert not any("run_simulation" in m for m in messages)
    assert any("something else" in m for m in messages)
    assert "an ordinary warning" in messages


def test_the_superlink_and_control_api_internals_are_where_compat_looks():
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto import control_pb2
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.fab import Fab
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.cli.flower_superlink import (SuperLinkLifespan,
                                                     _parse_superlink_lifespan_config)
    from flwr.superlink.main import create_app

    for name in ("ListNodesRequest", "RegisterNodeRequest", "StartRunRequest",
                 "ListRunsRequest", "StreamLogsRequest", "StopRunRequest"):
        assert hasattr(control_pb2, name), name
    assert callable(ControlHttpClient.from_server_address)
    for fn in (build_fab_from_files, fab_to_proto, user_config_to_proto, get_uvicorn_log_config,
               public_key_to_bytes, _parse_superlink_lifespan_config, create_app):
        assert callable(fn)
    assert list(inspect.signature(create_app).parameters) == ["config",
                                                              "superlink_lifespan_class"]
    assert SuperLinkLifespan is not None and console_handler is not None
    assert isinstance(Fab("hash", b"", {}).hash_str, str)
    for attr in ("_run_id", "_node_id", "_task_id"):
        assert hasattr(TaskIdentity, attr), attr
    # the SuperLink's --database keeps link state only (compat.superlink._objects_in_memory)
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.superlink import main

    assert "get_objectstore_linkstate_factories(" in inspect.getsource(main.create_app)
    assert list(inspect.signature(LinkStateFactory).parameters)[:3] == [
        "database", "federation_manager", "objectstore_factory"]


def test_a_fab_is_built_and_task_identity_is_restored():
    from flwr.supercore.task_identity import TaskIdentity

    from fedfuse.deploy.coordinator import fab_bytes

    fab = fab_bytes()  # through compat.build_fab
    assert fab[:2] == b"PK"  # a zip archive
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with compat.task_identity(run_id=5, node_id=0, task_id=9):
        assert (TaskIdentity._run_id, TaskIdentity._task_id) == (5, 9)
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before


def test_the_supernode_internals_fedfuse_patches_are_still_there():
    """``serve_supernode`` replaces ``time`` in the SuperNode's main-loop module and the
    object-pull helpers three modules imported by name; if Flower renames or moves any
    of them, the caps silently stop working, so this fails instead."""
    import time as time_module

    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    assert start_client_internal.time is time_module
    source = inspect.getsource(start_client_internal)
    assert "run_id = _pull_and_store_message(\n" in source  # called by keyword, its result
    assert "if run_id is None:" in source  # None: nothing arrived
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    for module, name in ((start_client_internal, "pull_objects"), (http_grid, "pull_objects"),
                         (run_clientapp, "pull_and_inflate_object_from_tree")):
        fn = getattr(module, name)
        fn = getattr(fn, "func", fn)  # patched already in this process
        assert fn.__module__ == "flwr.supercore.inflatable.inflatable_utils", (module, name)
        params = inspect.signature(fn).parameters
        assert {"initial_backoff", "backoff_cap", "max_time"} <= set(params), (module, name)
        assert f"{name}(" in inspect.getsource(module)  # still called there


def test_the_runtime_api_an_executor_uses_keeps_its_shape():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                             SuperExecAuthHttpInterceptor)
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    from flwr.supernode.runtime import run_clientapp

    assert AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    assert {"task", "token"} <= {f.name for f in AcquireTaskResponse.DESCRIPTOR.fields}
    assert list(inspect.signature(SuperExecAuthHttpInterceptor).parameters)[:2] == [
        "master_secret", "protected_methods"]
    assert list(inspect.signature(RuntimeTokenHttpInterceptor).parameters) == ["token"]
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == [
        "client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client", "context", "sub_status", "details"]
    args = _parse_args_run_supernode().parse_args(
        ["--isolation", "process", "--superexec-auth-secret-file", "/x", "--insecure"])
    assert args.isolation == "process" and args.superexec_auth_secret_file == "/x"


def test_capped_sleeps_and_fast_object_pulls():
    import time as time_module
    import types

    pacer = compat.supernode._Pacer(0.01, 0.04)
    start = time_module.monotonic()
    pacer.sleep(0.5)  # a wait for a reply: capped at poll
    pacer.sleep(3)  # idle waits: 0.01, 0.02, 0.04, 0.04, then back to 0.01 after a message
    assert pacer.next == 0.02
    pacer.sleep(3)
    pacer.sleep(3)
    assert pacer.next == 0.04
    pacer.arrived()
    assert pacer.next == 0.01
    assert time_module.monotonic() - start < 0.5
    assert pacer.monotonic is time_module.monotonic  # the rest of `time` passes through

    def pull(ids, initial_backoff=1, backoff_cap=10):
        return ids, initial_backoff, backoff_cap

    module = types.SimpleNamespace(pull=pull)
    compat.fast_object_pulls(module, "pull")
    compat.fast_object_pulls(module, "pull")  # twice is the same as once
    assert module.pull(["a"]) == (["a"], *compat.OBJECT_PULL_BACKOFF)

    def pull_for(ids, initial_backoff=1, backoff_cap=10, max_time=7200):
        return max_time

    module = types.SimpleNamespace(pull=pull_for)
    compat.fast_object_pulls(module, "pull", max_time=60.0)
    assert module.pull(["a"]) == 60.0


def test_no_fedfuse_process_phones_home():
    """Flower's telemetry and update check are off after importing fedfuse (so in every
    process it starts), and off even when Flower was imported first."""
    probe = ("import os, fedfuse; print(os.environ['FLWR_TELEMETRY_ENABLED'], "
             "os.environ['FLWR_DISABLE_UPDATE_CHECK'])")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("FLWR_")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)
    assert done.stdout.split() == ["0", "1"], done.stderr
    late = ("import flwr.supercore.telemetry as t; before = t.FLWR_TELEMETRY_ENABLED; "
            "import fedfuse.compat; print(before, t.FLWR_TELEMETRY_ENABLED)")
    done = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)
    assert done.stdout.split() == ["1", "0"], done.stderr
    from flwr.supercore import update_check

    assert "FLWR_DISABLE_UPDATE_CHECK" in inspect.getsource(update_check)
