"""Prometheus metrics of one server, and the ASGI middleware that records requests.

Requests are labelled by route template (``/v1/models/{version}/predict``), never by raw
path, so that the series stay few whatever clients send. Every response with status
>= 400 also counts under an error kind named for its status.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedfuse.serving.quality import QualityMonitor

ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media",
               422: "invalid_input", 429: "rate_limited", 500: "internal",
               503: "unavailable"}

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

disable_created_metrics()  # no *_created series: they double the output for no use here


class ServeMetrics:
    """The server's metric families, in a registry of their own; with a
    ``multiprocess_dir`` (``serve --workers``), every worker's series are summed when
    exposed (Prometheus's multiprocess mode; its gauges take the workers' largest or
    most recent value)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fedfuse_http_requests_total", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("fedfuse_http_request_duration_seconds",
                                 "Time from request to the end of the response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("fedfuse_http_errors_total", "Responses with status >= 400",
                              ["kind"], registry=r)
        self.request_instances = Histogram("fedfuse_request_instances",
                                           "Instances per predict request",
                                           buckets=SIZE_BUCKETS, registry=r)
        self.batch_rows = Histogram("fedfuse_batch_rows", "Rows per forward pass",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("fedfuse_batch_requests",
                                        "Requests coalesced into one forward pass",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.models = Gauge("fedfuse_model_versions_loaded", "Model versions being served",
                            registry=r, multiprocess_mode="max")
        self.quality = QualityMonitor(r)
        """Each version's predicted classes, confidence and input drift."""

    def exposition(self) -> bytes:
        """The Prometheus text of every series (of every worker)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        summed = CollectorRegistry()
        MultiProcessCollector(summed, path=self.multiprocess_dir)
        return generate_latest(summed)

    def observe_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self._route_of(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(ERROR_KINDS.get(status, f"http_{status}")).inc()

    def _route_of(self, scope: Scope) -> str:
        """The template of the route that answered, or would have answered a request
        refused before routing (401, 413, 429)."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes
                          if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"
