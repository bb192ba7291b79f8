"""Keeping a relay slot: reservations (circuit relay v2) renewed by corolla itself.

The P2P daemon reserves a slot on each static relay when it starts, but when a relay restarts it
does not reserve again for a long time (seen in the network lab: ``NO_RESERVATION`` from the
restarted relay for minutes; libp2p backs failed candidates off for an hour). So a server behind
NAT sends the reservation request itself, every ``RENEW_EVERY`` seconds: a ``RESERVE`` message on
the relay's hop protocol, over the daemon's own connection to it. The reply's status says
whether the relay took it. A reservation is tied to that connection, and the daemon's circuit
transport answers the relay's connection requests whoever reserved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from hivemind.p2p import P2P, PeerID

from corolla.swarm.circuit import HOP, HOP_PROTOCOL, OK, TIMEOUT, Message, encode, read_message, walk
from corolla.swarm.circuit import RESERVE as RESERVE_TYPE
from corolla.swarm.dht import dial_announced
from corolla.swarm.maddrs import peer_of, varint

logger = logging.getLogger(__name__)

RESERVE = encode(Message(type=RESERVE_TYPE), HOP)  # HopMessage { type: RESERVE (0) }
STATUS_FIELD, STATUS_OK = HOP[2], OK
RENEW_EVERY = 10.0  # seconds


def hop_status(message: bytes) -> int | None:
    """Pure: the ``status`` of a HopMessage (protobuf field 5), or None when it has none or is
    malformed."""
    try:
        statuses = [value for number, value in walk(message) if number == STATUS_FIELD]
    except ValueError:
        return None
    return statuses[-1] if statuses and isinstance(statuses[-1], int) else None


async def reserve(p2p: P2P, relay: str) -> bool:
    """Reserve (or renew) a slot on ``relay`` (a full multiaddr ``.../p2p/ID``); whether it said OK."""
    peer = peer_of(relay)
    if peer is None:
        return False
    peer_id = PeerID.from_base58(peer)
    await dial_announced(p2p, peer_id, [relay.rsplit("/p2p/", 1)[0]])
    _, reader, writer = await asyncio.wait_for(p2p._client.stream_open(peer_id, (HOP_PROTOCOL,)), TIMEOUT)
    try:
        writer.write(varint(len(RESERVE)) + RESERVE)
        await writer.drain()
        return hop_status(await asyncio.wait_for(read_message(reader), TIMEOUT)) == STATUS_OK
    finally:
        writer.close()


async def keep_reservations(p2p: P2P, relays: Sequence[str], every: float = RENEW_EVERY) -> None:
    """Renew a slot on each relay every ``every`` seconds, logging when one is lost or regained;
    runs until cancelled."""
    held = dict.fromkeys(relays, True)  # the daemon reserved them at start
    while True:
        await asyncio.sleep(every)
        for relay in relays:
            try:
                ok = await reserve(p2p, relay)
            except Exception as e:  # the relay is down or restarting: try again next time
                logger.debug("relay reservation on %s failed: %s", relay, e)
                ok = False
            if ok != held[relay]:
                if ok:
                    logger.info("reachable through relays again: a slot on %s is reserved", relay)
                else:
                    logger.warning("lost the relay slot on %s: retrying every %.0f s", relay, every)
            held[relay] = ok
