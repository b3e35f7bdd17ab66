"""The Open Inference Protocol (KServe v2) over REST, beside the ``/v1`` API.

Endpoints (the protocol's, https://kserve.github.io/website/docs/concepts/architecture/
data-plane/v2-protocol):

    GET  /v2                                            server metadata
    GET  /v2/health/live, /v2/health/ready              200, or 503 when not ready
    GET  /v2/models/{name}[/versions/{version}]         model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready   200, or 503 / 404
    POST /v2/models/{name}[/versions/{version}]/infer   inference

The model's name is ``serve.model_name`` (``fedfuse``); its versions are the artifact
versions served (``1.0.0+<hash>``, or the semver alone when it is unique). An infer
request carries one input tensor, ``shape`` ``[n, *input_shape]``, of a numeric
``datatype``, its ``data`` flat or nested in row-major order; the answer holds the
outputs ``probabilities`` (FP32, ``[n, classes]``, columns in the order of the
metadata's ``class_labels`` parameter) and ``label`` (BYTES, ``[n]``), or those named
in the request's ``outputs``. The binary tensor data extension is spoken both ways
(``Inference-Header-Content-Length``), as clients such as Triton's use it by default.
Errors are ``{"error": message}`` with the status the protocol gives: 400 for a bad
request, 404 for an unknown model or version.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from starlette.responses import Response

from fedfuse import __version__
from fedfuse.serving.config import ServeConfig
from fedfuse.serving.inference import (
    ServeError,
    answer,
    float32_instances,
)
from fedfuse.serving.metrics import ServeMetrics
from fedfuse.serving.registry import ModelRegistry, ModelSlot

DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
          **{f"INT{b}": f"<i{b // 8}" for b in (8, 16, 32, 64)},
          **{f"UINT{b}": f"<u{b // 8}" for b in (8, 16, 32, 64)}}
"""The protocol's numeric tensor datatypes fedfuse takes as input, as little-endian
numpy dtypes (its binary tensor data extension sends them so)."""
OUTPUTS = ("probabilities", "label")
HEADER_LENGTH = "inference-header-content-length"


def _json(payload: dict[str, Any], status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type="application/json",
                    headers=headers)


def oip_error(exc: ServeError) -> Response:
    """The protocol's error body; a refused input is a bad request (400)."""
    status = 400 if exc.status == 422 else exc.status
    return _json({"error": exc.message}, status, exc.headers or None)


