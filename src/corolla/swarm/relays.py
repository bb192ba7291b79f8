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

from corolla.swarm.dht import dial_announced
from corolla.swarm.maddrs import peer_of, varint

logger = logging.getLogger(__name__)

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
RESERVE = b"\x08\x00"  # HopMessage { type: RESERVE (0) }
STATUS_FIELD, STATUS_OK = 5, 100
RENEW_EVERY = 10.0  # seconds
TIMEOUT = 5.0
MAX_MESSAGE = 1 << 16


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def hop_status(message: bytes) -> int | None:
    """Pure: the ``status`` of a HopMessage (protobuf field 5), or None when it has none or is
    malformed."""
    i, status = 0, None
    try:
        while i < len(message):
            key, i = _read_varint(message, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(message, i)
                if field == STATUS_FIELD:
                    status = value
            elif wire == 2:
                length, i = _read_varint(message, i)
                i += length
            else:
                return None  # fixed-width fields do not occur in HopMessage
        return status if i == len(message) else None
    except ValueError:
        return None


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 28:
            raise ValueError("oversized length prefix")
    if length > MAX_MESSAGE:
        raise ValueError(f"a {length}-byte hop message")
    return await reader.readexactly(length)


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
        return hop_status(await asyncio.wait_for(_read_message(reader), TIMEOUT)) == STATUS_OK
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
