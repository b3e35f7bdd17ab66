"""fedfuse/compat.py is the one place that reaches into Flower's internals: these tests
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
            if path == ROOT / "fedfuse" / "compat.py":
                continue
            private = [m for m in flower_imports(path) if m not in PUBLIC_FLOWER]
            if private:
                offenders[str(path.relative_to(ROOT))] = private
    assert offenders == {}
    assert set(flower_imports(ROOT / "fedfuse" / "compat.py")) - set(PUBLIC_FLOWER)


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
    handler, banner = Keep(), compat._DropDeprecationBanner()
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


def test_a_fab_is_built_and_task_identity_is_restored():
    from flwr.supercore.task_identity import TaskIdentity

    from fedfuse.deploy.coordinator import fab_bytes

    fab = fab_bytes()  # through compat.build_fab
    assert fab[:2] == b"PK"  # a zip archive
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with compat.task_identity(run_id=5, node_id=0, task_id=9):
        assert (TaskIdentity._run_id, TaskIdentity._task_id) == (5, 9)
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before
