"""The ``/v1`` predict endpoints as one plain ASGI app, mounted as Starlette routes.

``POST /v1/predict`` and ``POST /v1/models/{version}/predict`` carry nearly all of a
server's traffic, so they skip FastAPI's per-request machinery (the Request object,
dependency solving, the response model): the body is read off the ASGI channel,
parsed and validated in one pass by pydantic-core, and answered with a JSON body written
once. The guard (key, rate limit, body size) and the metrics middleware still run
before and around it, as for every ``/v1`` path. FastAPI documents the two operations
from :func:`openapi_operations`, since it only documents its own routes.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from fedfuse.serving.guard import error_body
from fedfuse.serving.inference import ServeError, answer, float32_instances
from fedfuse.serving.metrics import ServeMetrics
from fedfuse.serving.registry import ModelRegistry

PATHS = {"/v1/predict": "Predict with the latest model version",
         "/v1/models/{version}/predict": "Predict with one model version"}
"""The predict routes and their OpenAPI summaries."""


def field_path(loc: tuple[Any, ...]) -> str:
    """``("instances", 3, 0, 5)`` as ``instances[3][0][5]``."""
    parts = [p for p in loc if p != "body"] or ["body"]
    text = str(parts[0])
    for p in parts[1:]:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text


def invalid_input(errors: list[Any], expected: str) -> ServeError:
    """The 422 for pydantic's validation ``errors`` of a body, naming the first bad place
    and what the body should have been (``expected``)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = field_path(tuple(first["loc"]))
    return ServeError(422, "invalid_input", f"{field}: {first['msg']} (expected {expected})",
                      field=field, details=[{"field": field_path(tuple(e["loc"])),
                                             "message": e["msg"]} for e in errors[:20]])


class _Route(Route):
    """A Starlette route that names itself in the scope once its path matches, as
    FastAPI's routes do, for the metrics' route label (405s included)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self
        return match, child


class PredictEndpoint:
    """The ASGI app behind both predict paths (the version, when given, comes from the
    router's path parameters)."""

    def __init__(self, registry: ModelRegistry, body: type[BaseModel], expected: str,
                 metrics: ServeMetrics, max_queue: int) -> None:
        self.registry = registry
        self.body = body
        self.expected = expected
        self.metrics = metrics
        self.max_queue = max_queue

    def routes(self) -> list[Route]:
        return [_Route(path, self, methods=["POST"]) for path in PATHS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        version = scope.get("path_params", {}).get("version", "")
        status, payload, headers = await self.respond(version, await _body(receive))
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()), *headers]})
        await send({"type": "http.response.body", "body": payload})

    async def respond(self, version: str, body: bytes
                      ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The status, JSON body and extra headers of the answer to ``body``."""
        try:
            x = float32_instances(self._instances(body), "instances")
            self.metrics.request_instances.observe(len(x))
            slot, proba = await answer(self.registry, version, x, self.max_queue,
                                       self.metrics.quality.observe)
        except ServeError as exc:
            return exc.status, _error(exc), [(k.encode(), v.encode())
                                             for k, v in exc.headers.items()]
        classes = slot.predictor.schema.class_labels
        return 200, json.dumps({
            "model_version": slot.version, "class_labels": list(classes),
            "labels": [classes[i] for i in proba.argmax(axis=1)],
            "probabilities": proba.tolist()}).encode(), []

    def _instances(self, body: bytes) -> Any:
        """The body parsed and validated in one pass (pydantic-core reads the JSON bytes)."""
        try:
            return self.body.model_validate_json(body).instances  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise invalid_input(exc.errors(), self.expected) from None


async def _body(receive: Receive) -> bytes:
    """The whole request body (the guard has already bounded its size)."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(exc: ServeError) -> bytes:
    extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
    if exc.details:
        extra["details"] = exc.details
    if "retry-after" in exc.headers:
        extra["retry_after"] = int(exc.headers["retry-after"])
    hint = " (see GET /v1/models)" if exc.status == 404 else ""
    return error_body(exc.kind, exc.message + hint, **extra)


def openapi_operations(responses: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI path items of :data:`PATHS`: the ``PredictRequest`` body, the
    ``PredictResponse`` answer and ``responses`` (the error answers, by status)."""
    def operation(path: str, summary: str) -> dict[str, Any]:
        params = [{"name": "version", "in": "path", "required": True,
                   "schema": {"type": "string", "title": "Version"}}] if "{" in path else []
        return {"post": {
            "summary": summary, "operationId": "predict" + ("_version" if params else ""),
            "parameters": params,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/PredictRequest"}}}},
            "responses": {"200": {"description": "Successful Response", "content": {
                "application/json": {"schema": {
                    "$ref": "#/components/schemas/PredictResponse"}}}}, **responses}}}
    return {path: operation(path, summary) for path, summary in PATHS.items()}
