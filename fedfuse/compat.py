"""Every use of Flower beyond its public surface, in one place.

fedfuse otherwise uses only ``flwr.app``, ``flwr.serverapp`` (and its strategies),
``flwr.clientapp`` and ``flwr.simulation``. What lives here reaches into Flower's
internals, and was written against, and tested with, the versions in
:data:`TESTED_FLOWER` (``tests/test_compat.py`` fails when any of it moves):

- the simulation engine's message pickup loop (``vce_api.add_messages_to_queue``), run
  with a shorter wait (``fedfuse.simulation.engine``);
- ``flwr.simulation.run_simulation``, public but deprecated since 1.41 (its banner is
  filtered out; docs/architecture.md says what moving to ``flwr run`` would take);
- ``flower-superlink``'s own argument parsing, app and lifespan, so the SuperLink can be
  served behind fedfuse's guard (``fedfuse.deploy.superlink``);
- the SuperLink's Control API client and its protobuf messages, and the FAB builder
  (``fedfuse.deploy.coordinator``);
- messages created outside a running app (tests).

Importing this module imports neither Flower nor torch: it checks Flower's installed
version only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

TESTED_FLOWER = ("1.41",)
"""The Flower minor versions this module was written against and tested with."""

FLOWER_VERSION = version("flwr")
if not FLOWER_VERSION.startswith(tuple(f"{v}." for v in TESTED_FLOWER)):
    raise ImportError(f"fedfuse uses Flower internals tested with flwr "
                      f"{', '.join(TESTED_FLOWER)}.x only; this environment has flwr "
                      f"{FLOWER_VERSION}: install 'flwr>=1.41,<1.42' (fedfuse/compat.py "
                      "lists what would need checking)")


# -- simulation -------------------------------------------------------------------------


@contextmanager
def message_pickup(interval: float) -> Iterator[None]:
    """Within this context, Flower's simulation engine sweeps its in-memory SuperLink
    for new messages every ``interval`` seconds instead of every 0.1 s; Flower's loop is
    restored on exit."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any,
                              f_stop: Any) -> None:
        """Flower's loop, with its wait as a parameter."""
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop


class _DropDeprecationBanner(logging.Filter):
    """Drops Flower's ``run_simulation`` deprecation banner (fedfuse keeps the in-process
    engine on purpose; see docs/architecture.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "run_simulation" in str(record.args))


def run_simulation(server_app: Any, client_app: Any, num_supernodes: int,
                   backend_config: dict[str, Any], verbose: bool) -> None:
    """``flwr.simulation.run_simulation`` (deprecated in Flower 1.41), without its
    deprecation banner."""
    from flwr.simulation import run_simulation as flower_run_simulation

    flower = logging.getLogger("flwr")
    banner = _DropDeprecationBanner()
    flower.addFilter(banner)
    try:
        flower_run_simulation(server_app=server_app, client_app=client_app,
                              num_supernodes=num_supernodes, backend_config=backend_config,
                              verbose_logging=verbose)
    finally:
        flower.removeFilter(banner)


# -- deployment: the SuperLink and its Control API --------------------------------------


def serve_superlink(guard: Callable[[Any], Any]) -> None:
    """``flower-superlink`` as Flower runs it (its own argument parsing and checks, app
    and lifespan), with its ASGI app wrapped in ``guard``."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    config = _parse_superlink_lifespan_config()
    uvicorn.run(guard(create_app(config, SuperLinkLifespan)), host=config.host,
                port=config.port, reload=False, access_log=True,
                log_config=get_uvicorn_log_config(console_handler.level),
                ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1)


def build_fab(files: dict[str, bytes]) -> bytes:
    """A Flower App Bundle of ``files`` (name -> content), as ``flwr build`` makes it."""
    from flwr.cli.build import build_fab_from_files

    fab: bytes = build_fab_from_files(files)[0]
    return fab


class ControlClient:
    """The SuperLink's Control API over TLS, as the ``flwr`` CLI uses it."""

    def __init__(self, address: str, root_certificates: bytes) -> None:
        from flwr.supercore.control import ControlHttpClient

        self.client = ControlHttpClient.from_server_address(
            server_address=address, insecure=False, root_certificates=root_certificates,
            interceptors=[])

    def list_nodes(self) -> None:
        """Raises while the SuperLink does not answer."""
        from flwr.proto.control_pb2 import ListNodesRequest

        self.client.ListNodes(ListNodesRequest())

    def register_node(self, openssh_public_key: bytes, name: str) -> int:
        """Register a SuperNode's public key; the node id (0: refused)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        key = serialization.load_ssh_public_key(openssh_public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("node authentication needs an EC public key")
        public = public_key_to_bytes(key)
        return int(self.client.RegisterNode(RegisterNodeRequest(public_key=public,
                                                                name=name)).node_id)

    def start_run(self, fab: bytes, fab_hash: str, config: dict[str, Any]) -> int | None:
        """Start a run of ``fab`` with ``config`` overriding its run config; its id."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        res = self.client.StartRun(StartRunRequest(
            fab=fab_to_proto(Fab(fab_hash, fab, {})),
            override_config=user_config_to_proto(config)))
        return int(res.run_id) if res.HasField("run_id") else None

    def run_status(self, run_id: int) -> tuple[str, str]:
        """The run's status and sub-status (``finished``, ``completed``...)."""
        from flwr.proto.control_pb2 import ListRunsRequest

        run = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return str(run.status.status), str(run.status.sub_status)

    def stream_logs(self, run_id: int, after: float) -> Iterator[tuple[str, float]]:
        """The run's log output after timestamp ``after``, as (text, timestamp) pairs."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        for res in self.client.StreamLogs(StreamLogsRequest(run_id=run_id,
                                                            after_timestamp=after)):
            yield str(res.log_output), float(res.latest_timestamp)

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self.client.StopRun(StopRunRequest(run_id=run_id))


# -- messages outside a running app ---------------------------------------------------


@contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Flower's task identity set as a running app's would be, so that messages can be
    created and replied to outside one (tests, tools)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# -- quiet dependencies -----------------------------------------------------------------


def quiet_dependencies(verbose: bool) -> None:
    """What fedfuse's commands print is fedfuse's: unless ``verbose``, Flower logs only
    warnings, and the INFO lines of alembic (Flower's state store) and Ray's
    accelerator ``FutureWarning`` are left out."""
    import warnings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower API call
    flower = logging.getLogger("flwr")  # has its own console handler
    flower.propagate = False
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                                category=FutureWarning)
