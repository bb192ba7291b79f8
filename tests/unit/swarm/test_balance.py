from __future__ import annotations

import pytest

from corolla.swarm.balance import block_throughputs, choose_span
from helpers.swarm import span


def test_block_throughputs_sum_overlapping_servers() -> None:
    spans = [span("a", 0, 3, 2.0), span("b", 2, 5, 0.5), span("c", 4, 9, 1.0)]
    assert block_throughputs(spans, 6) == [2.0, 2.0, 2.5, 0.5, 1.5, 1.0]
    assert block_throughputs([], 3) == [0.0, 0.0, 0.0]


def test_empty_swarm_starts_at_block_zero() -> None:
    assert choose_span([0.0] * 10, 4) == (0, 4)


def test_uncovered_blocks_come_first() -> None:
    # blocks 0..3 are served, 4..7 are not
    assert choose_span([5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0], 4) == (4, 8)


def test_more_uncovered_blocks_beat_lower_throughput() -> None:
    # windows 0..2 and 1..3 hold the hole but lots of throughput; 3..5 has no hole and is nearly idle
    throughputs = [100.0, 0.0, 50.0, 0.1, 0.1]
    assert choose_span(throughputs, 2) == (1, 3)


def test_partial_hole_is_covered_by_the_window_with_most_holes() -> None:
    throughputs = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert choose_span(throughputs, 3) == (0, 3)
    assert choose_span(throughputs, 2) == (1, 3)


def test_least_throughput_next() -> None:
    throughputs = [3.0, 3.0, 1.0, 1.0, 2.0, 2.0]
    assert choose_span(throughputs, 2) == (2, 4)


def test_ties_go_to_the_lowest_start() -> None:
    assert choose_span([1.0, 1.0, 1.0, 1.0], 2) == (0, 2)
    assert choose_span([2.0, 1.0, 1.0, 2.0, 1.0, 1.0], 2) == (1, 3)
    assert choose_span([0.0, 1.0, 0.0, 1.0], 1) == (0, 1)


def test_choice_is_deterministic() -> None:
    throughputs = [0.5, 0.25, 0.25, 0.5, 0.25, 0.25]
    assert {choose_span(throughputs, 2) for _ in range(20)} == {(1, 3)}


@pytest.mark.parametrize("length", [6, 7, 100])
def test_length_is_capped_at_model_size(length: int) -> None:
    assert choose_span([1.0, 0.0, 2.0, 0.0, 0.0, 3.0], length) == (0, 6)


def test_single_block() -> None:
    assert choose_span([4.0, 2.0, 3.0], 1) == (1, 2)


def test_new_server_fills_the_gap_left_by_the_swarm() -> None:
    spans = [span("a", 0, 10, 1.0), span("b", 15, 30, 1.0)]
    assert choose_span(block_throughputs(spans, 30), 5) == (10, 15)
    # a longer server still covers the whole gap and then the least-served neighbours
    assert choose_span(block_throughputs(spans + [span("c", 0, 10, 1.0)], 30), 8) == (10, 18)
