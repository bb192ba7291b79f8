"""Relaying for peers behind NAT (circuit relay v2, hop side) without the daemon's hidden limits.

hivemind's P2P daemon starts two relay services when relaying is on: one with the limits its flags
set (4 GiB and 30 minutes per relayed connection) and, right after, libp2p's default one, whose
stream handler replaces the first: every relayed connection is reset after 128 KiB in one direction
or 2 minutes (seen in the network lab's relay log: "relayed 131072 bytes" then the reset). At 2 KiB
per token of the built-in model's hidden states, a relayed server lost its client's stream every
fifty tokens, and a prompt of 57 tokens could not reach it at all.

So a relaying corolla peer answers the hop protocol itself: ``RelayService`` registers a handler for
it on the daemon, which replaces the daemon's own. It takes reservations (``RESERVE``) and connects
a peer to a reserved one (``CONNECT``: a ``STOP`` stream to the target, then bytes copied both
ways), with no data or time limit on a relayed connection; the relay bounds what it holds instead:
``MAX_RESERVATIONS`` slots and ``MAX_CIRCUITS`` relayed connections per peer. The messages are the
circuit v2 protobufs (``circuit.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from hivemind.p2p import P2P, PeerID

from corolla.swarm.circuit import (
    CONNECT,
    CONNECTION_FAILED,
    HOP,
    HOP_PROTOCOL,
    HOP_STATUS,
    MALFORMED_MESSAGE,
    NO_RESERVATION,
    OK,
    RESERVE,
    RESOURCE_LIMIT_EXCEEDED,
    STOP,
    STOP_CONNECT,
    STOP_PROTOCOL,
    TIMEOUT,
    UNEXPECTED_MESSAGE,
    Message,
    decode,
    read_message,
    send,
)

logger = logging.getLogger(__name__)

RESERVATION_TTL = 3600  # seconds a slot is held without renewal (servers renew every 10 s)
MAX_RESERVATIONS = 1024
MAX_CIRCUITS = 64  # relayed connections open at once to or from one peer
COPY_CHUNK = 1 << 16


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy until ``reader`` ends; returns the bytes copied."""
    copied = 0
    while data := await reader.read(COPY_CHUNK):
        writer.write(data)
        await writer.drain()
        copied += len(data)
    return copied


@dataclass
class RelayService:
    """The hop side of circuit relay v2 on ``p2p``'s daemon (``start``), for peers that reserve."""

    p2p: P2P
    reservations: dict[str, float] = field(default_factory=dict)  # peer -> expiry (monotonic)
    circuits: Counter[str] = field(default_factory=Counter)  # relayed connections open, per peer

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(HOP_PROTOCOL, self._handle)

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # type: ignore[no-untyped-def]
        source = info.peer_id.to_base58()
        try:
            request = decode(await asyncio.wait_for(read_message(reader), TIMEOUT), HOP)
            if request.type == RESERVE:
                await send(writer, self._reserve(source), HOP)
            elif request.type == CONNECT:
                await self._connect(source, request, reader, writer)
            else:
                await send(writer, Message(type=HOP_STATUS, status=UNEXPECTED_MESSAGE), HOP)
        except (ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
            logger.debug("hop request from ...%s: %s", source[-8:], e)
            with contextlib.suppress(Exception):
                await send(writer, Message(type=HOP_STATUS, status=MALFORMED_MESSAGE), HOP)
        except Exception as e:  # a stream that broke: the peers dial again
            logger.debug("relaying for ...%s ended: %s", source[-8:], e)
        finally:
            writer.close()

    def _reserve(self, peer: str) -> Message:
        now = time.monotonic()
        for stale in [p for p, expiry in self.reservations.items() if expiry < now]:
            del self.reservations[stale]
        if peer not in self.reservations and len(self.reservations) >= MAX_RESERVATIONS:
            return Message(type=HOP_STATUS, status=RESOURCE_LIMIT_EXCEEDED)
        if peer not in self.reservations:
            logger.debug("relay slot reserved for ...%s", peer[-8:])
        self.reservations[peer] = now + RESERVATION_TTL
        return Message(type=HOP_STATUS, status=OK, expire=int(time.time()) + RESERVATION_TTL)

    async def _connect(self, source: str, request: Message, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:  # fmt: skip
        if request.peer is None:
            raise ValueError("CONNECT without a peer")
        target = PeerID(request.peer)
        name = target.to_base58()
        if self.reservations.get(name, 0.0) < time.monotonic():
            await send(writer, Message(type=HOP_STATUS, status=NO_RESERVATION), HOP)
            return
        if self.circuits[source] >= MAX_CIRCUITS or self.circuits[name] >= MAX_CIRCUITS:
            await send(writer, Message(type=HOP_STATUS, status=RESOURCE_LIMIT_EXCEEDED), HOP)
            return
        try:
            _, stop_reader, stop_writer = await asyncio.wait_for(
                self.p2p._client.stream_open(target, (STOP_PROTOCOL,)), TIMEOUT
            )
        except Exception as e:
            logger.debug("relay to ...%s failed: %s", name[-8:], e)
            await send(writer, Message(type=HOP_STATUS, status=CONNECTION_FAILED), HOP)
            return
        try:
            connect = Message(type=STOP_CONNECT, peer=PeerID.from_base58(source).to_bytes())
            await send(stop_writer, connect, STOP)
            answer = decode(await asyncio.wait_for(read_message(stop_reader), TIMEOUT), STOP)
            if answer.status != OK:
                await send(writer, Message(type=HOP_STATUS, status=CONNECTION_FAILED), HOP)
                return
            await send(writer, Message(type=HOP_STATUS, status=OK), HOP)
            self.circuits.update((source, name))
            try:
                await _pipe(reader, writer, stop_reader, stop_writer)
            finally:
                self.circuits.subtract((source, name))
                self.circuits += Counter()  # drop peers at zero
        finally:
            stop_writer.close()


async def _pipe(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:  # fmt: skip
    """Copy both ways until either side ends, then end both."""
    ab = asyncio.ensure_future(_copy(a_reader, b_writer))
    ba = asyncio.ensure_future(_copy(b_reader, a_writer))
    try:
        await asyncio.wait({ab, ba}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ab, ba):
            task.cancel()
        await asyncio.gather(ab, ba, return_exceptions=True)
