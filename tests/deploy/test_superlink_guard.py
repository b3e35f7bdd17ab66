"""The guard on the coordinator's SuperLink port, served by a real uvicorn with the
SuperLink's settings on 127.0.0.1: the peer address is the connection's, never a
forwarded-for header; WebSockets are refused; Flower's children inherit neither
uvicorn's proxy list nor Flower's internal switches."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from fedfuse.deploy.process import FlowerProcess
from fedfuse.deploy.superlink import SERVER_OPTIONS, FleetOnlyBeyondLoopback
from tests.helpers import free_port


async def stub(scope: dict, receive: Any, send: Any) -> None:
    """Stands in for Flower's app: answers 200 to every HTTP request it is handed."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"reached the Control API"})


@contextmanager
def serving(options: dict[str, Any]) -> Iterator[str]:
    """The guarded stub behind a real uvicorn on 127.0.0.1 with ``options``."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(FleetOnlyBeyondLoopback(stub), host="127.0.0.1",
                                           port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def status(url: str, forwarded_for: str) -> int:
    return httpx.get(f"{url}/v1/control/start-run",
                     headers={"X-Forwarded-For": forwarded_for}, timeout=10).status_code


def test_a_forwarded_for_header_does_not_change_who_is_asking(monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")  # as in many container images
    options = {k: v for k, v in SERVER_OPTIONS.items() if k not in ("reload", "workers")}
    with serving(options) as url:
        # the guard judges the TCP peer (loopback here), whatever the header claims
        assert status(url, "203.0.113.9") == 200
    with serving({}) as url:  # uvicorn's defaults: the header decides, so from afar a
        assert status(url, "203.0.113.9") == 403  # "127.0.0.1" would pass the guard
        assert status(url, "127.0.0.1") == 200


def test_a_websocket_connection_is_refused():
    import websockets.sync.client as ws
    from websockets.exceptions import InvalidStatus

    options = {k: v for k, v in SERVER_OPTIONS.items() if k not in ("reload", "workers")}
    with serving(options) as url, pytest.raises(InvalidStatus) as refused:
        ws.connect(url.replace("http", "ws") + "/v1/control/start-run", open_timeout=10)
    assert refused.value.response.status_code == 403


def test_an_unknown_connection_type_never_reaches_flower():
    reached = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        reached.append(scope)

    async def nothing() -> dict:
        return {}

    async def ignore(message: dict) -> None:
        return None

    with pytest.raises(RuntimeError, match="refused an ASGI 'webtransport'"):
        asyncio.run(FleetOnlyBeyondLoopback(app)({"type": "webtransport"}, nothing, ignore))
    assert reached == []


def test_flower_children_inherit_neither_proxy_list_nor_internal_switches(tmp_path: Path,
                                                                         monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")  # an unguarded gRPC Control API
    monkeypatch.setenv("FEDFUSE_TEST_KEPT", "yes")
    python = Path(sys.executable).name
    with FlowerProcess([python, "-c", "import time; time.sleep(30)"], tmp_path / "log",
                       tmp_path / "flwr") as child:
        assert child.proc is not None
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{child.proc.pid}/environ").read_text().split("\0") if item)
    assert "FORWARDED_ALLOW_IPS" not in environ
    assert not [k for k in environ if k.startswith("FLWR_INTERNAL_")]
    assert environ["FEDFUSE_TEST_KEPT"] == "yes" and os.environ["FORWARDED_ALLOW_IPS"] == "*"
