"""Starting a DHT peer from a ``NetworkConfig``.

Every corolla DHT peer validates records the same way (``record_validators``): the swarm key's tag
(``corolla.swarm.auth``, open swarms included: they refuse a closed swarm's records), hivemind's
RSA record signatures (``corolla.swarm.identity``; a server's peer signs with its identity), and,
innermost, that a value can be decoded at all."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from hivemind import DHT
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils import MSGPackSerializer

from corolla.config import NetworkConfig
from corolla.errors import SwarmUnavailable
from corolla.swarm.auth import SwarmKey, SwarmKeyValidator, load_swarm_key
from corolla.swarm.identity import ServerIdentity, verifying_validator
from corolla.swarm.lifeline import forking_dht
from corolla.swarm.maddrs import circuit_addrs, daemon_maddr, peer_of

logger = logging.getLogger(__name__)

DIAL_TIMEOUT = 3.0  # seconds to dial a peer at its announced addresses
MAX_REJOIN_ADDRS = 8


class DecodableValidator(RecordValidatorBase):
    """Refuses a value that does not decode (msgpack) once the other validators stripped their parts.

    hivemind decodes found values in a callback whose failure is never reported: the lookup would
    hang until our timeout, so one malformed record (anyone may store one in an open swarm) would
    make the whole swarm unreadable. Refused here, it is ignored like any invalid record."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        return True

    @property
    def priority(self) -> int:
        return -100  # innermost: validated last, on the stripped value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, DecodableValidator)


def record_validators(
    swarm_key: SwarmKey | None, identity: ServerIdentity | None = None
) -> list[RecordValidatorBase]:
    """The validators of a corolla DHT peer: decodable values, record signatures (signing with
    ``identity``'s key, if given), all inside the swarm key's tag."""
    signatures = identity.validator() if identity is not None else verifying_validator()
    return [DecodableValidator(), signatures, SwarmKeyValidator(swarm_key)]


def add_record_validators(dht: DHT, swarm_key: SwarmKey | None) -> None:
    """Give a DHT started elsewhere (``SequenceManager(dht=...)``) corolla's validators; validators it
    has already are merged, not doubled."""
    dht.add_validators(record_validators(swarm_key))


def _use_static_relays() -> None:
    """Make hivemind's daemon reserve slots on the ``trusted_relays`` it is given, at once.

    p2pd feeds trusted relays to libp2p's AutoRelay as mere candidates unless relay discovery is
    off (``-relayDiscovery=0``), and AutoRelay then waits for four candidates or three minutes
    before it reserves a slot (seen in a network lab: the first ``/p2p-circuit`` reservation came
    exactly 3 minutes after start). With discovery off they are static relays, reserved within
    milliseconds. hivemind's ``P2P.create`` has no parameter for it, so this adds the flag where
    both ``autoRelay`` and ``trustedRelays`` are set (only ``start_dht`` sets the latter)."""
    original = P2P._make_process_args
    if getattr(original, "corolla_static_relays", False):
        return

    def make_process_args(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("trustedRelays") and kwargs.get("autoRelay"):
            kwargs["relayDiscovery"] = False
        return original(*args, **kwargs)

    make_process_args.corolla_static_relays = True  # type: ignore[attr-defined]
    P2P._make_process_args = staticmethod(make_process_args)  # type: ignore[method-assign]


_use_static_relays()


def relay_options(network: NetworkConfig, reachable: bool | None) -> dict[str, Any]:
    """hivemind DHT options for relaying. ``reachable``: what the reachability check found (None:
    not checked, a client). A reachable peer is forced public, so that it relays for others at
    once; an unreachable one (with auto relay) joins in client mode, forced private, holding
    reservations on its ``--initial_peers``."""
    use_relay = network.use_relay
    options: dict[str, Any] = {"use_relay": use_relay, "use_auto_relay": False}
    if reachable is True:
        options["force_reachability"] = "public"
    elif reachable is False:
        options.update(client_mode=True, force_reachability="private")
        if use_relay and network.use_auto_relay and network.initial_peers:
            # the daemon does not add its relay addresses to those it announces (identify), and a
            # peer's announced addresses replace what others knew of it: announce them ourselves
            circuits = circuit_addrs(list(network.initial_peers))
            options.update(
                use_auto_relay=True,
                trusted_relays=list(network.initial_peers),
                announce_maddrs=network.public_maddrs() + circuits,
            )
    return options


def start_dht(
    network: NetworkConfig,
    *,
    client_mode: bool = False,
    num_workers: int = 4,
    identity: ServerIdentity | None = None,
    reachable: bool | None = None,
) -> DHT:
    """Start (or join) a swarm; ``SwarmUnavailable`` with a one-line reason when that fails, and
    ``ConfigError`` for an unusable ``--swarm_key``. With ``identity`` (a server), the peer runs under
    that RSA identity and signs its records with it. ``reachable``: see ``relay_options``."""
    swarm_key = load_swarm_key(network.swarm_key)
    extra: dict[str, Any] = relay_options(network, reachable)
    client_mode = extra.pop("client_mode", client_mode)
    announce = extra.pop("announce_maddrs", network.public_maddrs())
    identity_path = network.identity_path
    if identity is not None:
        identity_path = identity.path
        if identity.temporary:
            extra["check_if_identity_free"] = False  # fresh: nobody else can hold it
    if swarm_key is not None:
        logger.info(
            "closed swarm: only peers holding the swarm key take part (key fingerprint %s)",
            swarm_key.fingerprint,
        )
    try:
        with forking_dht():  # its processes die with ours, and a terminal's Ctrl-C reaches only ours
            return DHT(
                initial_peers=list(network.initial_peers),
                start=True,
                num_workers=num_workers,
                shutdown_timeout=1.0,
                host_maddrs=network.listen_maddrs(),
                announce_maddrs=announce or None,
                identity_path=identity_path,
                client_mode=client_mode,
                record_validators=record_validators(swarm_key, identity),
                **extra,
            )
    except Exception as e:  # hivemind raises P2PDaemonError, ValueError for bad multiaddrs, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        hint = (
            "check that --initial_peers are full multiaddrs (/ip4/ADDR/tcp/PORT/p2p/PEER_ID) of running peers"
            if network.initial_peers
            else "check --host_maddrs/--port and --identity_path"
        )
        raise SwarmUnavailable(f"could not start the DHT peer: {reason}; {hint}") from None
    finally:
        if identity is not None:
            identity.discard()  # a temporary identity file: the daemon has read it (or failed)


