"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), with the
standard gRPC health service and server reflection, on a port of its own
(``serve.grpc_port``), in the HTTP server's event loop: the same registry, batcher,
API keys (metadata ``authorization: Bearer <key>`` or ``x-api-key``), rate limit and
TLS certificate as REST.

Liveness, readiness and server metadata are open, as over REST; model readiness,
metadata and inference need a key when the server has keys. Input tensors come as
``raw_input_contents`` (little-endian bytes) or typed ``contents``; outputs go back as
``raw_output_contents`` (FP32 probabilities; BYTES labels, each element preceded by its
4-byte little-endian length), as Triton does. Failures map to the protocol's status
codes: INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedfuse import __version__
from fedfuse.serving.auth import KeyStore
from fedfuse.serving.config import ServeConfig
from fedfuse.serving.guard import client_key
from fedfuse.serving.inference import ServeError, answer
from fedfuse.serving.metrics import ServeMetrics
from fedfuse.serving.oip import OUTPUTS, labels_bytes, model_metadata, tensor_instances
from fedfuse.serving.oip_proto import PACKAGE, POOL, RPCS, SERVICE, messages
from fedfuse.serving.ratelimit import RateLimiter
from fedfuse.serving.registry import ModelRegistry, ModelSlot

log = logging.getLogger("fedfuse.serve")

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 422: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL,
          503: grpc.StatusCode.UNAVAILABLE}
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
            "UINT64": "uint64_contents", **{t: "int_contents" for t in ("INT8", "INT16",
                                                                        "INT32")},
            **{t: "uint_contents" for t in ("UINT8", "UINT16", "UINT32")}}
"""Where the typed ``contents`` of each datatype live (FP16 comes raw only)."""
OPEN = {"ServerLive", "ServerReady", "ServerMetadata"}


