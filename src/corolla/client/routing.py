"""Pure routing policy: a chain of servers covering blocks ``[start, end)``.

Three policies over the same swarm view (a list of ``ServerSpan``):

- ``make_route``: fewest hops (greedy: from each position, the server reaching furthest).
- ``latency_route``: for inference, the least expected latency per step: per hop, the client's
  round trip to the server plus the compute time of its blocks, plus a small per-hop penalty,
  plus ``RELAY_PENALTY`` for a server reached through a relay (it announces only ``/p2p-circuit``
  addresses): its measured round trip already counts the relay's detour, the penalty makes a
  direct server holding the same blocks win unless it is much slower.
- ``throughput_route``: for forward/backward on long sequences, the chain whose slowest server is
  fastest (the bottleneck), then fewest hops.

Each returns ``None`` when some block has no usable (not banned) server, and ``[]`` for an
empty range. Ties are broken deterministically, whatever the order of ``spans``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from corolla.swarm.maddrs import is_relayed
from corolla.swarm.spans import ServerSpan

DEFAULT_RTT = 0.05  # s: a server the client has not measured yet
HOP_PENALTY = 0.002  # s per hop: one more RPC to encode, schedule and decode
MIN_THROUGHPUT = 1.0  # tokens/s per block: the floor for servers announcing 0 (1 s per block)
RELAY_PENALTY = 0.05  # s per hop through a relay: a third party's uplink and limits on the way


def relayed(span: ServerSpan) -> bool:
    """Whether the server is reached through a relay (behind NAT): its first address is a circuit."""
    return bool(span.info.addrs) and is_relayed(span.info.addrs[0])


@dataclass(frozen=True)
class Hop:
    """Run blocks ``start..end-1`` on server ``peer_id``."""

    peer_id: str
    start: int
    end: int
    dtype: str = field(default="float32", compare=False)  # the server's: activations travel in it


def make_route(
    spans: list[ServerSpan], start: int, end: int, *, banned: frozenset[str] = frozenset()
) -> list[Hop] | None:
    """Fewest hops first: from each position take the server reaching furthest (ties: a direct
    server, higher throughput, then peer id). ``None`` when some block has no usable server."""
    usable = [s for s in spans if s.peer_id not in banned]
    route: list[Hop] = []
    position = start
    while position < end:
        candidates = [s for s in usable if s.start <= position < s.end]
        if not candidates:
            return None
        best = max(candidates, key=lambda s: (min(s.end, end), not relayed(s), s.info.throughput, s.peer_id))
        hop_end = min(best.end, end)
        route.append(Hop(best.peer_id, position, hop_end, best.info.torch_dtype))
        position = hop_end
    return route


# --- least latency per inference step -----------------------------------------------------------


@dataclass(frozen=True)
class LatencyModel:
    """Expected seconds per inference step: per hop, the round trip to its server (``rtt``,
    unmeasured: ``default_rtt``) + its blocks / the server's throughput (at least
    ``min_throughput``) + ``hop_penalty`` (+ ``relay_penalty`` through a relay)."""

    rtt: Mapping[str, float]
    default_rtt: float = DEFAULT_RTT
    hop_penalty: float = HOP_PENALTY
    min_throughput: float = MIN_THROUGHPUT
    relay_penalty: float = RELAY_PENALTY

    def hop(self, span: ServerSpan, blocks: int) -> float:
        rtt = self.rtt.get(span.peer_id, self.default_rtt)
        penalty = self.hop_penalty + (self.relay_penalty if relayed(span) else 0.0)
        return rtt + penalty + blocks / max(span.info.throughput, self.min_throughput)

    def route(self, route: list[Hop], spans: list[ServerSpan]) -> float:
        """The expected latency of ``route``, whose servers are among ``spans``."""
        by_peer = {s.peer_id: s for s in spans}
        return sum(self.hop(by_peer[h.peer_id], h.end - h.start) for h in route)


@dataclass(frozen=True)
class _Label:
    """The best way found so far to reach a block boundary: its cost and its last hop."""

    cost: float
    hops: int
    last: Hop | None  # None at the start position


def latency_route(
    spans: list[ServerSpan],
    start: int,
    end: int,
    *,
    rtt: Mapping[str, float],
    banned: frozenset[str] = frozenset(),
    default_rtt: float = DEFAULT_RTT,
    hop_penalty: float = HOP_PENALTY,
    min_throughput: float = MIN_THROUGHPUT,
) -> list[Hop] | None:
    """The chain with the least expected latency per inference step (see ``LatencyModel``).

    A shortest path over the block boundaries ``start..end``: a server with ``s.start <= p < s.end``
    takes the sequence from ``p`` to any ``q`` in ``(p, min(s.end, end)]``. Every edge goes forward,
    so one pass in order of position is exact. Ties: fewer hops, then smaller (peer id, -end) hops."""
    if start >= end:
        return []
    model = LatencyModel(rtt, default_rtt, hop_penalty, min_throughput)
    usable = sorted((s for s in spans if s.peer_id not in banned), key=lambda s: (s.peer_id, s.start, s.end))
    labels: dict[int, _Label] = {start: _Label(0.0, 0, None)}
    for position in range(start, end):
        if position in labels:
            for span in usable:
                if span.start <= position < span.end:
                    _relax(labels, model, span, position, end)
    return _trace(labels, labels[end]) if end in labels else None


def _relax(labels: dict[int, _Label], model: LatencyModel, span: ServerSpan, position: int, end: int) -> None:
    """Offer every hop of ``span`` from ``position`` to the boundaries it can reach."""
    here = labels[position]
    for to in range(position + 1, min(span.end, end) + 1):
        label = _Label(
            here.cost + model.hop(span, to - position),
            here.hops + 1,
            Hop(span.peer_id, position, to, span.info.torch_dtype),
        )
        current = labels.get(to)
        if current is None or _better(label, current, labels):
            labels[to] = label


def _better(new: _Label, old: _Label, labels: dict[int, _Label]) -> bool:
    if not math.isclose(new.cost, old.cost, rel_tol=1e-9, abs_tol=1e-12):
        return new.cost < old.cost
    if new.hops != old.hops:
        return new.hops < old.hops
    return _tie_key(labels, new) < _tie_key(labels, old)


def _tie_key(labels: dict[int, _Label], label: _Label) -> tuple[tuple[str, int], ...]:
    """The route ending with ``label`` as comparable hops, first hop first."""
    return tuple((h.peer_id, -h.end) for h in _trace(labels, label))


def _trace(labels: dict[int, _Label], label: _Label) -> list[Hop]:
    """The hops of the route that ends with ``label``, first hop first."""
    hops: list[Hop] = []
    while label.last is not None:
        hops.append(label.last)
        label = labels[label.last.start]
    return hops[::-1]


# --- most throughput for long sequences ------------------------------------------------------


def throughput_route(
    spans: list[ServerSpan], start: int, end: int, *, banned: frozenset[str] = frozenset()
) -> list[Hop] | None:
    """The chain whose slowest server has the highest throughput; among those, the fewest hops
    (``make_route`` over the servers at least that fast)."""
    usable = [s for s in spans if s.peer_id not in banned]
    for floor in sorted({s.info.throughput for s in usable}, reverse=True):
        route = make_route([s for s in usable if s.info.throughput >= floor], start, end)
        if route is not None:
            return route
    return [] if start >= end else None


def bottleneck(route: list[Hop], spans: list[ServerSpan]) -> float:
    """The lowest announced throughput along ``route`` (``inf`` for an empty route)."""
    by_peer = {s.peer_id: s for s in spans}
    return min((by_peer[h.peer_id].info.throughput for h in route), default=math.inf)
