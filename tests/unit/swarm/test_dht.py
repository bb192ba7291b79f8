from __future__ import annotations

from hivemind.p2p import P2P

from corolla.config import NetworkConfig
from corolla.swarm.dht import relay_options

PEER = "/ip4/10.0.0.10/tcp/31000/p2p/QmTMJfP82ZeqNk92Re9wqootgDe7pAgYWXSHTEZCAvkpEa"


def test_a_client_relays_nothing_and_forces_nothing() -> None:
    assert relay_options(NetworkConfig(), None) == {"use_relay": True, "use_auto_relay": False}
    assert relay_options(NetworkConfig(use_relay=False), None)["use_relay"] is False


def test_a_reachable_peer_is_public_at_once_so_that_it_relays_for_others() -> None:
    options = relay_options(NetworkConfig(initial_peers=(PEER,)), True)
    assert options == {"use_relay": True, "use_auto_relay": False, "force_reachability": "public"}


def test_an_unreachable_peer_is_a_dht_client_reserving_slots_on_its_initial_peers() -> None:
    options = relay_options(NetworkConfig(initial_peers=(PEER,)), False)
    assert options["client_mode"] is True and options["force_reachability"] == "private"
    assert options["use_auto_relay"] is True and options["trusted_relays"] == [PEER]
    assert options["announce_maddrs"] == [f"{PEER}/p2p-circuit"]  # the daemon would not announce them


def test_no_auto_relay_or_no_relay_keep_an_unreachable_peer_without_relays() -> None:
    for network in (NetworkConfig(initial_peers=(PEER,), use_auto_relay=False),
                    NetworkConfig(initial_peers=(PEER,), use_relay=False)):  # fmt: skip
        options = relay_options(network, False)
        assert options["use_auto_relay"] is False and "trusted_relays" not in options


def test_trusted_relays_become_static_relays_in_the_daemon() -> None:
    """p2pd reserves on trusted relays at once only with relay discovery off (see start_dht)."""
    args = P2P._make_process_args("p2pd", autoRelay=True, trustedRelays=PEER)
    assert "-relayDiscovery=0" in args
    assert "-relayDiscovery=0" not in P2P._make_process_args("p2pd", autoRelay=True)
    assert "-relayDiscovery=0" not in P2P._make_process_args("p2pd", autoRelay=False, trustedRelays=PEER)
