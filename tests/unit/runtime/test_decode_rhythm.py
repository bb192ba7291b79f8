"""When a server waits before a merged decode pass (runtime.batching)."""

from __future__ import annotations

import gc

from corolla.runtime.batching import DecodeRhythms, _Rhythm, gather_delay

PASS = 0.05  # a typical decode pass, seconds


def test_nothing_to_wait_for_without_a_typical_pass_or_other_sessions() -> None:
    due_soon = _Rhythm(delivered_at=0.0, turnaround=0.01)
    assert gather_delay(0.0, 0.0, None, [due_soon]) == 0.0
    assert gather_delay(0.0, 0.0, PASS, []) == 0.0  # a lone session never waits


def test_waits_for_a_session_due_within_one_pass_but_no_longer() -> None:
    due_soon = _Rhythm(delivered_at=0.0, turnaround=0.02)
    assert gather_delay(0.01, 0.0, PASS, [due_soon]) == 0.04  # until free_since + one pass
    due_late = _Rhythm(delivered_at=0.0, turnaround=0.2)
    assert gather_delay(0.01, 0.0, PASS, [due_late]) == 0.0
    assert gather_delay(0.06, 0.0, PASS, [due_soon]) == 0.0  # the budget is spent


def test_a_session_that_stopped_stepping_is_not_waited_for() -> None:
    reading = _Rhythm(delivered_at=0.0, turnaround=0.01)  # e.g. its user is reading the answer
    assert gather_delay(0.03, 0.02, PASS, [reading]) == 0.0  # overdue by more than twice its rhythm


def test_rhythms_follow_steps_and_forget_closed_sessions() -> None:
    class Cache:  # a session's cache: the key the rhythms are kept under
        pass

    rhythms, a, b = DecodeRhythms(), Cache(), Cache()
    rhythms.passed(PASS)
    rhythms.arrived(a, 0.0)  # first steps: no rhythm yet
    rhythms.arrived(b, 0.0)
    rhythms.delivered(a, 0.05)
    rhythms.delivered(b, 0.05)
    rhythms.arrived(a, 0.06)  # a steps 10 ms after its result; b is expected as well
    assert rhythms.delay(0.06, 0.05) == 0.0  # b has no turnaround yet: nothing to expect
    rhythms.arrived(b, 0.07)
    rhythms.delivered(a, 0.1)
    rhythms.delivered(b, 0.1)
    rhythms.arrived(a, 0.11)
    assert abs(rhythms.delay(0.11, 0.1) - 0.04) < 1e-9  # b (turnaround 20 ms) is due at 0.12
    del b
    gc.collect()
    assert rhythms.delay(0.11, 0.1) == 0.0  # b's session is gone
