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
- ``flower-supernode`` with the hard-coded waits of its main loop capped
  (``fedfuse.deploy.supernode``), and the SuperNode's Runtime API used as SuperExec
  and ``flwr-clientapp`` use it, by one long-lived executor (``fedfuse.deploy.warm``);
- Flower's telemetry switch, already read if Flower was imported before fedfuse;
- messages created outside a running app (tests).

Importing this module imports neither Flower nor torch: it checks Flower's installed
version, and turns Flower's telemetry off (see :func:`no_phoning_home`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
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


def no_phoning_home() -> None:
    """Flower's telemetry and update check off (``fedfuse.NO_PHONING_HOME``), also when
    Flower was imported before fedfuse and has read its telemetry switch already."""
    from fedfuse import NO_PHONING_HOME

    os.environ.update(NO_PHONING_HOME)
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:
        telemetry.__dict__["FLWR_TELEMETRY_ENABLED"] = "0"  # read at each event


no_phoning_home()


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
        """Register a SuperNode's public key; the node id (0: refused). A key the
        SuperLink's database holds already (a coordinator restarted on its state) keeps
        the node id it was given then."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        key = serialization.load_ssh_public_key(openssh_public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("node authentication needs an EC public key")
        public = public_key_to_bytes(key)
        for node in self.client.ListNodes(ListNodesRequest()).nodes_info:
            if bytes(node.public_key) == public and node.status != "unregistered":
                return int(node.node_id)
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


# -- deployment: the SuperNode and its Runtime API -------------------------------------


class _CappedSleep:
    """The ``time`` module as one Flower module sees it, ``sleep`` capped at ``cap``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


OBJECT_PULL_BACKOFF = (0.01, 0.25)
"""First and largest wait (s) between tries to pull a message's objects that are not
there yet; Flower's defaults are 1 s and 10 s (``PULL_INITIAL_BACKOFF``, ``_CAP``)."""


def fast_object_pulls(module: Any, name: str) -> None:
    """``module.name`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``
    as a module imported it) retrying after ``OBJECT_PULL_BACKOFF`` instead: a message's
    objects arrive within milliseconds of it, and Flower's first retry waits a second."""
    import functools

    original = getattr(module, name)
    first, cap = OBJECT_PULL_BACKOFF
    setattr(module, name, functools.partial(getattr(original, "func", original),
                                            initial_backoff=first, backoff_cap=cap))


def fast_grid_pulls() -> None:
    """The ServerApp process's SuperLink Grid pulls replies' objects without Flower's
    1 s first backoff (``fedfuse.deploy.apps``)."""
    from flwr.superlink.grid import http_grid

    fast_object_pulls(http_grid, "pull_objects")


def serve_supernode(poll: float) -> None:
    """``flower-supernode`` as Flower runs it (its arguments, checks and Runtime API),
    with its main loop's hard-coded waits (3 s after a pull that found nothing, 0.5 s
    steps while a reply is awaited) capped at ``poll`` seconds, and a message's objects
    pulled from the SuperLink without Flower's 1 s first backoff."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = _CappedSleep(poll)  # type: ignore[assignment]
    fast_object_pulls(start_client_internal, "pull_objects")
    flower_supernode()


def _runtime_client(address: str, component: str, auth: Any) -> Any:
    """A Runtime API client that tries each call once: the executor's loop decides what a
    failure means (Flower's retry invoker, made for a one-message process, retries for
    ever while the SuperNode is gone and interrupts its own process on a 401)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component), auth])


class RuntimeTasks:
    """A SuperNode's Runtime API (loopback, ``--isolation process``) seen by its executor:
    tasks acquired with the SuperExec secret, as ``flower-superexec`` does."""

    def __init__(self, address: str, secret: bytes) -> None:
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
        from flwr.supernode.runtime import run_clientapp

        fast_object_pulls(run_clientapp, "pull_and_inflate_object_from_tree")
        self.address = address
        self.client = _runtime_client(address, "SuperExec", SuperExecAuthHttpInterceptor(
            master_secret=secret,
            protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))

    def acquire(self) -> str | None:
        """The token of a pending ClientApp task, claimed; None when none is pending."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP]))
        return str(res.token) if res.HasField("task") and res.token else None

    @contextmanager
    def task(self, token: str) -> Iterator[TaskIO]:
        """One claimed task's input and output, with its heartbeats, as ``flwr-clientapp``
        handles a task (``supernode/runtime/run_clientapp.py``)."""
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor

        client = _runtime_client(self.address, "flwr-clientapp",
                                 RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        try:
            yield TaskIO(client)
        finally:
            heartbeat.stop()
            client.close()

    def close(self) -> None:
        self.client.close()


class TaskIO:
    """Pull a task's message and context; push its reply, then its final context."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def pull(self) -> tuple[Any, Any, bytes]:
        """The task's message, the run's context and the run's FAB (bytes)."""
        from flwr.supernode.runtime.run_clientapp import pull_task_input

        message, context, _, fab = pull_task_input(self.client)
        return message, context, bytes(fab.content)

    def push(self, reply: Any, context: Any) -> None:
        from flwr.supernode.runtime.run_clientapp import push_message

        push_message(self.client, reply, context)

    def finish(self, context: Any, failure: str | None) -> None:
        """End the task (the SuperNode keeps ``context`` for the run's next task)."""
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import push_task_output

        push_task_output(self.client, context,
                         SubStatus.FAILED if failure else SubStatus.COMPLETED, failure or "")


def error_reply(message: Any, exc: BaseException) -> Any:
    """The reply Flower's ClientApp runtime sends when an app raises ``exc``."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)


def context_bytes(context: Any) -> bytes:
    """A Flower ``Context`` serialised (Flower's own protobuf form)."""
    from flwr.common.serde import context_to_proto

    data: bytes = context_to_proto(context).SerializeToString()
    return data


def context_from_bytes(data: bytes) -> Any:
    from flwr.common.serde import context_from_proto
    from flwr.proto.message_pb2 import Context as ContextProto

    proto = ContextProto()
    proto.ParseFromString(data)
    return context_from_proto(proto)


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
