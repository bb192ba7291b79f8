"""The rebalancing decision and the no-disconnect rule, on hand-made swarm states."""

from __future__ import annotations

import random

import pytest

from corolla.swarm.balance import bottleneck, leaving_disconnects, should_move
from corolla.swarm.spans import ServerSpan
from helpers.swarm import span


def move(spans: list[ServerSpan], me: str, num_blocks: int, quality: float = 0.75, **kw) -> tuple | None:
    return should_move(spans, me, num_blocks, quality, random.Random(0), **kw)


# two servers share 0:10, one holds 10:20, nobody holds 20:30
CROWDED = [span("a", 0, 10), span("b", 0, 10), span("c", 10, 20)]
# every third of the model held by two equal servers
BALANCED = [span(p, s, s + 10) for p, s in [("a", 0), ("d", 0), ("b", 10), ("e", 10), ("c", 20), ("f", 20)]]


def test_bottleneck_is_the_weakest_block() -> None:
    assert bottleneck([3.0, 1.5, 2.0]) == 1.5
    assert bottleneck([3.0, 0.0]) == 0.0
    assert bottleneck([]) == 0.0


def test_server_on_an_over_served_span_moves_to_uncovered_blocks() -> None:
    assert move(CROWDED, "a", 30) == (20, 30)
    assert move(CROWDED, "b", 30) == (20, 30)


def test_sole_holder_of_blocks_stays() -> None:
    assert move(CROWDED, "c", 30) is None


def test_fewer_uncovered_blocks_is_a_gain_even_when_the_bottleneck_stays_zero() -> None:
    # 40 blocks: after a moves to 20:30, blocks 30:40 are still uncovered, but 10 fewer than before
    assert move(CROWDED, "a", 40) == (20, 30)


def test_well_balanced_swarm_does_not_move() -> None:
    for server in BALANCED:
        assert move(BALANCED, server.peer_id, 30) is None
        assert move(BALANCED, server.peer_id, 30, quality=1.0) is None


def test_move_only_when_the_gain_beats_the_balance_quality() -> None:
    # two blocks, totals [4, 2]; a (1.0) moving to block 1 makes them [3, 3]: current/new = 2/3
    spans = [span("a", 0, 1, 1.0), span("x", 0, 1, 3.0), span("y", 1, 2, 2.0)]
    assert move(spans, "a", 2, quality=0.75) == (1, 2)
    assert move(spans, "a", 2, quality=1.0) == (1, 2)
    assert move(spans, "a", 2, quality=0.6) is None


def test_balance_quality_zero_never_moves() -> None:
    assert move(CROWDED, "a", 30, quality=0.0) is None
    assert move(CROWDED, "a", 40, quality=0.0) is None


def test_balance_quality_above_one_always_moves_to_the_best_other_span() -> None:
    # a's partner d still holds 0:10; the least-served window other than 0:10 is 1:11
    assert move(BALANCED, "a", 30, quality=1.5) == (1, 11)
    assert move(BALANCED, "c", 30, quality=1.5) == (19, 29)


def test_forced_move_still_respects_the_no_disconnect_rule() -> None:
    assert move(CROWDED, "c", 30, quality=2.0) is None


def test_forced_move_has_nowhere_to_go_when_the_span_is_the_whole_model() -> None:
    spans = [span("a", 0, 10), span("b", 0, 10)]
    assert move(spans, "a", 10, quality=2.0) is None


def test_unknown_server_does_not_move() -> None:
    assert move(CROWDED, "zz", 30) is None
    assert move(CROWDED, "zz", 30, quality=2.0) is None


def test_leaving_disconnects() -> None:
    assert not leaving_disconnects(CROWDED, "a", 30)
    assert leaving_disconnects(CROWDED, "c", 30)
    assert not leaving_disconnects(CROWDED, "nobody", 30)
    assert not leaving_disconnects([span("a", 0, 20), span("c", 10, 20)], "c", 20)
    # one block held by c alone is enough: c is the only one on blocks 10 and 11
    assert leaving_disconnects([span("a", 0, 10), span("c", 9, 20), span("d", 12, 20)], "c", 20)


def test_no_disconnect_rule_blocks_an_otherwise_winning_move() -> None:
    # 12 blocks: 8:12 are uncovered; a is the only server on blocks 2:4, x holds 0:2 too
    shared = [span("b", 4, 8), span("c", 4, 8)]
    alone = [span("a", 0, 4), span("x", 0, 2), *shared]
    covered = [span("a", 0, 4), span("x", 0, 4), *shared]
    # without the rule a would go: its move uncovers 2 blocks but covers 4
    assert move(covered, "a", 12) == (8, 12)
    assert leaving_disconnects(alone, "a", 12)
    assert move(alone, "a", 12) is None
    assert move(alone, "a", 12, quality=2.0) is None


def test_pinned_servers_do_not_move_in_the_simulation() -> None:
    # totals per block: [2, 2, 6, 4], bottleneck 2. a (3.0) moves from block 2 to block 0: [5, 2, 3, 4];
    # then d (1.0) re-chooses block 1: [5, 3, 3, 3], bottleneck 3, 2/3 < 0.75 -> a moves.
    # With d pinned, the simulated bottleneck stays 2 -> a stays.
    spans = [span("a", 2, 3, 3.0), span("b", 2, 4, 3.0), span("c", 0, 2, 2.0), span("d", 3, 4, 1.0)]
    assert move(spans, "a", 4) == (0, 1)
    assert move(spans, "a", 4, pinned=frozenset({"d"})) is None
    assert move(spans, "a", 4, pinned=frozenset({"b", "c"})) == (0, 1)


@pytest.mark.parametrize("seed", range(5))
def test_decision_does_not_depend_on_the_random_order_here(seed: int) -> None:
    spans = [span("a", 2, 3, 3.0), span("b", 2, 4, 3.0), span("c", 0, 2, 2.0), span("d", 3, 4, 1.0)]
    assert should_move(spans, "a", 4, 0.75, random.Random(seed)) == (0, 1)


def test_joining_records_and_spans_past_the_model_end_are_tolerated() -> None:
    spans = [span("a", 0, 10), span("b", 0, 12), span("c", 10, 20)]
    assert move(spans, "a", 30) == (20, 30)
