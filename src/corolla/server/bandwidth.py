"""Measure the bandwidth to peers of the swarm over its own transport (hivemind P2P)."""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.protocol.messages import RPC_PING
from corolla.swarm.auth import sign_request

logger = logging.getLogger(__name__)

PAYLOAD_BYTES = 1 << 20  # per call; below hivemind's 4 MiB message limit
ROUNDS = 3


async def measure_bandwidth(p2p: P2P, peers: list[str], *, timeout: float = 10.0) -> float | None:
    """Bytes/s to the first peer that answers a few ``ping`` calls carrying a 1 MiB payload;
    None when no peer answers (the caller then uses a documented default)."""
    payload = runtime_pb2.ExpertRequest(metadata=b"\0" * PAYLOAD_BYTES)
    for peer in peers:
        peer_id = PeerID.from_base58(peer)
        try:
            await _ping(p2p, peer_id, runtime_pb2.ExpertRequest(), timeout)  # connect first, then time
            started = time.perf_counter()
            for _ in range(ROUNDS):
                await _ping(p2p, peer_id, payload, timeout)
            elapsed = time.perf_counter() - started
        except Exception as e:  # an unreachable or old peer: try the next one
            logger.debug("bandwidth probe to ...%s failed: %s", peer[-8:], e)
            continue
        return PAYLOAD_BYTES * ROUNDS / max(elapsed, 1e-6)
    return None


async def _ping(p2p: P2P, peer_id: PeerID, request: runtime_pb2.ExpertRequest, timeout: float) -> None:
    sign_request(request, p2p, peer_id, RPC_PING)  # in a closed swarm: prove the swarm key
    await asyncio.wait_for(
        p2p.call_protobuf_handler(peer_id, RPC_PING, request, runtime_pb2.ExpertResponse), timeout
    )
