"""Server records and spans for hand-made swarm states."""

from __future__ import annotations

from typing import Any

from corolla.protocol.records import ServerInfo, ServerState
from corolla.swarm.spans import ServerSpan


def record(
    start: int,
    end: int,
    *,
    state: ServerState = ServerState.ONLINE,
    throughput: float = 1.0,
    **overrides: Any,
) -> ServerInfo:
    """A valid record announcing blocks ``start:end``; ``overrides`` set any other field."""
    values: dict[str, Any] = {
        "state": state,
        "start_block": start,
        "end_block": end,
        "throughput": throughput,
        "torch_dtype": "float32",
        "version": "0.1.0",
        "max_inference_length": 1024,
        "cache_tokens_left": 4096,
    }
    values.update(overrides)
    return ServerInfo(**values)


def span(
    peer_id: str,
    start: int,
    end: int,
    throughput: float = 1.0,
    *,
    state: ServerState = ServerState.ONLINE,
    **overrides: Any,
) -> ServerSpan:
    """Server ``peer_id`` holding blocks ``start:end``, with a matching :func:`record`."""
    return ServerSpan(
        peer_id, start, end, record(start, end, state=state, throughput=throughput, **overrides)
    )
