from __future__ import annotations

import pytest
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from corolla.swarm.maddrs import circuit_addrs, daemon_maddr, is_relayed, peer_of

RELAY = "QmTMJfP82ZeqNk92Re9wqootgDe7pAgYWXSHTEZCAvkpEa"
PEER = "12D3KooWC1yEuCE348P26J9XekEhqPMQAn2oeJvDmZz6JbM8V9hd"


def test_plain_addresses_are_unchanged() -> None:
    assert (
        daemon_maddr("/ip4/10.0.0.1/tcp/31337").to_bytes() == Multiaddr("/ip4/10.0.0.1/tcp/31337").to_bytes()
    )


def test_a_p2p_part_is_a_length_prefixed_multihash_as_the_daemon_reads_it() -> None:
    relay = PeerID.from_base58(RELAY).to_bytes()
    encoded = daemon_maddr(f"/ip4/10.0.0.1/tcp/31000/p2p/{RELAY}/p2p-circuit").to_bytes()
    head = Multiaddr("/ip4/10.0.0.1/tcp/31000").to_bytes()
    # 421 = 0xa5 0x03 (p2p), one length byte, the multihash, then 290 = 0xa2 0x02 (p2p-circuit)
    assert encoded == head + b"\xa5\x03" + bytes([len(relay)]) + relay + b"\xa2\x02"


def test_a_full_circuit_address_to_a_peer() -> None:
    encoded = daemon_maddr(f"/ip4/10.0.0.1/tcp/31000/p2p/{RELAY}/p2p-circuit/p2p/{PEER}").to_bytes()
    assert encoded.endswith(PeerID.from_base58(PEER).to_bytes())


@pytest.mark.parametrize(
    "text", ["", "ip4/1.2.3.4", "/ip4/1.2.3.4/", "/ip4/300.1.1.1/tcp/1", "/p2p/notapeer"]
)
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(Exception):  # noqa: B017  (ValueError or the multiaddr library's own errors)
        daemon_maddr(text)


def test_circuit_addresses_come_from_full_relay_multiaddrs_only() -> None:
    relays = [
        f"/ip4/10.0.0.1/tcp/31000/p2p/{RELAY}",
        "/ip4/10.0.0.2/tcp/1",
        f"/ip4/1.1.1.1/tcp/2/p2p/{RELAY}/p2p-circuit",
    ]
    assert circuit_addrs(relays) == [f"/ip4/10.0.0.1/tcp/31000/p2p/{RELAY}/p2p-circuit"]
    assert is_relayed(circuit_addrs(relays)[0]) and not is_relayed("/ip4/10.0.0.2/tcp/1")


def test_peer_of() -> None:
    assert peer_of(f"/ip4/10.0.0.1/tcp/31000/p2p/{RELAY}") == RELAY
    assert peer_of("/ip4/10.0.0.1/tcp/31000") is None
