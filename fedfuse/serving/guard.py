"""What a request must pass before the app reads its body: size, API key, rate limit.

Runs as ASGI middleware, so a request without a valid key is answered 401 before its
body is parsed, and an oversized body is refused (413) without being buffered. Only
``/v1/`` paths are guarded; health, readiness, metrics and the OpenAPI schema are open,
as probes and scrapers expect.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedfuse.serving.auth import KeyStore
from fedfuse.serving.ratelimit import RateLimiter

GUARDED_PREFIXES = ("/v1/", "/v2/models")
"""The API's paths: the ``/v1`` API and the Open Inference Protocol's model endpoints
(its server metadata and health stay open, as probes expect)."""


class _BodyTooLarge(Exception):
    pass


def error_body(kind: str, message: str, **extra: object) -> bytes:
    """The JSON error body every ``/v1`` failure uses: ``{"error": kind, "message": ...}``."""
    return json.dumps({"error": kind, "message": message, **extra}).encode()


def _refusal(path: str, kind: str, message: str, **extra: object) -> bytes:
    """The guard's refusal in the format of the API asked: the Open Inference
    Protocol's is ``{"error": message}``."""
    if path.startswith("/v2/"):
        return json.dumps({"error": message}).encode()
    return error_body(kind, message, **extra)


class GuardMiddleware:
    """Body-size limit, API-key check and per-key rate limit for ``/v1/`` requests."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int,
                 keys: Callable[[], KeyStore | None], limiter: RateLimiter | None) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.keys = keys
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        store = self.keys()
        caller = _client_host(scope)
        if store is not None:
            key_id = store.verify(_presented_key(headers))
            if key_id is None:
                await _respond(send, 401, _refusal(
                    scope["path"], "unauthorized", "a valid API key is required: send it as "
                    "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"),
                    [(b"www-authenticate", b"Bearer")])
                return
            caller = f"key:{key_id}"
            scope.setdefault("state", {})["api_key_id"] = key_id
        if self.limiter is not None:
            wait = self.limiter.retry_after(caller)
            if wait is not None:
                await _respond(send, 429, _refusal(
                    scope["path"], "rate_limited", f"rate limit of {self.limiter.limit} "
                    f"exceeded; retry in {wait} s", retry_after=wait),
                    [(b"retry-after", str(wait).encode())])
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(scope, send)
            return
        await self._call_counting(scope, receive, send)

    async def _call_counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app on a receive channel that stops at ``max_body`` bytes (for bodies
        sent without a Content-Length). Past the limit, the app's own answer to the
        interrupted read is replaced by the 413."""
        seen = 0
        over = started = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                over = over or seen > self.max_body
                if over:
                    raise _BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if over:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._too_large(scope, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await _respond(send, 413, _refusal(
            scope["path"], "payload_too_large", f"request body over the limit of "
            f"{self.max_body} bytes; send fewer instances per request"))


def _presented_key(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()


def _client_host(scope: Scope) -> str:
    client = scope.get("client")
    return client_key(str(client[0])) if client else "ip:unknown"


def client_key(host: str) -> str:
    """Who a request without a key counts as: its IPv4 address, or its IPv6 address's /64
    network (one site or household usually holds a whole /64, so per address a single
    client could rotate through 2^64 budgets); an IPv4-mapped IPv6 address is its IPv4."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:  # a Unix socket path or the like
        return f"ip:{host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


async def _respond(send: Send, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
