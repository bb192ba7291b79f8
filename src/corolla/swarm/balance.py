"""Pure block-choice policy: which contiguous span a new server should host."""

from __future__ import annotations

from corolla.swarm.spans import ServerSpan


def block_throughputs(spans: list[ServerSpan], num_blocks: int) -> list[float]:
    """Total announced throughput serving each block."""
    totals = [0.0] * num_blocks
    for span in spans:
        for i in range(span.start, min(span.end, num_blocks)):
            totals[i] += span.info.throughput
    return totals


def choose_span(throughputs: list[float], length: int) -> tuple[int, int]:
    """The window of ``length`` blocks whose blocks are served least, uncovered blocks first.

    Windows are ranked by (number of uncovered blocks, descending), then by total served
    throughput, then by start index, so the choice is deterministic."""
    num_blocks = len(throughputs)
    length = min(length, num_blocks)

    def rank(start: int) -> tuple[int, float, int]:
        window = throughputs[start : start + length]
        return (-sum(1 for t in window if t <= 0), sum(window), start)

    best = min(range(num_blocks - length + 1), key=rank)
    return best, best + length
