"""The predict API: a FastAPI app over a model registry.

Endpoints:
    POST /v1/predict                    the latest version
    POST /v1/models/{version}/predict   one version (full, or its semver alone)
    GET  /v1/model                      public manifest of the latest version
    GET  /v1/models                     every version being served
    GET  /healthz, /readyz, /metrics    liveness, readiness, Prometheus text
    GET  /openapi.json, /docs           the schema

The request body is ``{"instances": [...]}`` with every instance shaped as the artifact's
schema says (the JSON schema states the exact nesting and lengths). Answers carry
``model_version``, ``class_labels``, ``labels`` (one per instance) and
``probabilities`` (one row per instance, columns in ``class_labels`` order).
"""


import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fedfuse import __version__
from fedfuse.artifact.manifest import MANIFEST, ArtifactError, read_verified_manifest
from fedfuse.artifact.signing import trusted_keys
from fedfuse.data.datasets import DataSchema
from fedfuse.models.device import device_label, resolve_device
from fedfuse.serving.auth import KeyStore, read_keys
from fedfuse.serving.config import ServeConfig
from fedfuse.serving.guard import GUARDED_PREFIXES, GuardMiddleware, error_body
from fedfuse.serving.metrics import MetricsMiddleware, ServeMetrics
from fedfuse.serving.oip import add_oip_routes
from fedfuse.serving.oip_grpc import OipService, start_grpc
from fedfuse.serving.predict import PredictEndpoint, openapi_operations
from fedfuse.serving.registry import ModelRegistry, ModelSlot, RegistryError, artifact_dirs
from fedfuse.serving.workers import Shared

log = logging.getLogger("fedfuse.serve")

PUBLIC_MANIFEST_KEYS = ("model_version", "created_at", "members", "fused_test_accuracy",
                        "privacy", "schema", "format_version", "content_sha256")


class PredictResponse(BaseModel):
    model_version: str
    class_labels: list[str]
    labels: list[str] = Field(description="the most probable class of each instance")
    probabilities: list[list[float]] = Field(
        description="per instance, the fused probability of each class in class_labels order")


class ErrorResponse(BaseModel):
    error: str = Field(description="kind: invalid_input, unauthorized, rate_limited, ...")
    message: str


def request_model(schema: DataSchema, max_instances: int) -> type[BaseModel]:
    """The request body type: ``instances``, 1..max_instances arrays of ``input_shape``,
    of finite numbers (JSON numbers only: no strings, booleans or nulls)."""
    item: Any = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    for size in reversed(schema.input_shape):
        item = Annotated[list[item], Field(min_length=size, max_length=size)]
    instances = Annotated[list[item], Field(
        min_length=1, max_length=max_instances,
        description=f"1 to {max_instances} instances, each shaped "
                    f"{list(schema.input_shape)}")]
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"),
                        instances=(instances, ...))


def serving_schema(source: Path, trust: tuple[Ed25519PublicKey, ...] | None) -> DataSchema:
    """The input schema of the newest artifact in ``source`` that verifies (signed by one
    of ``trust``, when given), read before serving starts."""
    dirs = artifact_dirs(source) if source.is_dir() else []
    if not dirs:
        raise RegistryError(f"{source}: no artifact (a directory with manifest.json, such as "
                            "RUN_DIR/model, or a directory of them)")
    problems = []
    for directory in sorted(dirs, key=lambda d: (d / MANIFEST).stat().st_mtime,
                            reverse=True):
        try:
            return DataSchema.from_dict(read_verified_manifest(directory, trust)["schema"])
        except ArtifactError as exc:
            problems.append(str(exc))
    raise RegistryError(f"{source}: no artifact passes verification: {'; '.join(problems)}")


