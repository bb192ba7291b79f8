from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterable

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import DynamicCache

from corolla.config import LimitsConfig, ServerConfig
from corolla.errors import AllocationFailed, BadRequest, ConfigError, ServerUnavailable
from corolla.protocol import codec
from corolla.protocol.messages import (
    ForwardRequest,
    InferenceOpen,
    InferenceStep,
    Reply,
    ServerInfoRequest,
    decode,
    encode,
)
from corolla.runtime.kv_cache import CacheBudget
from corolla.server.handler import Handler, Hosting, Request
from corolla.server.metrics import (
    STEP_BUCKETS,
    MetricsState,
    ServerMetrics,
    metrics_host,
    start_metrics_server,
    stop_metrics_server,
)
from corolla.server.sessions import SessionTable

HIDDEN = 8


def test_every_request_series_exists_at_zero_before_traffic() -> None:
    m = ServerMetrics()
    for rpc in ("info", "forward", "inference", "push", "ping"):
        assert m.value("requests_total", {"rpc": rpc}) == 0
    for rpc in ("forward", "inference"):
        assert m.value("tokens_total", {"rpc": rpc}) == 0
        assert m.value("step_seconds_count", {"rpc": rpc}) == 0
    assert m.value("inference_steps_total") == 0


def test_requests_and_errors_are_counted_by_rpc_and_kind() -> None:
    m = ServerMetrics()
    m.request("forward")
    m.request("forward")
    m.request("ping")
    m.error("forward", BadRequest("x"))
    m.error("inference", AllocationFailed("x"))
    m.error("inference", AllocationFailed("y"))
    m.error("forward", TimeoutError())
    m.error("info", ValueError("a bug"))
    assert m.value("requests_total", {"rpc": "forward"}) == 2
    assert m.value("requests_total", {"rpc": "ping"}) == 1
    assert m.value("requests_total", {"rpc": "info"}) == 0
    assert m.value("errors_total", {"rpc": "forward", "kind": "BadRequest"}) == 1
    assert m.value("errors_total", {"rpc": "inference", "kind": "AllocationFailed"}) == 2
    assert m.value("errors_total", {"rpc": "forward", "kind": "timeout"}) == 1
    assert m.value("errors_total", {"rpc": "info", "kind": "InternalError"}) == 1


def test_measure_counts_tokens_time_and_inference_steps() -> None:
    m = ServerMetrics()
    with m.measure("forward", tokens=12):
        pass
    with m.measure("inference", tokens=5):
        pass
    with m.measure("inference", tokens=1):
        pass
    assert m.value("tokens_total", {"rpc": "forward"}) == 12
    assert m.value("tokens_total", {"rpc": "inference"}) == 6
    assert m.value("step_seconds_count", {"rpc": "forward"}) == 1
    assert m.value("step_seconds_count", {"rpc": "inference"}) == 2
    assert m.value("inference_steps_total") == 2
    # an empty block takes far less than the smallest bucket (1 ms)
    assert m.value("step_seconds_bucket", {"rpc": "inference", "le": "0.001"}) == 2
    assert 0 <= m.value("step_seconds_sum", {"rpc": "inference"}) < 0.002  # type: ignore[operator]


def test_a_failed_step_is_not_measured() -> None:
    m = ServerMetrics()
    with pytest.raises(RuntimeError), m.measure("inference", tokens=7):
        raise RuntimeError("boom")
    assert m.value("tokens_total", {"rpc": "inference"}) == 0
    assert m.value("step_seconds_count", {"rpc": "inference"}) == 0
    assert m.value("inference_steps_total") == 0


def test_histogram_buckets_span_1ms_to_30s() -> None:
    assert STEP_BUCKETS[0] == 0.001 and STEP_BUCKETS[-1] == 30.0
    assert list(STEP_BUCKETS) == sorted(STEP_BUCKETS)
    m = ServerMetrics()
    m.step_seconds.labels("forward").observe(3.0)
    assert m.value("step_seconds_bucket", {"rpc": "forward", "le": "2.5"}) == 0
    assert m.value("step_seconds_bucket", {"rpc": "forward", "le": "5.0"}) == 1


def test_state_gauges_without_a_span() -> None:
    m = ServerMetrics()
    assert m.value("blocks_served") == 0
    assert m.value("active_sessions") == 0
    assert m.value("block_start") is None
    assert m.value("span_info", {"start": "0", "end": "0", "dtype": "", "quant_type": ""}) is None
    m.watch(lambda: MetricsState(throughput=42.5))
    assert m.value("throughput_tokens_per_second") == 42.5
    assert m.value("blocks_served") == 0


