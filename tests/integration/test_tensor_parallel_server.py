"""A server that splits every block over two shards (``--tensor_parallel_devices cpu cpu``)
gives what an unsharded server gives, through a real swarm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

NUM_BLOCKS = 6  # tiny_gqa_dir


@pytest.fixture(scope="module")
def swarm(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("tp")
    peers = [dht_peer.maddr or ""]
    servers: list[LocalServer] = []
    try:
        servers += start_swarm(
            str(tiny_gqa_dir), [(0, NUM_BLOCKS)], initial_peers=peers, log_dir=log_dir,
            extra_args=["--dht_prefix", "plain"],
        )  # fmt: skip
        servers += start_swarm(
            str(tiny_gqa_dir), [(0, NUM_BLOCKS)], initial_peers=peers, log_dir=log_dir,
            extra_args=["--dht_prefix", "sharded", "--tensor_parallel_devices", "cpu", "cpu"],
        )  # fmt: skip
        yield peers[0]
    finally:
        stop_all(servers)


@pytest.fixture(scope="module")
def clients(swarm: str, tiny_gqa_dir: Path):  # type: ignore[no-untyped-def]
    made = [
        AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_gqa_dir), initial_peers=[swarm], dht_prefix=prefix
        )
        for prefix in ("plain", "sharded")
    ]
    yield made
    for model in made:
        model.manager.shutdown()


def test_the_sharded_server_says_so(clients) -> None:  # type: ignore[no-untyped-def]
    manager = clients[1].manager
    hop = manager.route(0, NUM_BLOCKS)[0]
    info = manager.loop.run(call_info(manager.p2p, manager.peer(hop)), timeout=30)
    assert info.tensor_parallel_devices == ["cpu", "cpu"]
    assert [s.info.tensor_parallel for s in manager.spans()] == [2]


def test_sharded_logits_match_the_unsharded_server(clients) -> None:  # type: ignore[no-untyped-def]
    plain, sharded = clients
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (plain(ids).logits - sharded(ids).logits).abs().max().item() <= 1e-4


def test_sharded_greedy_session_matches_the_unsharded_server(clients) -> None:  # type: ignore[no-untyped-def]
    plain, sharded = clients
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = plain.generate(ids, max_new_tokens=16, do_sample=False)
        got = sharded.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)
