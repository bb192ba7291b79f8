"""Prometheus metrics of one server (``corolla serve --metrics_port N``).

``ServerMetrics`` owns a private ``CollectorRegistry`` (never the process-global one): the
handler counts requests, errors, tokens and step times through it, and the gauges that mirror
the server's state (sessions, cache budget, span, throughput) are read at scrape time from a
``MetricsState`` callback. Without ``--metrics_port`` the object exists but is never exported.

Every name starts with ``corolla_server_``:

- ``requests_total{rpc}``: RPCs received (rpc: info, forward, inference, push, ping); for
  ``inference`` one per inference stream, i.e. per session a client asks to open
- ``inference_steps_total``: inference steps run (a step pushed and also sent by the client
  runs, and counts, once)
- ``errors_total{rpc,kind}``: requests answered with an error; kind is the error class
  (``BadRequest``, ``AllocationFailed``, ``ServerUnavailable``, ...), ``timeout`` or ``InternalError``
- ``tokens_total{rpc}``: tokens (batch x length) run through the blocks by forward / inference
- ``step_seconds{rpc}``: compute time of one forward pass or one inference step
- ``active_sessions``, ``cache_tokens_used``, ``cache_tokens_free``: open inference sessions and
  the attention-cache budget, in token-blocks (tokens x blocks) as ``CacheBudget`` counts them
- ``blocks_served`` (0 while loading or moving), ``block_start``, ``block_end``,
  ``span_info{start,end,dtype,quant_type}`` (value 1; the last three only while a span is hosted)
- ``throughput_tokens_per_second``: the throughput this server announces
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corolla.errors import ConfigError, CorollaError

logger = logging.getLogger(__name__)

PREFIX = "corolla_server"
RPCS = ("info", "forward", "inference", "backward", "push", "ping")
COMPUTE_RPCS = ("forward", "inference", "backward")
# compute time of one step: 1 ms (a token on a small span) .. 30 s (a long prompt on a slow CPU)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricsState:
    """What the state gauges show at one scrape; the defaults are a server hosting nothing."""

    active_sessions: int = 0
    cache_tokens_used: int = 0
    cache_tokens_free: int = 0
    span: tuple[int, int] | None = None  # None while loading or moving
    dtype: str = ""
    quant_type: str = ""
    throughput: float = 0.0


def error_kind(error: BaseException) -> str:
    """The ``kind`` label of an error: its class name for ours, ``timeout``, or ``InternalError``
    (as the peer is told in ``Reply.error.kind``)."""
    if isinstance(error, CorollaError):
        return type(error).__name__
    if isinstance(error, TimeoutError):
        return "timeout"
    return "InternalError"


class ServerMetrics:
    """Counters and histograms the handler updates, and gauges read from ``watch``'s callback."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "RPCs received", ["rpc"], registry=r)
        self.inference_steps = Counter(f"{PREFIX}_inference_steps", "inference steps run", registry=r)
        self.errors = Counter(
            f"{PREFIX}_errors", "requests answered with an error, by error class", ["rpc", "kind"], registry=r
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens", "tokens (batch x length) run through the blocks", ["rpc"], registry=r
        )
        self.step_seconds = Histogram(
            f"{PREFIX}_step_seconds",
            "compute time of one forward pass or one inference step",
            ["rpc"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        for rpc in RPCS:  # every series exists (at 0) before the first request
            self.requests.labels(rpc)
        for rpc in COMPUTE_RPCS:
            self.tokens.labels(rpc)
            self.step_seconds.labels(rpc)
        self._state: Callable[[], MetricsState] = MetricsState
        r.register(_StateCollector(lambda: self._state()))

    def watch(self, state: Callable[[], MetricsState]) -> None:
        """Read the state gauges from ``state()`` at each scrape (it runs in the HTTP thread)."""
        self._state = state

    def request(self, rpc: str) -> None:
        self.requests.labels(rpc).inc()

    def error(self, rpc: str, error: BaseException) -> None:
        self.errors.labels(rpc, error_kind(error)).inc()

    @contextmanager
    def measure(self, rpc: str, tokens: int) -> Iterator[None]:
        """Time the compute of one step; counted (tokens, time, inference steps) only if it succeeds."""
        t0 = time.perf_counter()
        yield
        self.step_seconds.labels(rpc).observe(time.perf_counter() - t0)
        self.tokens.labels(rpc).inc(tokens)
        if rpc == "inference":
            self.inference_steps.inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's current value (``name`` without the prefix), as a scrape would show it."""
        return self.registry.get_sample_value(f"{PREFIX}_{name}", labels or {})


class _StateCollector(Collector):
    """The gauges that mirror the server's state, computed at scrape time."""

    def __init__(self, state: Callable[[], MetricsState]) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return self._families(MetricsState(span=(0, 0)))

    def collect(self) -> Iterable[Metric]:
        try:
            state = self.state()
        except Exception as e:  # a scrape must not fail because the server is changing state
            logger.debug("metrics state unavailable: %s", e)
            state = MetricsState()
        return self._families(state)

    @staticmethod
    def _families(state: MetricsState) -> list[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        span = state.span
        families: list[Metric] = [
            gauge("active_sessions", "open inference sessions", state.active_sessions),
            gauge(
                "cache_tokens_used",
                "attention-cache budget reserved by sessions, in token-blocks (tokens x blocks)",
                state.cache_tokens_used,
            ),
            gauge(
                "cache_tokens_free",
                "attention-cache budget free, in token-blocks (tokens x blocks)",
                state.cache_tokens_free,
            ),
            gauge(
                "blocks_served", "blocks hosted (0 while loading or moving)", span[1] - span[0] if span else 0
            ),
            gauge("throughput_tokens_per_second", "throughput this server announces", state.throughput),
        ]
        if span is not None:
            families.append(gauge("block_start", "first hosted block", span[0]))
            families.append(gauge("block_end", "end of the hosted span (exclusive)", span[1]))
            info = GaugeMetricFamily(
                f"{PREFIX}_span_info",
                "the hosted span (value 1)",
                labels=["start", "end", "dtype", "quant_type"],
            )
            info.add_metric([str(span[0]), str(span[1]), state.dtype, state.quant_type], 1)
            families.append(info)
        return families


def metrics_host(listen_maddrs: Iterable[str]) -> str:
    """Where the metrics endpoint binds: ``::`` when the server listens on IPv6 only, else ``0.0.0.0``."""
    maddrs = list(listen_maddrs)
    if maddrs and all(m.startswith("/ip6/") for m in maddrs):
        return "::"
    return "0.0.0.0"


def start_metrics_server(metrics: ServerMetrics, port: int, host: str) -> WSGIServer:
    """Serve ``metrics`` on ``http://host:port/metrics`` from a daemon thread; ``ConfigError`` when
    the port cannot be bound. Stop it with ``stop_metrics_server``."""
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(
            f"--metrics_port {port}: cannot listen on {host}:{port} ({reason}); pick another --metrics_port"
        ) from None
    shown = f"[{host}]" if ":" in host else host
    logger.info("metrics on http://%s:%d/metrics", shown, port)
    return httpd


def stop_metrics_server(httpd: WSGIServer) -> None:
    httpd.shutdown()
    httpd.server_close()