def test_state_gauges_are_read_at_each_scrape() -> None:
    m = ServerMetrics()
    state = MetricsState(
        active_sessions=2,
        cache_tokens_used=96,
        cache_tokens_free=288,
        span=(3, 9),
        dtype="float32",
        quant_type="none",
        throughput=123.0,
    )
    m.watch(lambda: state)
    assert m.value("active_sessions") == 2
    assert m.value("cache_tokens_used") == 96
    assert m.value("cache_tokens_free") == 288
    assert m.value("blocks_served") == 6
    assert m.value("block_start") == 3
    assert m.value("block_end") == 9
    assert m.value("throughput_tokens_per_second") == 123.0
    labels = {"start": "3", "end": "9", "dtype": "float32", "quant_type": "none"}
    assert m.value("span_info", labels) == 1
    state = MetricsState(active_sessions=0, span=None, throughput=123.0)  # moving
    assert m.value("blocks_served") == 0
    assert m.value("block_start") is None
    assert m.value("span_info", labels) is None


def test_a_failing_state_callback_shows_an_idle_server() -> None:
    m = ServerMetrics()

    def broken() -> MetricsState:
        raise RuntimeError("changing")

    m.watch(broken)
    assert m.value("blocks_served") == 0


def test_registries_are_private() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.request("ping")
    assert a.value("requests_total", {"rpc": "ping"}) == 1
    assert b.value("requests_total", {"rpc": "ping"}) == 0
    assert REGISTRY.get_sample_value("corolla_server_requests_total", {"rpc": "ping"}) is None


def test_metrics_host_follows_the_listen_family() -> None:
    assert metrics_host(["/ip4/0.0.0.0/tcp/0"]) == "0.0.0.0"
    assert metrics_host(["/ip4/127.0.0.1/tcp/0", "/ip6/::/tcp/0"]) == "0.0.0.0"
    assert metrics_host(["/ip6/::/tcp/0"]) == "::"
    assert metrics_host([]) == "0.0.0.0"


def test_metrics_port_flag() -> None:
    from corolla.cli.args import parse_server_args

    assert parse_server_args([]).metrics_port is None
    assert parse_server_args(["--metrics_port", "9400"]).metrics_port == 9400
    with pytest.raises(ConfigError, match="--metrics_port must be"):
        ServerConfig(metrics_port=70000)
    with pytest.raises(ConfigError, match="--metrics_port must be between 1 and 65535, got 0"):
        ServerConfig(metrics_port=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_endpoint_serves_the_registry(caplog: pytest.LogCaptureFixture) -> None:
    m = ServerMetrics()
    m.request("info")
    port = _free_port()
    caplog.set_level("INFO", logger="corolla.server.metrics")
    httpd = start_metrics_server(m, port, "0.0.0.0")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        stop_metrics_server(httpd)
    assert 'corolla_server_requests_total{rpc="info"} 1.0' in text
    assert "corolla_server_blocks_served 0.0" in text
    assert f"metrics on http://0.0.0.0:{port}/metrics" in caplog.text


def test_a_port_in_use_is_refused_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="pick another --metrics_port") as info:
            start_metrics_server(ServerMetrics(), port, "0.0.0.0")
    assert "\n" not in str(info.value)
    assert f"--metrics_port {port}" in str(info.value)


# --- the handler's calls, with a stand-in backend -----------------------------------------------


class FakeBackend:
    def __init__(self, start: int = 0, end: int = 4, delay: float = 0.0) -> None:
        self.start, self.end, self.delay = start, end, delay
        self.dtype, self.quant_type = torch.float32, "none"

    async def run(
        self, hidden: torch.Tensor, start: int, end: int, cache: object = None, **kwargs: object
    ) -> torch.Tensor:
        await asyncio.sleep(self.delay)
        return hidden + 1

    def new_cache(self, max_length: int | None = None) -> DynamicCache:
        return DynamicCache()

    def crop(self, cache: object, position: int) -> None:
        pass


def make_handler(backend: FakeBackend | None = None, **limits: float) -> tuple[Handler, ServerMetrics]:
    metrics = ServerMetrics()
    handler = Handler(LimitsConfig(**limits), dht_prefix="t", hidden_size=HIDDEN, metrics=metrics)  # type: ignore[arg-type]
    if backend is not None:
        handler.hosting = Hosting(backend, SessionTable(CacheBudget(1000)))  # type: ignore[arg-type]
    return handler, metrics


async def _stream(items: Iterable[Request]) -> AsyncIterator[Request]:
    for item in items:
        yield item


async def _collect(responses: AsyncIterator) -> list[Reply]:  # type: ignore[type-arg]
    return [decode(Reply, r.metadata) async for r in responses]


def _hidden(batch: int, seq: int) -> list:  # type: ignore[type-arg]
    return [codec.pack(torch.zeros(batch, seq, HIDDEN))]


def test_handler_without_metrics_still_works() -> None:
    handler = Handler(LimitsConfig(), dht_prefix="t", hidden_size=HIDDEN)
    asyncio.run(handler.rpc_ping(Request(), None))  # type: ignore[arg-type]
    assert handler.metrics.value("requests_total", {"rpc": "ping"}) == 1


def test_handler_counts_info_refusals_while_loading() -> None:
    handler, m = make_handler()
    asyncio.run(handler.rpc_info(Request(metadata=encode(ServerInfoRequest())), None))  # type: ignore[arg-type]
    assert m.value("requests_total", {"rpc": "info"}) == 1
    assert m.value("errors_total", {"rpc": "info", "kind": "ServerUnavailable"}) == 1


def test_handler_measures_a_forward_and_counts_its_errors() -> None:
    handler, m = make_handler(FakeBackend())
    ok = Request(metadata=encode(ForwardRequest(start=0, end=4)), tensors=_hidden(2, 3))
    outside = Request(metadata=encode(ForwardRequest(start=2, end=6)), tensors=_hidden(1, 1))
    assert asyncio.run(_collect(handler.rpc_forward(_stream([ok]), None)))[0].error is None  # type: ignore[arg-type]
    assert asyncio.run(_collect(handler.rpc_forward(_stream([outside]), None)))[0].error is not None  # type: ignore[arg-type]
    assert m.value("requests_total", {"rpc": "forward"}) == 2
    assert m.value("tokens_total", {"rpc": "forward"}) == 6
    assert m.value("step_seconds_count", {"rpc": "forward"}) == 1
    assert m.value("errors_total", {"rpc": "forward", "kind": "BadRequest"}) == 1


def test_handler_counts_a_forward_timeout() -> None:
    handler, m = make_handler(FakeBackend(delay=0.5), request_timeout=0.05)
    req = Request(metadata=encode(ForwardRequest(start=0, end=4)), tensors=_hidden(1, 2))
    (reply,) = asyncio.run(_collect(handler.rpc_forward(_stream([req]), None)))  # type: ignore[arg-type]
    assert reply.error is not None
    assert m.value("errors_total", {"rpc": "forward", "kind": "timeout"}) == 1
    assert m.value("step_seconds_count", {"rpc": "forward"}) == 0


def test_handler_measures_inference_steps() -> None:
    handler, m = make_handler(FakeBackend())
    opening = InferenceStep(position=0, step_id=1, open=InferenceOpen(start=0, end=4, max_length=16))
    steps = [
        Request(metadata=encode(opening), tensors=_hidden(1, 5)),
        Request(metadata=encode(InferenceStep(position=5, step_id=2)), tensors=_hidden(1, 1)),
        Request(metadata=encode(InferenceStep(position=6, step_id=3)), tensors=_hidden(1, 1)),
    ]
    replies = asyncio.run(_collect(handler.rpc_inference(_stream(steps), None)))  # type: ignore[arg-type]
    assert [r.error for r in replies] == [None, None, None]
    assert m.value("requests_total", {"rpc": "inference"}) == 1
    assert m.value("inference_steps_total") == 3
    assert m.value("tokens_total", {"rpc": "inference"}) == 7
    assert m.value("step_seconds_count", {"rpc": "inference"}) == 3
    assert len(handler.hosting.sessions) == 0  # type: ignore[union-attr]


def test_handler_counts_a_refused_session() -> None:
    handler, m = make_handler(FakeBackend())
    # 300 tokens x 4 blocks: more than the 1000 token-blocks of the budget
    too_long = InferenceStep(position=0, open=InferenceOpen(start=0, end=4, max_length=300))
    (reply,) = asyncio.run(
        _collect(handler.rpc_inference(_stream([Request(metadata=encode(too_long))]), None))  # type: ignore[arg-type]
    )
    assert reply.error is not None
    assert m.value("requests_total", {"rpc": "inference"}) == 1
    assert m.value("errors_total", {"rpc": "inference", "kind": "AllocationFailed"}) == 1
    assert m.value("inference_steps_total") == 0


def test_error_kinds_match_the_reply_kind() -> None:
    from corolla.server.handler import error_response

    for error in (BadRequest("x"), ServerUnavailable("y"), AllocationFailed("z")):
        kind = decode(Reply, error_response(error).metadata).error.kind  # type: ignore[union-attr]
        m = ServerMetrics()
        m.error("forward", error)
        assert m.value("errors_total", {"rpc": "forward", "kind": kind}) == 1
