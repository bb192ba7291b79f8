"""Prometheus metrics of the API, on their own registry (several apps may live in one process).

``MetricsMiddleware`` counts every HTTP request by endpoint and status and times it (a streamed
answer is timed to its last byte); the app adds tokens and time to first token per generation."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ApiMetrics:
    """The API's metrics; ``registry`` is what ``/metrics`` and the metrics port expose."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "corolla_api_requests", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "corolla_api_request_duration_seconds", "time to answer a request (streams: to the last byte)",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "corolla_api_time_to_first_token_seconds", "time from a generation request to its first text",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "corolla_api_generated_tokens", "tokens generated (completion tokens)", registry=r
        )
        self.prompt_tokens = Counter("corolla_api_prompt_tokens", "prompt tokens processed", registry=r)
        self.active = Gauge(
            "corolla_api_active_requests", "generation requests in progress (chat and text completions)",
            registry=r,
        )  # fmt: skip

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose the metrics at ``http://HOST:PORT/metrics`` from a background thread."""
        start_http_server(port, addr=host, registry=self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by the route it matched."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless the app says otherwise
        generation = scope.get("path") in GENERATION_PATHS
        started = time.perf_counter()

        async def send_and_see(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        if generation:
            self.metrics.active.inc()
        try:
            await self.app(scope, receive, send_and_see)
        finally:
            if generation:
                self.metrics.active.dec()
            endpoint = endpoint_label(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def endpoint_label(scope: dict[str, Any]) -> str:
    """The path of the route a request matched (``/static`` for any static file); ``other`` when
    none did, so unknown paths cannot grow the label set."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "other"
