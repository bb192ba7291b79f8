"""16 clients generating at once through a two-server swarm: every answer exact, and afterwards the
servers hold no sessions, their cache accounting is back to idle and their memory is back near idle.

"Near idle": the resident memory (RSS) of each server process at most ``RSS_SLACK`` above what it
was after a warm-up generation (once its allocator and compute thread have warmed up). The figures
(throughput, memory before and after) are printed (``-s``) and written to the test's tmp dir."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

CLIENTS = 16
NEW_TOKENS = 64
PROMPT = 8
RSS_SLACK = 64 * 2**20


@pytest.fixture(scope="module")
def load_swarm(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LocalServer]]:
    servers = start_swarm(
        str(tiny_gqa_dir),
        [(0, 3), (3, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "load", "--throughput", "100"],
        log_dir=tmp_path_factory.mktemp("load"),
    )
    yield servers
    stop_all(servers)


def _rss(server: LocalServer) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def _infos(model) -> list:  # type: ignore[no-untyped-def]
    manager = model.manager
    spans = manager.spans(refresh=True)
    infos = [manager.loop.run(call_info(manager.p2p, manager.peer(span)), timeout=30) for span in spans]
    return sorted(infos, key=lambda info: info.start_block)


def _wait_idle(model, idle: list) -> list:  # type: ignore[no-untyped-def]
    """The servers' info once every session is closed and the cache is back to ``idle`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        infos = _infos(model)
        if [(i.active_sessions, i.cache_tokens_left) for i in infos] == [
            (0, i.cache_tokens_left) for i in idle
        ]:
            return infos
        assert time.monotonic() < deadline, f"servers not back to idle: {infos}"
        time.sleep(0.2)


def test_16_concurrent_clients_get_exact_answers_and_the_servers_return_to_idle(
    load_swarm: list[LocalServer], dht_peer: LocalServer, tiny_gqa_dir: Path, local_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 256, (1, PROMPT), generator=generator) for _ in range(CLIENTS)]
    with torch.no_grad():
        expected = [local_model.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False) for p in prompts]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="load"
    )
    try:
        assert len(model.manager.spans(refresh=True)) == 2
        with torch.no_grad():  # warm-up: one generation, then the servers' idle memory
            assert torch.equal(
                model.generate(prompts[0], max_new_tokens=NEW_TOKENS, do_sample=False), expected[0]
            )
        idle = _wait_idle(model, _infos(model))
        idle_rss = [_rss(s) for s in load_swarm]

        results: list[torch.Tensor | None] = [None] * CLIENTS
        failures: list[BaseException] = []
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            try:
                start.wait()
                with torch.no_grad():  # each thread generates in its own inference session
                    results[i] = model.generate(prompts[i], max_new_tokens=NEW_TOKENS, do_sample=False)
            except BaseException as e:  # reported below
                failures.append(e)

        threads = [threading.Thread(target=client, args=(i,), name=f"client{i}") for i in range(CLIENTS)]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        elapsed = time.monotonic() - t0
        assert not failures, failures
        for i in range(CLIENTS):
            assert results[i] is not None and torch.equal(results[i], expected[i]), f"client {i} differs"

        infos = _wait_idle(model, idle)
        gc.collect()
        time.sleep(1.0)  # let the servers drop what the finished streams held
        after_rss = [_rss(s) for s in load_swarm]
        tokens = CLIENTS * NEW_TOKENS
        summary = {
            "clients": CLIENTS,
            "new_tokens_each": NEW_TOKENS,
            "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "idle_rss_mib": [round(r / 2**20, 1) for r in idle_rss],
            "after_rss_mib": [round(r / 2**20, 1) for r in after_rss],
            "cache_tokens_left": [i.cache_tokens_left for i in infos],
        }
        (tmp_path / "load_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nload: {json.dumps(summary)}")
        for server, before, after in zip(load_swarm, idle_rss, after_rss, strict=True):
            assert server.process.poll() is None
            assert after <= before + RSS_SLACK, (
                f"RSS grew from {before / 2**20:.1f} to {after / 2**20:.1f} MiB"
            )
    finally:
        model.manager.shutdown()


def test_a_full_server_makes_new_sessions_wait_then_refuses_and_limits_sessions_per_peer(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path
) -> None:
    """--max_alloc_timeout: a session that does not fit waits for room, then fails with a clear
    error, or opens as soon as another session closes. --max_sessions_per_peer: one peer past its
    limit is refused while another peer still gets a session."""
    from hivemind.p2p import P2P, PeerID

    from corolla.client.transport import EventLoopThread, InferenceStream
    from corolla.errors import AllocationFailed

    (server,) = start_swarm(
        str(tiny_gqa_dir),
        [(0, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=[
            "--dht_prefix",
            "limits",
            "--throughput",
            "100",
            "--attn_cache_tokens",
            "64",
            "--max_alloc_timeout",
            "1.5",
            "--max_sessions_per_peer",
            "2",
        ],  # fmt: skip
        log_dir=tmp_path,
    )
    loop = EventLoopThread.get()
    assert server.maddr is not None
    peer = PeerID.from_base58(server.maddr.rsplit("/", 1)[-1])
    mine = loop.run(P2P.create(initial_peers=[server.maddr]), timeout=60)
    other = loop.run(P2P.create(initial_peers=[server.maddr]), timeout=60)
    hidden = torch.randn(1, 4, 64)

    def open_stream(p2p: P2P, max_length: int) -> InferenceStream:
        stream = InferenceStream(p2p, peer, 0, 6, max_length, 1)
        loop.run(stream.step(hidden, 0, timeout=30, step_id=1), timeout=40)  # the first step opens it
        return stream

    try:
        first = open_stream(mine, 40)  # 40 tokens x 6 blocks of the 64 x 6 budget
        t0 = time.monotonic()
        with pytest.raises(AllocationFailed, match=r"after waiting 1\.5 s, its --max_alloc_timeout"):
            open_stream(mine, 40)
        assert 1.4 <= time.monotonic() - t0 < 10.0  # upper bound loose: a busy CI machine

        threading.Timer(0.5, lambda: loop.run(first.close(), timeout=10)).start()
        t0 = time.monotonic()
        second = open_stream(mine, 40)  # waits until the first one closes
        assert 0.4 <= time.monotonic() - t0 < 6.0  # woken by the close, long before its 40 s

        open_stream(mine, 8)  # this peer's second session
        with pytest.raises(AllocationFailed, match=r"the most its --max_sessions_per_peer 2 allows"):
            open_stream(mine, 8)
        open_stream(other, 8)  # another peer still gets one
        loop.run(second.close(), timeout=10)
    finally:
        for p2p in (mine, other):
            loop.run(p2p.shutdown(), timeout=10)
        server.stop()
