"""The circuit relay v2 messages corolla reads and writes (pure parts)."""

from __future__ import annotations

import pytest

from corolla.swarm.circuit import (
    CONNECT,
    HOP,
    HOP_STATUS,
    OK,
    STOP,
    STOP_CONNECT,
    Message,
    decode,
    encode,
)
from corolla.swarm.relays import RESERVE, STATUS_OK, hop_status


def test_messages_have_the_protocols_bytes() -> None:
    assert encode(Message(type=HOP_STATUS, status=OK), HOP) == b"\x08\x02\x28\x64"  # type 2, status 100
    assert encode(Message(type=STOP_CONNECT, peer=b"ID"), STOP) == b"\x08\x00\x12\x04\x0a\x02ID"
    assert decode(RESERVE, HOP) == Message(type=0)  # what a server's keeper sends
    assert hop_status(encode(Message(type=HOP_STATUS, status=OK, expire=1_800_000_000), HOP)) == STATUS_OK


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (Message(type=CONNECT, peer=b"\x00\x24" + bytes(36)), HOP),
        (Message(type=HOP_STATUS, status=OK, expire=1_800_000_000), HOP),
        (Message(type=STOP_CONNECT, peer=b"peer"), STOP),
        (Message(type=1, status=OK), STOP),
    ],
)
def test_what_is_encoded_decodes_to_the_same_message(message: Message, fields) -> None:  # type: ignore[no-untyped-def]
    assert decode(encode(message, fields), fields) == message


@pytest.mark.parametrize("garbage", [b"\x08", b"\x12\x05ab", b"\x0d\x00\x00\x00\x00", b"\xff" * 11])
def test_a_malformed_message_is_refused(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        decode(garbage, HOP)
