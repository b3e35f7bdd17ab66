"""Flower's SuperLink, served so that only its Fleet API answers beyond this machine.

``flower-superlink`` serves the Fleet API (what SuperNodes use), the Control API (start
runs, register node keys) and the Runtime API (what the ServerApp process uses) on one
port, and Flower's open-source Control API has no account authentication. Run as is,
anyone who can reach the coordinator's port could register a key of their own or
start a run with code of their choosing. This entry point builds the same SuperLink
(Flower's own argument parsing, app and lifespan) and wraps it in an ASGI guard that
answers 403 to any non-Fleet request from a non-loopback address, so the Control and
Runtime APIs stay reachable only by the coordinator's own processes.

The peer address is the TCP connection's: uvicorn runs without proxy headers
(``SERVER_OPTIONS``), so an ``X-Forwarded-For: 127.0.0.1`` from afar is not believed even
where ``FORWARDED_ALLOW_IPS=*`` is set (common in container images; it is also scrubbed
from Flower's children, ``fedfuse.deploy.process``). Any connection other than HTTP
(a WebSocket) is refused. What a local user of the coordinator's machine can still reach:
docs/deployment.md#the-coordinators-port.

Usage: ``python -m fedfuse.deploy.superlink`` with ``flower-superlink``'s arguments.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
SERVER_OPTIONS: dict[str, Any] = {"proxy_headers": False, "reload": False, "workers": 1}
"""uvicorn settings of the SuperLink's port."""

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(client: tuple[str, int] | list[Any] | None) -> bool:
    """Whether an ASGI ``client`` (host, port) is this machine."""
    if not client:
        return False
    try:
        ip = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return ip.is_loopback


class FleetOnlyBeyondLoopback:
    """Pure ASGI middleware: Fleet API requests pass from anywhere; every other request
    (Control, Runtime, anything else) passes only from a loopback address; the server's
    lifespan events pass, and every other kind of connection is refused."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # uvicorn answers 403
            return
        if scope["type"] not in ("http", "lifespan"):
            raise RuntimeError(f"refused an ASGI {scope['type']!r} connection")
        if (scope["type"] == "http" and not scope["path"].startswith(FLEET_PREFIX)
                and not is_loopback(scope.get("client"))):
            body = json.dumps({"error": "forbidden", "message": "this port serves only the "
                               "Fleet API to other machines"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def main() -> None:
    from fedfuse.compat import serve_superlink

    serve_superlink(FleetOnlyBeyondLoopback, SERVER_OPTIONS)


if __name__ == "__main__":
    main()