class KeysWatcher:
    """The key store of a keys file, re-read when the file changes. A file that goes away
    leaves an empty store, which refuses every key (deleting the file revokes them all,
    never opens the API); a file that becomes malformed keeps the keys read last."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: float | None = None
        self.store: KeyStore | None = None
        self.reload()

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            stamp: float | None = self.path.stat().st_mtime
        except FileNotFoundError:
            stamp = None
        if stamp is None and self.store is not None:
            if len(self.store):
                log.warning("API keys file %s is gone: every request is refused until it "
                            "is back", self.path)
            self.store, self._stamp = KeyStore([]), None
        elif stamp is None or stamp != self._stamp:
            store = KeyStore(read_keys(self.path))  # raises on a bad file: keep the old one
            self.store, self._stamp = store, stamp
            log.info("API keys: %d from %s", len(store), self.path)


def create_app(cfg: ServeConfig, source: Path, shared: Shared) -> FastAPI:
    """The app for ``source`` (an artifact or a registry of them) under ``cfg``, with
    what it shares with the server's other workers."""
    import torch

    trust = trusted_keys(cfg.trust) if cfg.trust else None
    schema = serving_schema(source, trust)
    device = resolve_device(cfg.device, "device")
    log.info("forward passes run on %s", device_label(device))
    keys = KeysWatcher(Path(cfg.api_keys) if cfg.api_keys else None)
    metrics = ServeMetrics(shared.metrics_dir)
    inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedfuse-forward")
    registry = ModelRegistry(source, max_batch_size=cfg.max_batch_size,
                             max_wait=cfg.max_wait_ms / 1000.0, max_queue=cfg.max_queue,
                             executor=inference,
                             observe=metrics.observe_batch, device=device,
                             allow_arch=tuple(cfg.allow_arch), search=str(Path.cwd()),
                             trust=trust)
    Body = request_model(schema, cfg.max_instances)

    async def refresh() -> None:
        await registry.refresh()
        metrics.models.set(len(registry.slots))

    async def watch() -> None:
        while True:
            await asyncio.sleep(cfg.reload_interval)
            try:
                await refresh()
                keys.reload()
                metrics.quality.flush()  # other workers' scrapes see it too
            except Exception:  # a bad rescan must not end the watcher
                log.exception("rescan of %s or the keys file failed; serving as before",
                              source)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(cfg.threads)
        await refresh()
        if registry.latest is None:
            raise RegistryError(f"{source}: no artifact could be loaded (see the log)")
        # Objects alive now (torch, the models, the app) live as long as the process:
        # moved out of the collector's reach, a full collection no longer scans them, and
        # its pauses no longer show in the latency tail (100+ ms before this, measured).
        gc.collect()
        gc.freeze()
        watcher = asyncio.create_task(watch()) if cfg.reload_interval > 0 else None
        grpc_server = None if cfg.grpc_port is None else await start_grpc(OipService(
            registry, cfg, lambda: keys.store, limiter, metrics, tuple(schema.input_shape)),
            cfg)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=10)
            if watcher is not None:
                watcher.cancel()
            await registry.close()
            inference.shutdown(wait=True)

    app = FastAPI(title="fedfuse predict API", version=__version__, lifespan=lifespan,
                  description="Predictions of a fused fedfuse model. Send an API key as "
                              "'Authorization: Bearer <key>' when the server has keys.")
    limiter = shared.limiter
    app.add_middleware(GuardMiddleware, max_body_bytes=cfg.max_body_bytes,
                       keys=lambda: keys.store, limiter=limiter)
    # First in the routing table: the predict routes, plain ASGI (see predict.py)
    app.router.routes[:0] = PredictEndpoint(
        registry, Body, f"{{\"instances\": [...]}} with 1 to {cfg.max_instances} instances, "
        f"each an array shaped {list(schema.input_shape)} of finite numbers", metrics,
        cfg.max_queue).routes()
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    _add_error_handler(app)

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text} for code, text in (
            (401, "no valid API key"), (404, "no such model version"),
            (413, "body too large"), (422, "input does not match the schema"),
            (429, "rate limit exceeded"),
            (503, "no model loaded, or too many requests waiting (Retry-After)"))}

    @app.get("/v1/model", summary="Public manifest of the latest version", responses=errors)
    async def model_info() -> Any:
        slot = registry.latest
        if slot is None:
            return _error(503, "unavailable", "no model is loaded yet")
        return _public(slot)

    @app.get("/v1/models", summary="Every version being served")
    async def models() -> dict[str, Any]:
        latest = registry.latest
        return {"latest": latest.version if latest else None,
                "versions": [_public(s) for s in registry.slots]}

    @app.get("/v1/models/{version}/quality", summary="Model-quality figures of one version",
             responses=errors)
    async def quality(version: str) -> Any:
        slot = registry.get(version)
        if slot is None:
            return _error(404, "not_found", f"no model version {version!r} is being served "
                          "(see GET /v1/models)")
        return metrics.quality.report(slot.version)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model is loaded",
             responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        latest = registry.latest
        if latest is None:
            return _error(503, "unavailable", "no model is loaded yet")
        return Response(json.dumps({"status": "ready", "model_version": latest.version}),
                        media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        metrics.quality.flush()
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    add_oip_routes(app, registry, cfg, metrics, tuple(schema.input_shape))
    app.openapi = lambda: _openapi(app, Body, errors)  # type: ignore[method-assign]
    return app


def _public(slot: ModelSlot) -> dict[str, Any]:
    manifest = slot.predictor.manifest
    public = {k: manifest[k] for k in PUBLIC_MANIFEST_KEYS if k in manifest}
    public["fusion"] = {k: v for k, v in manifest["fusion"].items() if k != "fit"}
    return public


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> Response:
    return Response(error_body(kind, message, **extra), status_code=status,
                    media_type="application/json", headers=headers)


def _add_error_handler(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail))


def _openapi(app: FastAPI, body: type[BaseModel],
             errors: dict[int | str, dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's schema plus the predict operations (with the request and response body
    types and the ``errors`` answers) and the API-key scheme on the guarded operations."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        schema["paths"] = {**openapi_operations({str(code): {
            "description": e["description"], "content": {"application/json": {"schema": {
                "$ref": f"#/components/schemas/{e['model'].__name__}"}}}}
            for code, e in errors.items()}), **schema["paths"]}
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(
            PredictRequest=body.model_json_schema(),
            PredictResponse=PredictResponse.model_json_schema())
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema["paths"].items():
            if path.startswith(GUARDED_PREFIXES):
                for op in ops.values():
                    op["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema
