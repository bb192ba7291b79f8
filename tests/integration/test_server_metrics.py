"""``corolla serve --metrics_port``: a real server's Prometheus endpoint, before and after real traffic."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from corolla import AutoDistributedModelForCausalLM
from corolla.lab.local_swarm import LocalServer, server_args, start_swarm, stop_all

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"corolla_server_{name}", frozenset(labels.items()))]


@pytest.fixture(scope="module")
def metrics_server(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalServer, int]]:
    port = free_port()
    servers = start_swarm(
        str(tiny_gqa_dir),
        [(0, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "metrics", "--metrics_port", str(port)],
        log_dir=tmp_path_factory.mktemp("metrics"),
    )
    yield servers[0], port
    stop_all(servers)


def test_metrics_follow_forward_and_inference_traffic(
    metrics_server: tuple[LocalServer, int], dht_peer: LocalServer, tiny_gqa_dir: Path
) -> None:
    server, port = metrics_server
    assert f"metrics on http://0.0.0.0:{port}/metrics" in server.log_path.read_text()
    before = scrape(port)
    assert get(before, "blocks_served") == 6
    assert (get(before, "block_start"), get(before, "block_end")) == (0, 6)
    assert get(before, "span_info", start="0", end="6", dtype="float32", quant_type="none") == 1
    assert get(before, "active_sessions") == 0
    assert get(before, "cache_tokens_used") == 0
    idle_free = get(before, "cache_tokens_free")
    assert idle_free == 16384 * 6  # --attn_cache_tokens (default) x blocks, in token-blocks
    assert get(before, "throughput_tokens_per_second") > 0
    assert get(before, "requests_total", rpc="forward") == 0

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="metrics"
    )
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    try:
        with torch.no_grad():
            model(ids)  # one forward pass: 6 tokens
            with model.inference_session(max_length=32) as session:
                model.generate(ids, max_new_tokens=4, do_sample=False, session=session)
                during = scrape(port)
    finally:
        model.manager.shutdown()

    assert get(during, "active_sessions") == 1
    assert get(during, "cache_tokens_used") == 32 * 6
    assert get(during, "cache_tokens_free") == idle_free - 32 * 6

    after = scrape(port)
    assert get(after, "requests_total", rpc="forward") > get(before, "requests_total", rpc="forward")
    assert get(after, "requests_total", rpc="inference") > get(before, "requests_total", rpc="inference")
    assert get(after, "inference_steps_total") >= 4  # the prompt, then one step per new token after the first
    assert get(after, "tokens_total", rpc="forward") >= 6
    assert get(after, "tokens_total", rpc="inference") >= 6 + 3
    assert get(after, "step_seconds_count", rpc="forward") >= 1
    assert get(after, "step_seconds_count", rpc="inference") == get(after, "inference_steps_total")
    assert get(after, "step_seconds_sum", rpc="inference") > 0
    assert get(after, "blocks_served") == 6

    deadline = time.monotonic() + 5
    while get(after, "active_sessions") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape(port)
    assert get(after, "active_sessions") == 0
    assert get(after, "cache_tokens_used") == 0
    assert get(after, "cache_tokens_free") == idle_free


def test_a_metrics_port_in_use_is_refused_before_loading(
    metrics_server: tuple[LocalServer, int], dht_peer: LocalServer, tiny_gqa_dir: Path, tmp_path: Path
) -> None:
    _, busy_port = metrics_server  # the first server holds it
    args = server_args(
        str(tiny_gqa_dir), (0, 6), "/ip4/127.0.0.1/tcp/0", [dht_peer.maddr or ""],
        ["--dht_prefix", "metrics-busy", "--metrics_port", str(busy_port)],
    )  # fmt: skip
    second = LocalServer(args, log_dir=tmp_path, name="busy")
    try:
        assert second.process.wait(timeout=60) == 2
    finally:
        second.stop()
    log = second.log_path.read_text()
    assert f"corolla serve: error: --metrics_port {busy_port}: cannot listen" in log
    assert "pick another --metrics_port" in log
    assert "loading blocks" not in log and "Traceback" not in log