def labels_bytes(labels: list[str]) -> bytes:
    """BYTES elements as the protocol's raw contents: each one's length (4 bytes, little
    endian), then its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in (lab.encode() for lab in labels))


def tensor_instances(name: Any, datatype: Any, shape: Any, data: Any,
                     input_shape: tuple[int, ...], max_instances: int) -> np.ndarray:
    """An input tensor as float32 ``(n, *input_shape)``: ``data`` is the raw
    little-endian bytes (binary extension, gRPC's raw contents) or numbers, flat or
    nested; raises ServeError(400) naming what is wrong."""
    def bad(message: str) -> ServeError:
        return ServeError(400, "invalid_input", f"input {name!r}: {message}")

    dtype = str(datatype)
    if dtype not in DTYPES:
        raise bad(f"datatype {dtype!r} is not a numeric tensor type fedfuse takes "
                  f"({', '.join(DTYPES)})")
    given = list(shape) if isinstance(shape, (list, tuple)) else [shape]
    dims = [d for d in given if isinstance(d, int) and not isinstance(d, bool)]
    if dims != given or dims[1:] != list(input_shape) or not 1 <= dims[0] <= max_instances:
        raise bad(f"shape {shape!r} is not [n, {', '.join(map(str, input_shape))}] with "
                  f"1 <= n <= {max_instances}")
    try:
        values = np.frombuffer(data, dtype=DTYPES[dtype]) if isinstance(data, bytes) \
            else np.asarray(data)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if values.dtype.kind not in "iuf":
        raise bad(f"data must be numbers (found {values.dtype.kind!r} values)")
    if values.size != math.prod(dims) or (values.ndim > 1 and list(values.shape) != dims):
        raise bad(f"{values.size} values do not fill shape {dims}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise bad("NaN or infinite values")
    try:
        return float32_instances(values.reshape(dims), str(name or "input"))
    except ServeError as exc:
        raise bad(exc.message) from None


def parse_infer(body: bytes, header_length: str | None, input_shape: tuple[int, ...],
                max_instances: int) -> tuple[np.ndarray, list[tuple[str, bool]], Any]:
    """An infer request's input as float32 ``(n, *input_shape)``, the outputs asked for
    (name, in binary?) and the request's ``id``; raises ServeError(400) naming what is
    wrong. With ``header_length`` (the binary tensor data extension) the body is that
    many bytes of JSON followed by the tensors' raw bytes."""
    def bad(message: str) -> ServeError:
        return ServeError(400, "invalid_input", message)

    head, blob = body, b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad(f"Inference-Header-Content-Length {header_length!r} does not fit the "
                      f"{len(body)}-byte body")
        head, blob = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the body is not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise bad('expected a JSON object with an "inputs" list')
    if len(request["inputs"]) != 1 or not isinstance(request["inputs"][0], dict):
        raise bad(f"expected exactly one input tensor, got {len(request['inputs'])}")
    tensor = request["inputs"][0]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and size != len(blob):
        raise bad(f"input {tensor.get('name')!r}: binary_data_size {size} but {len(blob)} "
                  "bytes follow")
    x = tensor_instances(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"),
                         blob if size is not None else tensor.get("data"), input_shape,
                         max_instances)
    binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = request.get("outputs") or [{"name": n} for n in OUTPUTS]
    outputs = [(str(o.get("name")), bool((o.get("parameters") or {}).get("binary_data",
                                                                          binary)))
               if isinstance(o, dict) else ("", False) for o in asked]
    unknown = [n for n, _ in outputs if n not in OUTPUTS]
    if unknown:
        raise bad(f"unknown output {unknown[0]!r} (outputs: {', '.join(OUTPUTS)})")
    return x, outputs, request.get("id")


def infer_response(name: str, slot: ModelSlot, proba: np.ndarray,
                   outputs: list[tuple[str, bool]], request_id: Any) -> Response:
    """The protocol's infer response for ``proba`` (n, K): each output as JSON ``data``
    or, where asked, as raw bytes after the JSON (little-endian FP32; BYTES elements
    each preceded by their 4-byte little-endian length)."""
    classes = slot.predictor.schema.class_labels
    labels = [classes[i] for i in proba.argmax(axis=1)]
    tensors, blobs = [], []
    for out, binary in outputs:
        tensor: dict[str, Any] = {"name": out, "datatype": "FP32", "shape": list(proba.shape)}
        if out == "label":
            tensor.update(datatype="BYTES", shape=[len(labels)])
        if binary:
            blobs.append(proba.astype("<f4").tobytes() if out == "probabilities" else
                         labels_bytes(labels))
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = proba.reshape(-1).tolist() if out == "probabilities" else labels
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": name, "model_version": slot.version,
                            "outputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    head = json.dumps(body).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


def model_metadata(name: str, slots: list[ModelSlot]) -> dict[str, Any]:
    """The protocol's model metadata over the versions ``slots`` (newest schema)."""
    schema = slots[-1].predictor.schema
    return {"name": name, "versions": [s.version for s in slots], "platform": "fedfuse",
            "inputs": [{"name": "input", "datatype": "FP32",
                        "shape": [-1, *schema.input_shape]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, len(schema.class_labels)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"class_labels": list(schema.class_labels)}}


def add_oip_routes(app: FastAPI, registry: ModelRegistry, cfg: ServeConfig,
                   metrics: ServeMetrics, input_shape: tuple[int, ...]) -> None:
    """The protocol's endpoints on ``app`` (keys, limits and metrics come from the
    app's middleware, as for ``/v1``)."""
    def versions(name: str, version: str) -> list[ModelSlot]:
        if name != cfg.model_name:
            raise ServeError(404, "not_found", f"unknown model {name!r} (this server "
                             f"serves {cfg.model_name!r})")
        if not version:
            if not registry.slots:
                raise ServeError(503, "unavailable", "no model is loaded yet")
            return registry.slots
        slot = registry.get(version)
        if slot is None:
            raise ServeError(404, "not_found", f"model {name!r} has no version {version!r} "
                             f"(versions: {', '.join(s.version for s in registry.slots)})")
        return [slot]

    @app.get("/v2", summary="OIP server metadata", tags=["open inference protocol"])
    async def server_metadata() -> Response:
        return _json({"name": "fedfuse", "version": __version__, "extensions": []})

    @app.get("/v2/health/live", summary="OIP liveness", tags=["open inference protocol"])
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", summary="OIP readiness", tags=["open inference protocol"])
    async def ready() -> Response:
        up = registry.latest is not None
        return _json({"ready": up}, 200 if up else 503)

    async def metadata(name: str, version: str = "") -> Response:
        try:
            return _json(model_metadata(name, versions(name, version)))
        except ServeError as exc:
            return oip_error(exc)

    async def model_ready(name: str, version: str = "") -> Response:
        try:
            versions(name, version)
        except ServeError as exc:
            return oip_error(exc)
        return _json({"name": name, "ready": True})

    async def infer(name: str, request: Request, version: str = "") -> Response:
        try:
            versions(name, version)
            x, outputs, request_id = parse_infer(
                await request.body(), request.headers.get(HEADER_LENGTH), input_shape,
                cfg.max_instances)
            metrics.request_instances.observe(len(x))
            slot, proba = await answer(registry, version, x, cfg.max_queue,
                                       metrics.quality.observe)
        except ServeError as exc:
            return oip_error(exc)
        return infer_response(name, slot, proba, outputs, request_id)

    tags: list[str | Enum] = ["open inference protocol"]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(base, metadata, methods=["GET"], summary="OIP model metadata",
                          tags=tags)
        app.add_api_route(f"{base}/ready", model_ready, methods=["GET"],
                          summary="OIP model readiness", tags=tags)
        app.add_api_route(f"{base}/infer", infer, methods=["POST"], summary="OIP inference",
                          tags=tags)
