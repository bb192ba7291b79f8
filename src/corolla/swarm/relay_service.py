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
circuit v2 protobufs, written by hand (``encode``/``decode``: a few varint and bytes fields)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from hivemind.p2p import P2P, PeerID

from corolla.swarm.maddrs import varint
from corolla.swarm.relays import HOP_PROTOCOL, TIMEOUT, _read_message, _read_varint

logger = logging.getLogger(__name__)

STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
# HopMessage.Type and StopMessage.Type
RESERVE, CONNECT, HOP_STATUS = 0, 1, 2
STOP_CONNECT, STOP_STATUS = 0, 1
# Status
OK, RESOURCE_LIMIT_EXCEEDED, CONNECTION_FAILED, NO_RESERVATION = 100, 201, 203, 204
MALFORMED_MESSAGE, UNEXPECTED_MESSAGE = 400, 401
RESERVATION_TTL = 3600  # seconds a slot is held without renewal (servers renew every 10 s)
MAX_RESERVATIONS = 1024
MAX_CIRCUITS = 64  # relayed connections open at once to or from one peer
COPY_CHUNK = 1 << 16


@dataclass
class Message:
    """A HopMessage or StopMessage: the fields corolla reads and writes (field numbers differ:
    ``HOP`` and ``STOP`` below). ``peer``: the peer id's bytes."""

    type: int | None = None
    peer: bytes | None = None
    status: int | None = None
    expire: int | None = None  # HopMessage.reservation.expire (unix seconds)


Fields = tuple[int, int, int, int | None]  # field numbers: (type, peer, status, reservation or None)
HOP: Fields = (1, 2, 5, 3)
STOP: Fields = (1, 2, 4, None)


def _field(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _field(number, 2) + varint(len(value)) + value


def encode(message: Message, fields: Fields) -> bytes:
    """Pure: ``message`` as protobuf bytes with the field numbers ``fields`` (``HOP``/``STOP``)."""
    type_no, peer_no, status_no, reservation_no = fields
    out = b""
    if message.type is not None:
        out += _field(type_no, 0) + varint(message.type)
    if message.peer is not None:
        out += _bytes_field(peer_no, _bytes_field(1, message.peer))  # Peer { id = 1 }
    if message.expire is not None and reservation_no is not None:
        out += _bytes_field(reservation_no, _field(1, 0) + varint(message.expire))  # Reservation { expire }
    if message.status is not None:
        out += _field(status_no, 0) + varint(message.status)
    return out


def _walk(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message; ``ValueError`` when malformed."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            out.append((number, value))
        elif wire == 2:
            length, i = _read_varint(data, i)
            if i + length > len(data):
                raise ValueError("truncated field")
            out.append((number, data[i : i + length]))
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def decode(data: bytes, fields: Fields) -> Message:
    """Pure: the inverse of ``encode`` (other fields are skipped); ``ValueError`` when malformed."""
    type_no, peer_no, status_no, reservation_no = fields
    message = Message()
    for number, value in _walk(data):
        if number == type_no and isinstance(value, int):
            message.type = value
        elif number == status_no and isinstance(value, int):
            message.status = value
        elif number == peer_no and isinstance(value, bytes):
            message.peer = next((v for n, v in _walk(value) if n == 1 and isinstance(v, bytes)), None)
        elif number == reservation_no and isinstance(value, bytes):
            message.expire = next((v for n, v in _walk(value) if n == 1 and isinstance(v, int)), None)
    return message


async def _send(writer: asyncio.StreamWriter, message: Message, fields: Fields) -> None:
    body = encode(message, fields)
    writer.write(varint(len(body)) + body)
    await writer.drain()


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
            request = decode(await asyncio.wait_for(_read_message(reader), TIMEOUT), HOP)
            if request.type == RESERVE:
                await _send(writer, self._reserve(source), HOP)
            elif request.type == CONNECT:
                await self._connect(source, request, reader, writer)
            else:
                await _send(writer, Message(type=HOP_STATUS, status=UNEXPECTED_MESSAGE), HOP)
        except (ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
            logger.debug("hop request from ...%s: %s", source[-8:], e)
            with contextlib.suppress(Exception):
                await _send(writer, Message(type=HOP_STATUS, status=MALFORMED_MESSAGE), HOP)
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
            await _send(writer, Message(type=HOP_STATUS, status=NO_RESERVATION), HOP)
            return
        if self.circuits[source] >= MAX_CIRCUITS or self.circuits[name] >= MAX_CIRCUITS:
            await _send(writer, Message(type=HOP_STATUS, status=RESOURCE_LIMIT_EXCEEDED), HOP)
            return
        try:
            _, stop_reader, stop_writer = await asyncio.wait_for(
                self.p2p._client.stream_open(target, (STOP_PROTOCOL,)), TIMEOUT
            )
        except Exception as e:
            logger.debug("relay to ...%s failed: %s", name[-8:], e)
            await _send(writer, Message(type=HOP_STATUS, status=CONNECTION_FAILED), HOP)
            return
        try:
            connect = Message(type=STOP_CONNECT, peer=PeerID.from_base58(source).to_bytes())
            await _send(stop_writer, connect, STOP)
            answer = decode(await asyncio.wait_for(_read_message(stop_reader), TIMEOUT), STOP)
            if answer.status != OK:
                await _send(writer, Message(type=HOP_STATUS, status=CONNECTION_FAILED), HOP)
                return
            await _send(writer, Message(type=HOP_STATUS, status=OK), HOP)
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

