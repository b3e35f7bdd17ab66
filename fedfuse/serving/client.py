"""``PredictClient``: a small Python client of the predict API (``fedfuse serve``).

    with PredictClient("https://models.example.org", api_key=KEY, verify="ca.pem") as c:
        result = c.predict(X)          # result.labels, result.probabilities, result.model_version

A ``grpc://HOST:PORT`` (``grpcs://`` with TLS) address speaks the Open Inference
Protocol's gRPC service instead (``fedfuse serve --grpc-port``), with the same results,
retries and exceptions.

Transient failures (connection errors, timeouts, 429, 502, 503, 504) are retried with
exponential backoff, honouring ``Retry-After`` up to ``max_retry_wait`` seconds (a longer
wait raises at once rather than block the caller); everything else raises at once. Every
failure is one of the exceptions below, with the server's message in it.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from fedfuse.errors import FedfuseError
from fedfuse.serving.grpc_client import GrpcTransport, with_retries

RETRY_STATUS = (429, 502, 503, 504)


class PredictError(FedfuseError):
    """A request to the predict API failed."""

    def __init__(self, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


class ConnectionFailed(PredictError):
    """The server could not be reached (after the retries)."""


class AuthenticationError(PredictError):
    """401: the API key is missing or not valid."""


class InvalidInput(PredictError):
    """422 or 413: the instances do not match the model's schema or limits."""

    @property
    def field(self) -> str | None:
        return self.body.get("field")


class RateLimited(PredictError):
    """429, still after the retries."""


class NotFound(PredictError):
    """404: no such model version or path."""


class ServerError(PredictError):
    """5xx, or an answer that is not the API's JSON."""


_BY_STATUS = {401: AuthenticationError, 404: NotFound, 413: InvalidInput, 422: InvalidInput,
              429: RateLimited}
_BY_CODE = {grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
            grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
            grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
            grpc.StatusCode.UNAVAILABLE: ConnectionFailed}


@dataclass(frozen=True)
class Prediction:
    model_version: str
    class_labels: list[str]
    labels: np.ndarray
    probabilities: np.ndarray


def tls_context(verify: bool | str | Path | ssl.SSLContext) -> bool | ssl.SSLContext:
    """``verify`` as httpx takes it: a CA file path becomes an SSL context trusting it."""
    if isinstance(verify, (str, Path)):
        return ssl.create_default_context(cafile=str(verify))
    return verify


class PredictClient:
    """Calls one predict server; reuse it (connections are kept alive)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 10.0,
                 retries: int = 3, backoff: float = 0.2, max_retry_wait: float = 10.0,
                 verify: bool | str | Path | ssl.SSLContext = True) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._grpc: GrpcTransport | None = None
        if base_url.startswith(("grpc://", "grpcs://")):
            verify_grpc = verify if isinstance(verify, (bool, str, Path)) else True
            self._grpc = GrpcTransport(base_url, api_key=api_key, timeout=timeout,
                                       verify=verify_grpc)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout, verify=tls_context(verify))
        self.model_name = "fedfuse"
        """The Open Inference Protocol's model name (gRPC addresses)."""
        self.retries = retries
        self.backoff = backoff
        self.max_retry_wait = max_retry_wait

    def __enter__(self) -> PredictClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._grpc is not None:
            self._grpc.close()

    def predict(self, X: Any, version: str | None = None) -> Prediction:
        """Labels and probabilities for the instances ``X`` (array-like, (n, *shape))."""
        arr = np.asarray(X, dtype=np.float64)
        if self._grpc is not None:
            return self._predict_grpc(self._grpc, arr, version)
        path = f"/v1/models/{version}/predict" if version else "/v1/predict"
        body = self._request("POST", path, json={"instances": arr.tolist()})
        return Prediction(model_version=body["model_version"],
                          class_labels=list(body["class_labels"]),
                          labels=np.asarray(body["labels"]),
                          probabilities=np.asarray(body["probabilities"], dtype=np.float64))

    def model(self) -> dict[str, Any]:
        """The public manifest of the version ``/v1/predict`` uses (HTTP only)."""
        return self._request("GET", "/v1/model")

    def versions(self) -> dict[str, Any]:
        """Every version served and the latest one (HTTP only)."""
        return self._request("GET", "/v1/models")

    def _predict_grpc(self, transport: GrpcTransport, arr: np.ndarray,
                      version: str | None) -> Prediction:
        try:
            model_version, classes, proba, labels = with_retries(
                lambda: transport.infer(self.model_name, arr.astype(np.float32), version),
                self.retries, self._delay, self.max_retry_wait)
        except grpc.RpcError as exc:
            cls = _BY_CODE.get(exc.code(), ServerError)
            raise cls(f"ModelInfer {transport.target}: {exc.code().name}: {exc.details()}",
                      None, {}) from None
        return Prediction(model_version=model_version, class_labels=classes,
                          labels=np.asarray(labels), probabilities=proba)

    def ready(self) -> bool:
        if self._grpc is not None:
            return self._grpc.ready()
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.2) -> None:
        """Block until ``/readyz`` answers 200; raises ConnectionFailed after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ConnectionFailed(f"{self._http.base_url} was not ready within "
                                       f"{timeout:g} s")
            time.sleep(interval)

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if self._grpc is not None:
            raise PredictError(f"{method} {path} is the HTTP API's; a grpc:// client only "
                               "predicts (use the server's http:// address)")
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise ConnectionFailed(f"{method} {self._http.base_url}{path}: {exc} "
                                           f"(after {attempt + 1} attempts)") from exc
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status_code in RETRY_STATUS and attempt < self.retries:
                delay = self._delay(attempt, response.headers.get("retry-after"))
                if delay <= self.max_retry_wait:
                    time.sleep(delay)
                    attempt += 1
                    continue
            return _decode(response, f"{method} {path}")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """``backoff * 2^attempt`` seconds, or the server's ``Retry-After`` if longer."""
        delay = self.backoff * 2 ** attempt
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        return delay


def _decode(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict):
        return body
    info = body if isinstance(body, dict) else {}
    message = info.get("message") or response.text[:200] or response.reason_phrase
    cls = _BY_STATUS.get(response.status_code, ServerError)
    raise cls(f"{what}: HTTP {response.status_code}: {message}", response.status_code, info)
