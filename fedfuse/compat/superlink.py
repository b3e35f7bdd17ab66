"""Flower's SuperLink served behind a guard, its Control API, and the FAB builder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def serve_superlink(guard: Callable[[Any], Any], options: dict[str, Any]) -> None:
    """``flower-superlink`` as Flower runs it (its own argument parsing and checks, app
    and lifespan), with its ASGI app wrapped in ``guard``, served by uvicorn with
    ``options`` (which take precedence over Flower's)."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    _objects_in_memory()
    config = _parse_superlink_lifespan_config()
    uvicorn.run(guard(create_app(config, SuperLinkLifespan)), **{
        "host": config.host, "port": config.port, "access_log": True,
        "log_config": get_uvicorn_log_config(console_handler.level),
        "ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile, **options})


def _objects_in_memory() -> None:
    """The SuperLink's ``--database`` keeps its link state (registered nodes, runs) and
    no message contents: those stay in memory, as without a database (a resumed run
    sends new messages). Stored in SQLite they cost about 2 s per deployed round."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import main

    def factories(database: str, federation: Any) -> tuple[Any, Any]:
        objects = ObjectStoreFactory()
        return objects, LinkStateFactory(database, federation, objects)

    main.get_objectstore_linkstate_factories = factories  # type: ignore[assignment]


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


