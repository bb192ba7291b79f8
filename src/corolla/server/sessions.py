"""Open inference sessions: each owns a KV cache for its sub-span and a budget reservation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import DynamicCache

from corolla.errors import AllocationFailed, BadRequest
from corolla.runtime.kv_cache import CacheBudget, Reservation

MAX_PENDING_PUSHES = 4  # pushed steps a session holds before it runs them (normally at most one)


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
    reply_dtype: str | None = None  # the dtype its outputs travel in (None: the backend's)
    last_step_id: int = -1  # steps with an id not above this one were already run
    received_step: int = -1  # the last step id read from the client's stream (for StreamProbe)
    pushed: asyncio.Queue = field(  # inputs pushed by the previous server
        default_factory=lambda: asyncio.Queue(MAX_PENDING_PUSHES)
    )
    peer: str | None = None  # the client peer that opened it (--max_sessions_per_peer)

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
    """All live sessions of one server, and the budget they share.

    ``open`` fails at once when the budget is full, ``open_waiting`` waits up to ``alloc_timeout``
    seconds (``--max_alloc_timeout``) for other sessions to close. With ``peer`` and ``max_per_peer``
    a client peer has at most that many sessions here, those still waiting for room included."""

    def __init__(self, budget: CacheBudget) -> None:
        self.budget = budget
        self._sessions: dict[int, Session] = {}
        self._by_key: dict[str, Session] = {}
        self._per_peer: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions_of(self, peer: str) -> int:
        """Sessions of ``peer`` open or waiting for room."""
        return self._per_peer[peer]

    def open(
        self,
        *,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        cache: DynamicCache,
        timeout: float,
        peer: str | None = None,
        max_per_peer: int | None = None,
    ) -> Session:
        with self._claimed(peer, max_per_peer):
            reservation = self.budget.reserve(max_length * batch_size * (end - start))
        return self._add(start, end, max_length, batch_size, cache, reservation, timeout, peer)

    async def open_waiting(
        self,
        *,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        cache: DynamicCache,
        timeout: float,
        alloc_timeout: float,
        peer: str | None = None,
        max_per_peer: int | None = None,
    ) -> Session:
        token_blocks = max_length * batch_size * (end - start)
        with self._claimed(peer, max_per_peer):  # also released if the stream goes away while waiting
            reservation = await self.budget.reserve_waiting(token_blocks, alloc_timeout)
        return self._add(start, end, max_length, batch_size, cache, reservation, timeout, peer)

    @contextlib.contextmanager
    def _claimed(self, peer: str | None, max_per_peer: int | None) -> Iterator[None]:
        """A slot of ``peer``'s (``AllocationFailed`` past ``max_per_peer``), given back if the
        block fails: a refused or abandoned session counts for nobody."""
        self._claim(peer, max_per_peer)
        try:
            yield
        except BaseException:
            self._unclaim(peer)
            raise

    def _claim(self, peer: str | None, max_per_peer: int | None) -> None:
        if peer is None:
            return
        if max_per_peer is not None and self._per_peer[peer] >= max_per_peer:
            raise AllocationFailed(
                f"peer ...{peer[-8:]} already has {self._per_peer[peer]} sessions on this server, the most "
                f"its --max_sessions_per_peer {max_per_peer} allows; close one or use another server"
            )
        self._per_peer[peer] += 1

    def _unclaim(self, peer: str | None) -> None:
        if peer is not None:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]

    def _add(
        self,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        cache: DynamicCache,
        reservation: Reservation,
        timeout: float,
        peer: str | None,
    ) -> Session:
        session = Session(
            next(self._ids),
            start,
            end,
            max_length,
            batch_size,
            cache,
            reservation,
            deadline=time.monotonic() + timeout,
            peer=peer,
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
        """Release the session's budget and cache; closing twice is harmless."""
        if self._sessions.pop(session.id, None) is not None:
            self._unclaim(session.peer)
        if session.key is not None and self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        self.budget.release(session.reservation)
        session.cache = None  # type: ignore[assignment]  # free the tensors now
