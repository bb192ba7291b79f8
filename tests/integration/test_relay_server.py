"""A server behind a delaying relay, found through the DHT: peers really pay the delay.

The server listens on port P and announces only the relay's port R (``--announce_maddrs``); a
client that knows just the bootstrap peer finds the server's record in the DHT, dials it by peer
id, and its libp2p daemon must reach it through R."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.config import NetworkConfig
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from corolla.lab.relay import DelayRelay, start_delayed_server
from corolla.protocol.messages import RPC_PING
from corolla.swarm.dht import start_dht
from corolla.swarm.registry import fetch_block_records
from corolla.swarm.spans import spans_from_records

DELAY = 0.05
PREFIX = "relayed"
PINGS = 5
NUM_BLOCKS = 6  # tiny_gqa_dir


def _peer_id(maddr: str | None) -> str:
    assert maddr is not None and "/p2p/" in maddr
    return maddr.rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def swarm(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalServer, DelayRelay, LocalServer]]:
    """The same span twice: one server behind a 50 ms relay, one on plain loopback."""
    log_dir = tmp_path_factory.mktemp("relay")
    args = ["--dht_prefix", PREFIX, "--throughput", "1"]
    peers = [dht_peer.maddr or ""]
    far, relay = start_delayed_server(
        str(tiny_gqa_dir), (0, NUM_BLOCKS), DELAY, initial_peers=peers, extra_args=args, log_dir=log_dir
    )
    near: list[LocalServer] = []
    try:
        near = start_swarm(
            str(tiny_gqa_dir), [(0, NUM_BLOCKS)], initial_peers=peers, extra_args=args, log_dir=log_dir
        )
        yield far, relay, near[0]
    finally:
        stop_all([far, *near])
        relay.stop()


@pytest.fixture(scope="module")
def client_dht(dht_peer: LocalServer) -> Iterator[DHT]:
    dht = start_dht(NetworkConfig(initial_peers=(dht_peer.maddr or "",)), client_mode=True)
    yield dht
    dht.shutdown()


async def _ping_rtts(p2p: P2P, peer: str) -> list[float]:
    """Round trips of ``corolla.ping`` after a first call that sets up the connection."""
    peer_id = PeerID.from_base58(peer)
    rtts = []
    for _ in range(PINGS + 1):
        started = time.perf_counter()
        await asyncio.wait_for(
            p2p.call_protobuf_handler(
                peer_id, RPC_PING, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
            ),
            timeout=30,
        )
        rtts.append(time.perf_counter() - started)
    return rtts[1:]


async def _measure(dht: DHT, peers: list[str]) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Ping RTTs per peer, and the addresses of this client's connections to each."""
    p2p = await dht.replicate_p2p()
    try:
        rtts = {peer: await _ping_rtts(p2p, peer) for peer in peers}
        connected = {
            info.peer_id.to_base58(): [str(a) for a in info.addrs] for info in await p2p.list_peers()
        }
    finally:
        await p2p.shutdown()
    return rtts, {peer: connected.get(peer, []) for peer in peers}


def test_the_server_announces_the_relay_address(swarm: tuple[LocalServer, DelayRelay, LocalServer]) -> None:
    far, relay, _ = swarm
    assert far.maddr == f"{relay.maddr}/p2p/{_peer_id(far.maddr)}"


def test_peers_found_through_the_dht_are_reached_through_the_delay(
    swarm: tuple[LocalServer, DelayRelay, LocalServer], client_dht: DHT
) -> None:
    far, relay, near = swarm
    far_id, near_id = _peer_id(far.maddr), _peer_id(near.maddr)
    spans = spans_from_records(fetch_block_records(client_dht, PREFIX, NUM_BLOCKS))
    assert {s.peer_id for s in spans} == {far_id, near_id}  # the client knows them from the DHT only

    rtts, addrs = asyncio.run(_measure(client_dht, [far_id, near_id]))

    assert addrs[far_id] == [relay.maddr], f"the client's connection bypasses the relay: {addrs[far_id]}"
    assert relay.accepted >= 1
    assert min(rtts[far_id]) >= 2 * DELAY * 0.9, rtts
    assert statistics.median(rtts[near_id]) < statistics.median(rtts[far_id]) / 2, rtts
