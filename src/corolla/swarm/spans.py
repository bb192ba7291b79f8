"""Pure functions: DHT records -> server spans and block coverage."""

from __future__ import annotations

from dataclasses import dataclass

from corolla.protocol.records import ServerInfo, ServerState


@dataclass(frozen=True)
class ServerSpan:
    """One server as the swarm sees it: the blocks it announced and its record."""

    peer_id: str
    start: int
    end: int
    info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start


BlockRecords = list[dict[str, ServerInfo]]  # per block index: peer id -> record


def spans_from_records(
    block_records: BlockRecords, *, states: tuple[ServerState, ...] = (ServerState.ONLINE,)
) -> list[ServerSpan]:
    """One span per server in ``states``: the longest run of consecutive blocks listed under one
    and the same record of that server (a restarted server may leave stale records elsewhere)."""
    listed: dict[tuple[str, ServerInfo], list[int]] = {}
    for index, records in enumerate(block_records):
        for peer_id, info in records.items():
            if info.state in states and info.start_block <= index < info.end_block:
                listed.setdefault((peer_id, info), []).append(index)
    best: dict[str, ServerSpan] = {}
    for (peer_id, info), indices in listed.items():
        start, end = _longest_run(indices)
        current = best.get(peer_id)
        if current is None or end - start > current.length:
            best[peer_id] = ServerSpan(peer_id, start, end, info)
    return sorted(best.values(), key=lambda s: (s.start, s.end, s.peer_id))


def _longest_run(indices: list[int]) -> tuple[int, int]:
    best = (indices[0], indices[0] + 1)
    start = prev = indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        if prev + 1 - start > best[1] - best[0]:
            best = (start, prev + 1)
        if i is not None:
            start = prev = i
    return best


def coverage(spans: list[ServerSpan], num_blocks: int) -> list[int]:
    """How many servers hold each block."""
    counts = [0] * num_blocks
    for span in spans:
        for i in range(span.start, min(span.end, num_blocks)):
            counts[i] += 1
    return counts


def missing_blocks(spans: list[ServerSpan], num_blocks: int) -> list[int]:
    return [i for i, n in enumerate(coverage(spans, num_blocks)) if n == 0]
