"""Which servers the client avoids for now: a failure bans a server with exponential back-off."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Strikes:
    count: int
    until: float


class BanList:
    """``ban(peer)`` keeps a server out of routes for ``base * 2**(failures - 1)`` seconds (at most
    ``cap``); a success (``forgive``) resets its record. Thread-safe; the clock is injectable."""

    def __init__(self, base: float = 15.0, cap: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.base, self.cap, self.clock = base, cap, clock
        self._strikes: dict[str, _Strikes] = {}
        self._lock = threading.Lock()

    def ban(self, peer_id: str) -> float:
        """Ban ``peer_id``; returns the ban's length in seconds."""
        with self._lock:
            count = self._strikes[peer_id].count + 1 if peer_id in self._strikes else 1
            duration = min(self.cap, self.base * 2 ** (count - 1))
            self._strikes[peer_id] = _Strikes(count, self.clock() + duration)
            return duration

    def forgive(self, peer_id: str) -> None:
        with self._lock:
            self._strikes.pop(peer_id, None)

    def banned(self) -> frozenset[str]:
        """Peers banned right now."""
        now = self.clock()
        with self._lock:
            return frozenset(peer for peer, strikes in self._strikes.items() if strikes.until > now)
