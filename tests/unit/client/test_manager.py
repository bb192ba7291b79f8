from __future__ import annotations

from corolla.client.manager import _connection_reset
from corolla.client.transport import STREAM_LOST
from corolla.errors import RemoteError, ServerUnavailable


def test_a_reset_connection_is_told_apart_from_a_failing_server() -> None:
    assert _connection_reset(ConnectionResetError(104, "Connection reset by peer"))
    assert _connection_reset(RemoteError("server ...x failed: ConnectionResetError: [Errno 104] ..."))
    assert _connection_reset(RuntimeError("stream reset"))
    assert _connection_reset(ServerUnavailable(f"server ...x never got the step: {STREAM_LOST}"))
    assert not _connection_reset(ServerUnavailable("the server is shutting down; retry with another server"))
    assert not _connection_reset(TimeoutError())
