"""A server's weights, cache budget and shutdown, seen from a real client."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.config import ClientConfig
from corolla.errors import AllocationFailed
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from corolla.runtime.loader import parameter_bytes

CACHE_TOKENS = 64  # per block: room for one 40-token session, not for a second one


@pytest.fixture(scope="module")
def half_server(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    servers = start_swarm(
        str(tiny_gqa_dir),
        [(0, 3), (3, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "budget", "--attn_cache_tokens", str(CACHE_TOKENS)],
        log_dir=tmp_path_factory.mktemp("lifecycle"),
    )
    yield servers[0]
    stop_all(servers)


@pytest.fixture(scope="module")
def client(half_server: LocalServer, dht_peer: LocalServer, tiny_gqa_dir: Path):  # type: ignore[no-untyped-def]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="budget"
    )
    yield model
    model.manager.shutdown()


def test_half_the_blocks_report_at_most_60_percent_of_the_weights(client, local_model) -> None:  # type: ignore[no-untyped-def]
    manager = client.manager
    hop = manager.route()[0]
    info = manager.loop.run(call_info(manager.p2p, manager.peer(hop)), timeout=30)
    assert (info.start_block, info.end_block) == (0, 3)
    full = parameter_bytes(local_model)
    assert 0 < info.weight_bytes <= 0.6 * full
    assert info.weight_bytes == parameter_bytes(local_model.model.layers[0:3])


def test_session_over_the_cache_budget_is_refused_and_others_go_on(client, local_model) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = local_model.generate(ids, max_new_tokens=24, do_sample=False)
        with client.inference_session(max_length=40) as first:
            part1 = client.generate(ids, max_new_tokens=12, do_sample=False, session=first)
            with (
                pytest.raises(AllocationFailed, match="attention cache cannot hold"),
                client.inference_session(max_length=40) as second,
            ):
                client.generate(ids, max_new_tokens=4, do_sample=False, session=second)
            part2 = client.generate(ids[:, :0], max_new_tokens=12, do_sample=False, session=first)
    assert torch.equal(torch.cat([part1, part2], dim=1), expected)


def test_sigterm_uncovers_the_blocks_and_exits_within_5_seconds(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path
) -> None:
    (server,) = start_swarm(
        str(tiny_gqa_dir),
        [(0, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "sigterm"],
        log_dir=tmp_path,
    )
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="sigterm"
    )
    try:
        assert [s.peer_id for s in model.manager.spans(refresh=True)] == [model.manager.route()[0].peer_id]
        t0 = time.monotonic()
        server.terminate()
        server.process.wait(timeout=10)
        assert time.monotonic() - t0 <= 5.0
        assert model.manager.spans(refresh=True) == []
        assert "announced blocks 0:6 as OFFLINE" in server.log_path.read_text()
    finally:
        server.stop()
        model.manager.shutdown()


def test_dropped_session_frees_its_cache_and_the_client_recovers_after_the_ban(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path, local_model, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """An idle session is dropped after --step_timeout; the client's next step fails there, the
    server is banned (2 s), and once the ban expires the session is replayed on it again."""
    (server,) = start_swarm(
        str(tiny_gqa_dir),
        [(0, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "idle", "--step_timeout", "1"],
        log_dir=tmp_path,
    )
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="idle",
        client_config=ClientConfig(ban_timeout=2.0),
    )  # fmt: skip
    manager = model.manager
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(6))
    try:
        peer = manager.peer(manager.route()[0])
        idle_budget = manager.loop.run(call_info(manager.p2p, peer), timeout=30).cache_tokens_left
        with torch.no_grad(), model.inference_session(max_length=24) as session:
            first = model.generate(ids, max_new_tokens=4, do_sample=False, session=session)
            assert manager.loop.run(call_info(manager.p2p, peer), timeout=30).cache_tokens_left < idle_budget
            time.sleep(2.5)  # the server drops the idle session and frees its cache
            info = manager.loop.run(call_info(manager.p2p, peer), timeout=30)
            assert (info.cache_tokens_left, info.active_sessions) == (idle_budget, 0)
            t0 = time.monotonic()
            with caplog.at_level("WARNING", logger="corolla.client.manager"):
                second = model.generate(ids[:, :2], max_new_tokens=4, do_sample=False, session=session)
            assert time.monotonic() - t0 >= 1.5  # waited for the ban to expire
        assert re.search(r"failed on blocks 0:6 .*step_timeout.*banned for 2 s", caplog.text)
        with torch.no_grad():
            expected = local_model.generate(
                torch.cat([first, ids[:, :2]], 1), max_new_tokens=4, do_sample=False
            )
        assert torch.equal(second, expected[:, first.shape[1] :])
    finally:
        server.stop()
        manager.shutdown()
