"""Where in the model a server sits: choosing its span on arrival and revisiting it later.

The policy is pure (``corolla.swarm.balance``); this module reads the swarm for it and
announces the choices."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from hivemind import DHT

from corolla.protocol.records import ServerState
from corolla.swarm.balance import block_throughputs, choose_span, should_move
from corolla.swarm.registry import fetch_block_records
from corolla.swarm.spans import ServerSpan, spans_from_records

logger = logging.getLogger(__name__)

Span = tuple[int, int]
JOIN_DELAY = (0.5, 2.5)  # seconds: random wait before re-reading the swarm after announcing JOINING
JOIN_ROUNDS = 3


def swarm_spans(
    dht: DHT, dht_prefix: str, num_blocks: int, *, exclude: str | None = None
) -> list[ServerSpan]:
    """Servers that are joining or online, optionally without one peer (this server)."""
    records = fetch_block_records(dht, dht_prefix, num_blocks)
    spans = spans_from_records(records, states=(ServerState.JOINING, ServerState.ONLINE))
    return [s for s in spans if s.peer_id != exclude]


def best_span(others: list[ServerSpan], num_blocks: int, length: int) -> Span:
    """The least-served span of ``length`` blocks, given the other servers."""
    return choose_span(block_throughputs(others, num_blocks), length)


def yields_to_me(others: list[ServerSpan], span: Span, me: str) -> bool:
    """True when other servers still JOINING on exactly ``span`` all have larger peer ids: they
    move away and this server keeps the span (servers starting together break ties by id)."""
    rivals = [s for s in others if (s.start, s.end) == span and s.info.state == ServerState.JOINING]
    return bool(rivals) and all(r.peer_id > me for r in rivals)


async def settle_span(
    dht: DHT,
    dht_prefix: str,
    num_blocks: int,
    length: int,
    me: str,
    announce: Callable[[ServerState, Span], None],
) -> Span:
    """Pick a span, announce it as JOINING, wait a random moment and re-read the swarm, re-choosing
    while another server took the span meanwhile (servers starting together spread out)."""
    others = await asyncio.to_thread(swarm_spans, dht, dht_prefix, num_blocks, exclude=me)
    span = best_span(others, num_blocks, length)
    logger.info("blocks %d:%d are the least served span of %d blocks among %d known server(s)",
                *span, length, len(others))  # fmt: skip
    for _ in range(JOIN_ROUNDS):
        await asyncio.to_thread(announce, ServerState.JOINING, span)
        await asyncio.sleep(random.uniform(*JOIN_DELAY))
        others = await asyncio.to_thread(swarm_spans, dht, dht_prefix, num_blocks, exclude=me)
        again = best_span(others, num_blocks, length)
        if again == span or yields_to_me(others, span, me):
            return span
        logger.info("another server took blocks %d:%d meanwhile; choosing %d:%d instead", *span, *again)
        await asyncio.to_thread(announce, ServerState.OFFLINE, span)  # withdraw the old JOINING record
        span = again
    return span


def rebalance_target(
    dht: DHT, dht_prefix: str, num_blocks: int, me: str, balance_quality: float, rng: random.Random
) -> Span | None:
    """The span this server should move to, or None to stay (``should_move`` decides)."""
    spans = swarm_spans(dht, dht_prefix, num_blocks)
    if me not in {s.peer_id for s in spans}:
        return None  # our own record is not visible yet; decide next time
    pinned = frozenset(s.peer_id for s in spans if s.info.pinned)
    return should_move(spans, me, num_blocks, balance_quality, rng, pinned=pinned)
