"""Open inference sessions: each owns a KV cache for its sub-span and a budget reservation."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import DynamicCache

from corolla.errors import BadRequest
from corolla.runtime.kv_cache import CacheBudget, Reservation


@dataclass
class Session:
    id: int
    start: int
    end: int
    max_length: int
    batch_size: int
    cache: DynamicCache
    reservation: Reservation
    deadline: float
    length: int = 0  # tokens already in the cache
    opened_at: float = field(default_factory=time.monotonic)
    key: str | None = None  # the client's session id, for pushes from the previous server
    push_to: Any = None  # PushTarget: where to push this session's outputs
    adapter: str | None = None  # the LoRA adapter this session computes with
    last_step_id: int = -1  # steps with an id not above this one were already run
    pushed: asyncio.Queue = field(default_factory=asyncio.Queue)  # inputs pushed by the previous server

    def check_step(self, position: int, batch_size: int, new_tokens: int) -> None:
        """Raise ``BadRequest`` for a step that does not fit this session."""
        if batch_size != self.batch_size:
            raise BadRequest(
                f"step has batch size {batch_size}, the session was opened with {self.batch_size}"
            )
        if position > self.length:
            raise BadRequest(
                f"step starts at position {position} but the session holds only {self.length} tokens"
            )
        if position + new_tokens > self.max_length:
            raise BadRequest(
                f"session would exceed its max_length {self.max_length} ({position} + {new_tokens} tokens); "
                "open a session with a larger max_length"
            )


class SessionTable:
    """All live sessions of one server, and the budget they share."""

    def __init__(self, budget: CacheBudget) -> None:
        self.budget = budget
        self._sessions: dict[int, Session] = {}
        self._by_key: dict[str, Session] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    def open(
        self, *, start: int, end: int, max_length: int, batch_size: int, cache: DynamicCache, timeout: float
    ) -> Session:
        reservation = self.budget.reserve(max_length * batch_size * (end - start))
        session = Session(
            next(self._ids),
            start,
            end,
            max_length,
            batch_size,
            cache,
            reservation,
            deadline=time.monotonic() + timeout,
        )
        self._sessions[session.id] = session
        return session

    def register_key(self, session: Session, key: str | None) -> None:
        if key is not None and key not in self._by_key:
            session.key = key
            self._by_key[key] = session

    def find(self, key: str) -> Session | None:
        return self._by_key.get(key)

    def close(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if session.key is not None:
            self._by_key.pop(session.key, None)
        self.budget.release(session.reservation)
        session.cache = None  # type: ignore[assignment]  # free the tensors now