def visible_maddrs(dht: DHT) -> list[str]:
    """Multiaddrs others can use to reach this peer, loopback last (most useful first)."""
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    return sorted(maddrs, key=lambda m: ("/ip4/127." in m or "/ip6/::1/" in m, m))


async def _rejoin(_dht: DHT, node: Any, peers: Sequence[tuple[str, Sequence[str]]]) -> int:
    """In the DHT's process: dial and ping ``peers`` (peer id, addresses) back into the routing table,
    then look up our neighbours again; how many answered."""

    async def ping(peer: str, addrs: Sequence[str]) -> bool:
        peer_id = PeerID.from_base58(peer)
        if addrs:
            await dial_announced(node.p2p, peer_id, addrs)
        try:
            return await asyncio.wait_for(node.protocol.call_ping(peer_id), DIAL_TIMEOUT) is not None
        except Exception as e:  # still down: the next attempt may find it back
            logger.debug("rejoin: ...%s did not answer: %s", peer[-8:], e)
            return False

    answered = sum(await asyncio.gather(*(ping(peer, addrs) for peer, addrs in peers)))  # all at once
    if answered:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), 2 * DIAL_TIMEOUT)
    return answered


async def _routing_table_size(_dht: DHT, node: Any) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def routing_table_size(dht: DHT) -> int:
    """How many peers the DHT peer's routing table holds (0: it has lost the swarm)."""
    return dht.run_coroutine(_routing_table_size)


def rejoin(dht: DHT, initial_peers: Sequence[str], seen: Mapping[str, Sequence[str]] = {}) -> int:  # noqa: B006
    """Bring a long-running peer back into the swarm: ping its ``initial_peers`` (full multiaddrs) and
    the peers it has ``seen`` (peer id -> addresses) into its DHT routing table. hivemind drops peers
    that stop answering and never asks its initial peers again, so a client whose only bootstrap peer
    restarted would otherwise see an empty swarm for good. Returns how many peers answered."""
    peers: dict[str, list[str]] = {}
    for maddr in initial_peers:
        peer = peer_of(maddr)
        if peer:
            peers.setdefault(peer, []).append(maddr.rsplit("/p2p/", 1)[0])
    for peer, addrs in seen.items():
        peers.setdefault(peer, []).extend(addrs)
    if not peers:
        return 0
    job = functools.partial(_rejoin, peers=[(p, tuple(a)[:MAX_REJOIN_ADDRS]) for p, a in peers.items()])
    return dht.run_coroutine(job)


async def dial_announced(
    p2p: P2P, peer_id: PeerID, addrs: Sequence[str], timeout: float = DIAL_TIMEOUT
) -> bool:
    """Dial a peer at the addresses its record announces; whether that worked.

    A peer known only from a DHT record is otherwise found through the P2P daemon's own routing,
    which can miss it: a server that joined through a bootstrap peer's non-loopback, non-public
    address (a LAN's, or this machine's 192.0.2.x) is not found there ("routing: not found"), though
    its address is dialable. Dialing also leaves the addresses in the daemon's peer store."""
    try:
        maddrs = [daemon_maddr(addr) for addr in addrs]
        await asyncio.wait_for(p2p._client.connect(peer_id, maddrs), timeout)  # hivemind has no public call
    except Exception as e:  # a malformed address (anyone may announce one), unreachable, timed out
        logger.debug("could not dial ...%s at its announced addresses: %s", peer_id.to_base58()[-8:], e)
        return False
    return True
