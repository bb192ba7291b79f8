"""When to start a merged decode pass: now, or after waiting briefly for sessions about to step.

Sessions that decode at once settle into a rhythm: each sends its next step some time (its
*turnaround*: the client's own work plus the network) after it got its last result. Without
waiting, sessions whose results came back in different passes keep stepping out of phase,
and every token of every session costs several passes over the weights instead of one. So
before a pass the server waits for the sessions it expects, but only within a budget of one
typical pass: a merged pass costs about as much as a lone one, so waiting less than a pass
never costs the waiting steps more than the extra pass they would otherwise wait for.

A session is expected when its next step is due within the budget and is not already long
overdue (a session that stopped stepping, e.g. a chat user reading, is forgotten after twice
its turnaround). A lone session expects nobody and never waits."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

SMOOTHING = 0.3  # weight of the newest sample in the running averages


@dataclass
class _Rhythm:
    delivered_at: float  # when its last result was handed back
    turnaround: float | None = None  # smoothed seconds from a result to the session's next step
    waiting: bool = False  # a step of it is queued or being computed


def smoothed(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


def due_at(rhythm: _Rhythm) -> float | None:
    """When the session's next step should arrive, or None if it has no rhythm yet."""
    return None if rhythm.turnaround is None else rhythm.delivered_at + rhythm.turnaround


def gather_delay(now: float, free_since: float, pass_time: float | None, rhythms: list[_Rhythm]) -> float:
    """Seconds to wait before the next pass (0: start now). ``free_since``: when the compute
    thread became free for it; ``pass_time``: a typical decode pass; ``rhythms``: sessions
    that have stepped before and have no step queued."""
    if pass_time is None:
        return 0.0
    deadline = free_since + pass_time
    expected = [
        due
        for r in rhythms
        if (due := due_at(r)) is not None
        and due <= deadline  # arrives within the budget
        and now <= r.delivered_at + 2 * (r.turnaround or 0.0)  # and has not stopped stepping
    ]
    return max(0.0, deadline - now) if expected else 0.0


class DecodeRhythms:
    """Per-session step rhythm (keyed weakly by the session's cache) and the typical pass time."""

    def __init__(self) -> None:
        self._rhythms: weakref.WeakKeyDictionary[object, _Rhythm] = weakref.WeakKeyDictionary()
        self.pass_time: float | None = None

    def arrived(self, session: object, now: float) -> None:
        rhythm = self._rhythms.get(session)
        if rhythm is not None:
            rhythm.turnaround = smoothed(rhythm.turnaround, max(0.0, now - rhythm.delivered_at))
            rhythm.waiting = True

    def delivered(self, session: object, now: float) -> None:
        rhythm = self._rhythms.setdefault(session, _Rhythm(delivered_at=now))
        rhythm.delivered_at, rhythm.waiting = now, False

    def passed(self, seconds: float) -> None:
        self.pass_time = smoothed(self.pass_time, seconds)

    def delay(self, now: float, free_since: float) -> float:
        idle = [r for r in list(self._rhythms.values()) if not r.waiting]
        return gather_delay(now, free_since, self.pass_time, idle)
