from __future__ import annotations

from corolla.swarm.relays import RESERVE, hop_status


def test_the_reserve_request_is_a_hop_message_of_type_reserve() -> None:
    assert bytes([1 << 3 | 0, 0]) == RESERVE  # field 1 (type), varint 0 (RESERVE)


def test_the_status_of_a_relay_s_reply() -> None:
    voucher = b"\x1a\x05hello"  # field 3 (reservation), 5 bytes
    ok = b"\x08\x02" + voucher + b"\x28\x64"  # type STATUS, the reservation, status 100 (OK)
    assert hop_status(ok) == 100
    assert hop_status(b"\x08\x02\x28\xcc\x01") == 204  # NO_RESERVATION, a two-byte varint
    assert hop_status(b"\x08\x02") is None  # no status
    assert hop_status(b"\x08\x02\x1a\x09short") is None  # a field longer than the message
    assert hop_status(b"\x08") is None  # truncated
