from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from corolla.swarm.reachability import (
    MAX_ADDRS,
    DialBackRequest,
    Reachability,
    reachability_message,
    verdict,
)


def test_reachable_when_at_least_half_of_those_who_answered_dialed_back() -> None:
    assert verdict([True, False]).direct is True
    assert verdict([True, False, False]).direct is False
    assert verdict([True, None, None]) == Reachability(True, asked=3, answered=1, dialed=1)
    assert verdict([None, None]).direct is None
    assert verdict([]).direct is None


def test_messages_say_direct_or_through_relays_and_what_to_forward() -> None:
    level, text = reachability_message(verdict([True]), skip=False, relays=True, port="31337")
    assert level == logging.INFO and "reachable directly" in text and "1/1" in text
    level, text = reachability_message(verdict([False, False]), skip=False, relays=True, port="4000")
    assert level == logging.INFO and "through relays" in text
    assert "forward TCP port 4000" in text and "--public_ip" in text and "--announce_maddrs" in text
    level, text = reachability_message(verdict([False]), skip=False, relays=False, port="4000")
    assert level == logging.WARNING and "relays are off" in text
    level, text = reachability_message(verdict([None]), skip=False, relays=True, port="4000")
    assert level == logging.WARNING and "unknown" in text
    assert "--skip_reachability_check" in reachability_message(None, skip=True, relays=True, port="1")[1]
    assert "first peer" in reachability_message(None, skip=False, relays=True, port="1")[1]
    level, text = reachability_message(verdict([False]), skip=False, relays=False, port="1", bootstrap=True)
    assert level == logging.WARNING and "bootstrap peer" in text and "--no_relay" not in text


def test_a_dial_back_request_holds_a_few_addresses() -> None:
    DialBackRequest(addrs=("/ip4/1.2.3.4/tcp/1",))
    with pytest.raises(ValidationError):
        DialBackRequest(addrs=())
    with pytest.raises(ValidationError):
        DialBackRequest(addrs=tuple(f"/ip4/1.2.3.4/tcp/{i}" for i in range(MAX_ADDRS + 1)))