def request_tensor(request: Any, input_shape: tuple[int, ...], max_instances: int
                   ) -> np.ndarray:
    """A ModelInferRequest's one input as float32 ``(n, *input_shape)``."""
    if len(request.inputs) != 1:
        raise ServeError(400, "invalid_input",
                         f"expected exactly one input tensor, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        data: Any = bytes(request.raw_input_contents[0])
    else:
        data = list(getattr(tensor.contents, CONTENTS.get(tensor.datatype, "fp32_contents")))
    return tensor_instances(tensor.name, tensor.datatype, list(tensor.shape), data,
                            input_shape, max_instances)


class OipService:
    """The protocol's RPCs over one registry, behind the server's keys and rate limit."""

    def __init__(self, registry: ModelRegistry, cfg: ServeConfig,
                 keys: Callable[[], KeyStore | None], limiter: RateLimiter | None,
                 metrics: ServeMetrics, input_shape: tuple[int, ...]) -> None:
        self.registry, self.cfg, self.keys, self.limiter = registry, cfg, keys, limiter
        self.metrics, self.input_shape = metrics, input_shape

    def admit(self, context: grpc.aio.ServicerContext) -> None:
        """The API key and the rate limit, as the HTTP guard checks them."""
        meta = {k.lower(): v for k, v in context.invocation_metadata() or ()
                if isinstance(v, str)}
        auth = meta.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else \
            meta.get("x-api-key", "").strip()
        peer = context.peer()  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:..."
        caller = client_key(peer.split(":", 1)[1].rsplit(":", 1)[0]) \
            if peer.startswith(("ipv4:", "ipv6:")) else f"peer:{peer}"
        store = self.keys()
        if store is not None:
            key_id = store.verify(key)
            if key_id is None:
                raise ServeError(401, "unauthorized", "a valid API key is required: send it "
                                 "as metadata 'authorization: Bearer <key>'")
            caller = f"key:{key_id}"
        if self.limiter is not None and (wait := self.limiter.retry_after(caller)) is not None:
            raise ServeError(429, "rate_limited", f"rate limit of {self.limiter.limit} "
                             f"exceeded; retry in {wait} s", {"retry-after": str(wait)})

    def versions(self, name: str, version: str) -> list[ModelSlot]:
        if name != self.cfg.model_name:
            raise ServeError(404, "not_found", f"unknown model {name!r} (this server serves "
                             f"{self.cfg.model_name!r})")
        slot = self.registry.get(version) if version else self.registry.latest
        if slot is None:
            raise ServeError(404, "not_found", f"model {name!r} has no version {version!r}")\
                if version else ServeError(503, "unavailable", "no model is loaded yet")
        return [slot] if version else self.registry.slots

    async def ServerLive(self, request: Any) -> Any:
        return messages["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any) -> Any:
        return messages["ServerReadyResponse"](ready=self.registry.latest is not None)

    async def ServerMetadata(self, request: Any) -> Any:
        return messages["ServerMetadataResponse"](name="fedfuse", version=__version__)

    async def ModelReady(self, request: Any) -> Any:
        try:
            self.versions(request.name, request.version)
        except ServeError:
            return messages["ModelReadyResponse"](ready=False)
        return messages["ModelReadyResponse"](ready=True)

    async def ModelMetadata(self, request: Any) -> Any:
        meta = model_metadata(request.name, self.versions(request.name, request.version))
        out = messages["ModelMetadataResponse"](name=meta["name"], versions=meta["versions"],
                                                platform=meta["platform"])
        for side in ("inputs", "outputs"):
            for t in meta[side]:
                getattr(out, side).add(name=t["name"], datatype=t["datatype"],
                                       shape=t["shape"])
        out.parameters["class_labels"].string_param = json.dumps(
            meta["parameters"]["class_labels"])  # a JSON list: labels may hold commas
        return out

    async def ModelInfer(self, request: Any) -> Any:
        self.versions(request.model_name, request.model_version)
        x = request_tensor(request, self.input_shape, self.cfg.max_instances)
        names = [o.name for o in request.outputs] or list(OUTPUTS)
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise ServeError(400, "invalid_input", f"unknown output {unknown[0]!r} "
                             f"(outputs: {', '.join(OUTPUTS)})")
        self.metrics.request_instances.observe(len(x))
        slot, proba = await answer(self.registry, request.model_version, x,
                                   self.cfg.max_queue, self.metrics.quality.observe)
        classes = slot.predictor.schema.class_labels
        out = messages["ModelInferResponse"](model_name=request.model_name,
                                             model_version=slot.version, id=request.id)
        for name in names:
            if name == "probabilities":
                out.outputs.add(name=name, datatype="FP32", shape=list(proba.shape))
                out.raw_output_contents.append(proba.astype("<f4").tobytes())
            else:
                out.outputs.add(name=name, datatype="BYTES", shape=[len(proba)])
                out.raw_output_contents.append(labels_bytes(
                    [classes[i] for i in proba.argmax(axis=1)]))
        return out

    def handler(self, rpc: str) -> grpc.RpcMethodHandler:
        """The unary handler of ``rpc``: admission, then the call; a ServeError becomes
        the protocol's status code with its message."""
        call: Callable[[Any], Awaitable[Any]] = getattr(self, rpc)

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if rpc not in OPEN:
                    self.admit(context)
                return await call(request)
            except ServeError as exc:
                if exc.headers:
                    context.set_trailing_metadata(tuple(exc.headers.items()))
                await context.abort(STATUS[exc.status], exc.message)

        request_type, response_type = (messages[m] for m in RPCS[rpc])
        return grpc.unary_unary_rpc_method_handler(
            run, request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString)


async def start_grpc(service: OipService, cfg: ServeConfig) -> grpc.aio.Server:
    """The gRPC server on ``cfg.host:cfg.grpc_port`` (TLS with ``cfg``'s certificate),
    serving the protocol, health and reflection; started."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length",
                                       cfg.max_body_bytes)])
    full = f"{PACKAGE}.{SERVICE}"
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        full, {rpc: service.handler(rpc) for rpc in RPCS})])
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for name in ("", full):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    if not _in_pool(health_pb2.DESCRIPTOR.name):
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection(
        (full, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=POOL)
    where = f"{cfg.host}:{cfg.grpc_port}"
    if cfg.tls_cert and cfg.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        server.add_secure_port(where, credentials)
    else:
        server.add_insecure_port(where)
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s%s", where,
             " (TLS)" if cfg.tls_cert else "")
    return server


def _in_pool(file_name: str) -> bool:
    try:
        POOL.FindFileByName(file_name)
    except KeyError:
        return False
    return True
