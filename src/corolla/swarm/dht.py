"""Starting a DHT peer from a ``NetworkConfig``."""

from __future__ import annotations

import logging

from hivemind import DHT

from corolla.config import NetworkConfig
from corolla.errors import SwarmUnavailable

logger = logging.getLogger(__name__)


def start_dht(network: NetworkConfig, *, client_mode: bool = False, num_workers: int = 4) -> DHT:
    """Start (or join) a swarm; ``SwarmUnavailable`` with a one-line reason when that fails."""
    try:
        return DHT(
            initial_peers=list(network.initial_peers),
            start=True,
            num_workers=num_workers,
            shutdown_timeout=1.0,
            host_maddrs=network.listen_maddrs(),
            announce_maddrs=network.public_maddrs() or None,
            identity_path=network.identity_path,
            client_mode=client_mode,
            use_relay=False,
            use_auto_relay=False,
        )
    except Exception as e:  # hivemind raises P2PDaemonError, ValueError for bad multiaddrs, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        hint = (
            "check that --initial_peers are full multiaddrs (/ip4/ADDR/tcp/PORT/p2p/PEER_ID) of running peers"
            if network.initial_peers
            else "check --host_maddrs/--port and --identity_path"
        )
        raise SwarmUnavailable(f"could not start the DHT peer: {reason}; {hint}") from None


def visible_maddrs(dht: DHT) -> list[str]:
    """Multiaddrs others can use to reach this peer, loopback last (most useful first)."""
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    return sorted(maddrs, key=lambda m: ("/ip4/127." in m or "/ip6/::1/" in m, m))
