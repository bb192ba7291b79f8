"""Pure routing policy: a chain of servers covering blocks ``[start, end)``."""

from __future__ import annotations

from dataclasses import dataclass

from corolla.swarm.spans import ServerSpan


@dataclass(frozen=True)
class Hop:
    """Run blocks ``start..end-1`` on server ``peer_id``."""

    peer_id: str
    start: int
    end: int


def make_route(
    spans: list[ServerSpan], start: int, end: int, *, banned: frozenset[str] = frozenset()
) -> list[Hop] | None:
    """Fewest hops first: from each position take the server reaching furthest (ties: higher
    throughput, then peer id). ``None`` when some block has no usable server."""
    usable = [s for s in spans if s.peer_id not in banned]
    route: list[Hop] = []
    position = start
    while position < end:
        candidates = [s for s in usable if s.start <= position < s.end]
        if not candidates:
            return None
        best = max(candidates, key=lambda s: (min(s.end, end), s.info.throughput, s.peer_id))
        hop_end = min(best.end, end)
        route.append(Hop(best.peer_id, position, hop_end))
        position = hop_end
    return route
