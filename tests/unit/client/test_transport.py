"""When a step whose reply has not come counts as lost with its stream (``transport._lost``)."""

from __future__ import annotations

from corolla.client.transport import _lost
from corolla.protocol.messages import StreamState


def test_a_step_is_lost_when_the_server_lacks_it_or_ran_it_without_the_reply_arriving() -> None:
    assert _lost(StreamState(), 3) == "does not hold the session"
    assert _lost(StreamState(known=True, received=2, done=2), 3) == "never got the step"
    assert _lost(StreamState(known=True, received=3, done=3), 3) == "ran the step and its reply did not come"
    assert _lost(StreamState(known=True, received=2, done=3), 3) is not None  # ran it from a push


def test_a_step_the_server_holds_and_has_not_run_yet_is_not_lost() -> None:
    assert _lost(StreamState(known=True, received=3, done=2), 3) is None  # queued or computing
    assert _lost(StreamState(known=True, received=0), 0) is None  # a replay (step id 0) running
    assert _lost(None, 3) is None  # an older server that does not say: wait for the step timeout
