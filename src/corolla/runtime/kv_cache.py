"""The server's attention-cache budget, counted in token-blocks (tokens x blocks)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from corolla.errors import AllocationFailed


def cache_bytes_per_token_block(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token occupies in one block."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Reservation:
    token_blocks: int
    released: bool = False


class CacheBudget:
    """Thread-safe accounting: sessions reserve their whole cache up front, release it on close.

    ``reserve`` fails at once when the budget is full; ``reserve_waiting`` waits (asyncio) for
    sessions to close, woken by each ``release``. Nothing is ever taken from a live reservation."""

    def __init__(self, total_token_blocks: int) -> None:
        self.total = total_token_blocks
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def used(self) -> int:
        return self._used

    @property
    def left(self) -> int:
        return self.total - self._used

    @property
    def waiting(self) -> int:
        """Reservations now waiting for room."""
        with self._lock:
            return len(self._waiters)

    def _refusal(self, token_blocks: int, waited: float | None = None) -> AllocationFailed:
        after = f" after waiting {waited:g} s, its --max_alloc_timeout" if waited else ""
        return AllocationFailed(
            f"this server's attention cache cannot hold {token_blocks} more token-blocks "
            f"({self.total - self._used} of {self.total} free{after}); ask for a shorter max_length "
            "or use another server"
        )

    def _try_reserve(self, token_blocks: int) -> Reservation | None:
        """Under the lock: the reservation, or None when it does not fit now."""
        if token_blocks > self.total - self._used:
            return None
        self._used += token_blocks
        return Reservation(token_blocks)

    def reserve(self, token_blocks: int) -> Reservation:
        with self._lock:
            reservation = self._try_reserve(token_blocks)
            if reservation is None:
                raise self._refusal(token_blocks)
            return reservation

    async def reserve_waiting(self, token_blocks: int, timeout: float) -> Reservation:
        """Reserve, waiting up to ``timeout`` seconds for other reservations to be released; then
        ``AllocationFailed``. A request larger than the whole budget fails at once."""
        if timeout <= 0 or token_blocks > self.total:
            return self.reserve(token_blocks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                reservation = self._try_reserve(token_blocks)
                if reservation is not None:
                    return reservation
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._refusal(token_blocks, timeout)
                waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] = (loop, loop.create_future())
                self._waiters.append(waiter)  # registered under the lock: no release is missed
            try:
                await asyncio.wait({waiter[1]}, timeout=remaining)
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            self._used -= reservation.token_blocks
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:  # each retries, in the order they started waiting
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
