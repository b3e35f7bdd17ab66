"""``PredictClient``'s transport for ``grpc://`` and ``grpcs://`` addresses: the Open
Inference Protocol's gRPC service (``fedfuse serve --grpc-port``), with the HTTP
transport's retries and exceptions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import numpy as np

from fedfuse.serving.oip_proto import PACKAGE, RPCS, SERVICE, messages

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def raw_labels(raw: bytes) -> list[str]:
    """BYTES raw contents (each element after its 4-byte little-endian length) as text."""
    out, at = [], 0
    while at < len(raw):
        size = int.from_bytes(raw[at:at + 4], "little")
        out.append(raw[at + 4:at + 4 + size].decode())
        at += 4 + size
    return out


class GrpcTransport:
    """Unary calls to one server's ``inference.GRPCInferenceService``."""

    def __init__(self, url: str, *, api_key: str | None, timeout: float,
                 verify: bool | str | Path) -> None:
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"{url}: expected grpc://HOST:PORT or grpcs://HOST:PORT")
        self.target = f"{parts.hostname}:{parts.port}"
        if parts.scheme == "grpcs":
            roots = Path(verify).read_bytes() if isinstance(verify, (str, Path)) else None
            self.channel = grpc.secure_channel(self.target,
                                               grpc.ssl_channel_credentials(roots))
        else:
            self.channel = grpc.insecure_channel(self.target)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self._labels: dict[str, list[str]] = {}
        self._calls: dict[str, Callable[..., Any]] = {
            rpc: self.channel.unary_unary(
                f"/{PACKAGE}.{SERVICE}/{rpc}",
                request_serializer=messages[request].SerializeToString,
                response_deserializer=messages[response].FromString)
            for rpc, (request, response) in RPCS.items()}

    def close(self) -> None:
        self.channel.close()

    def call(self, rpc: str, **fields: Any) -> Any:
        """One RPC; raises grpc.RpcError."""
        request = messages[RPCS[rpc][0]](**fields)
        return self._calls[rpc](request, timeout=self.timeout, metadata=self.metadata)

    def ready(self) -> bool:
        try:
            return bool(self.call("ServerReady").ready)
        except grpc.RpcError:
            return False

    def class_labels(self, model: str, version: str) -> list[str]:
        """The class labels of ``version`` (from its model metadata), fetched once."""
        if version not in self._labels:
            meta = self.call("ModelMetadata", name=model, version=version)
            self._labels[version] = json.loads(meta.parameters["class_labels"].string_param)
        return self._labels[version]

    def infer(self, model: str, x: np.ndarray, version: str | None
              ) -> tuple[str, list[str], np.ndarray, list[str]]:
        """(model version, class labels, probabilities, labels) for float32 ``x``."""
        request = messages["ModelInferRequest"](model_name=model, model_version=version or "")
        request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        answer = self._calls["ModelInfer"](request, timeout=self.timeout,
                                           metadata=self.metadata)
        raw = dict(zip((o.name for o in answer.outputs), answer.raw_output_contents))
        shape = next(list(o.shape) for o in answer.outputs if o.name == "probabilities")
        proba = np.frombuffer(raw["probabilities"], dtype="<f4").reshape(shape)
        return (answer.model_version, self.class_labels(model, answer.model_version),
                proba.astype(np.float64), raw_labels(raw["label"]))


def retry_after(error: grpc.RpcError) -> str | None:
    """The ``retry-after`` trailing metadata of a refused call, if any."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return next((str(v) for k, v in trailing or () if k == "retry-after"), None)


def with_retries(call: Callable[[], Any], retries: int,
                 delay: Callable[[int, str | None], float], max_wait: float) -> Any:
    """``call()``, again after UNAVAILABLE or RESOURCE_EXHAUSTED up to ``retries`` times
    (waiting ``delay(attempt, retry_after)``, unless that is over ``max_wait``)."""
    attempt = 0
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRY_CODES or attempt >= retries:
                raise
            wait = delay(attempt, retry_after(exc))
            if wait > max_wait:
                raise
            time.sleep(wait)
            attempt += 1
