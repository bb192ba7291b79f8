"""The circuit relay v2 wire format (libp2p's hop and stop protocols), the parts corolla speaks.

Messages are varint-length-prefixed protobufs; the few fields corolla reads and writes are written
by hand here (``encode``/``decode``): the relay service (``relay_service.py``) answers hop
requests and a server behind NAT renews its slots (``relays.py``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from corolla.swarm.maddrs import varint

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
# HopMessage.Type and StopMessage.Type
RESERVE, CONNECT, HOP_STATUS = 0, 1, 2
STOP_CONNECT, STOP_STATUS = 0, 1
# Status
OK, RESOURCE_LIMIT_EXCEEDED, CONNECTION_FAILED, NO_RESERVATION = 100, 201, 203, 204
MALFORMED_MESSAGE, UNEXPECTED_MESSAGE = 400, 401
MAX_MESSAGE = 1 << 16
TIMEOUT = 5.0  # seconds for a hop request or its answer, and for a target to answer a STOP


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    """Pure: the unsigned varint at ``data[i:]`` and the index after it; ``ValueError`` if cut."""
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def walk(data: bytes) -> list[tuple[int, int | bytes]]:
    """Pure: (field number, value) of each top-level field of a protobuf message; ``ValueError``
    when malformed (circuit v2 messages have only varint and bytes fields)."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
            out.append((number, value))
        elif wire == 2:
            length, i = read_varint(data, i)
            if i + length > len(data):
                raise ValueError("truncated field")
            out.append((number, data[i : i + length]))
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


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


def decode(data: bytes, fields: Fields) -> Message:
    """Pure: the inverse of ``encode`` (other fields are skipped); ``ValueError`` when malformed."""
    type_no, peer_no, status_no, reservation_no = fields
    message = Message()
    for number, value in walk(data):
        if number == type_no and isinstance(value, int):
            message.type = value
        elif number == status_no and isinstance(value, int):
            message.status = value
        elif number == peer_no and isinstance(value, bytes):
            message.peer = next((v for n, v in walk(value) if n == 1 and isinstance(v, bytes)), None)
        elif number == reservation_no and isinstance(value, bytes):
            message.expire = next((v for n, v in walk(value) if n == 1 and isinstance(v, int)), None)
    return message


async def send(writer: asyncio.StreamWriter, message: Message, fields: Fields) -> None:
    body = encode(message, fields)
    writer.write(varint(len(body)) + body)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> bytes:
    """One length-prefixed message from a stream (at most ``MAX_MESSAGE`` bytes)."""
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
