from __future__ import annotations

import pytest

from corolla.client.routing import Hop, make_route
from corolla.protocol.records import ServerInfo, ServerState
from corolla.swarm.spans import ServerSpan


def span(peer_id: str, start: int, end: int, throughput: float = 1.0) -> ServerSpan:
    record = ServerInfo(
        state=ServerState.ONLINE,
        start_block=start,
        end_block=end,
        throughput=throughput,
        torch_dtype="float32",
        version="0.1.0",
        max_inference_length=1024,
        cache_tokens_left=4096,
    )
    return ServerSpan(peer_id, start, end, record)


def test_single_server_covering_everything() -> None:
    assert make_route([span("a", 0, 30)], 0, 30) == [Hop("a", 0, 30)]


def test_chain_of_two() -> None:
    spans = [span("b", 15, 30), span("a", 0, 15)]
    assert make_route(spans, 0, 30) == [Hop("a", 0, 15), Hop("b", 15, 30)]


def test_overlapping_spans_take_fewest_hops() -> None:
    # short hops a, b, c, d could cover it in 4; x (0..6) + y (5..12) do it in 2
    spans = [
        span("a", 0, 3),
        span("b", 3, 6),
        span("c", 6, 9),
        span("d", 9, 12),
        span("x", 0, 6),
        span("y", 5, 12),
    ]
    assert make_route(spans, 0, 12) == [Hop("x", 0, 6), Hop("y", 6, 12)]


def test_overlap_is_not_run_twice() -> None:
    spans = [span("a", 0, 8), span("b", 4, 12)]
    route = make_route(spans, 0, 12)
    assert route == [Hop("a", 0, 8), Hop("b", 8, 12)]
    assert sum(h.end - h.start for h in route) == 12


def test_greedy_prefers_furthest_reach_over_earlier_start() -> None:
    spans = [span("a", 0, 4), span("b", 0, 7), span("c", 4, 10), span("d", 7, 10)]
    assert make_route(spans, 0, 10) == [Hop("b", 0, 7), Hop("d", 7, 10)]


def test_tie_on_reach_goes_to_higher_throughput_then_peer_id() -> None:
    assert make_route([span("a", 0, 4, 1.0), span("b", 0, 4, 3.0)], 0, 4) == [Hop("b", 0, 4)]
    assert make_route([span("b", 0, 4, 2.0), span("a", 0, 4, 2.0)], 0, 4) == [Hop("b", 0, 4)]
    # reach is clipped at ``end``: a longer span does not win over a faster one that also gets there
    assert make_route([span("long", 0, 9, 1.0), span("fast", 0, 4, 5.0)], 0, 4) == [Hop("fast", 0, 4)]


def test_banned_peers_are_avoided() -> None:
    spans = [span("a", 0, 10), span("b", 0, 5), span("c", 5, 10)]
    assert make_route(spans, 0, 10) == [Hop("a", 0, 10)]
    assert make_route(spans, 0, 10, banned=frozenset({"a"})) == [Hop("b", 0, 5), Hop("c", 5, 10)]


def test_banning_the_only_server_for_a_block_gives_none() -> None:
    spans = [span("a", 0, 5), span("b", 5, 10)]
    assert make_route(spans, 0, 10, banned=frozenset({"b"})) is None


def test_gap_gives_none() -> None:
    spans = [span("a", 0, 4), span("b", 5, 10)]
    assert make_route(spans, 0, 10) is None
    assert make_route(spans, 0, 4) == [Hop("a", 0, 4)]
    assert make_route(spans, 5, 10) == [Hop("b", 5, 10)]


@pytest.mark.parametrize(("start", "end"), [(0, 11), (9, 11), (10, 11)])
def test_range_past_the_last_server_gives_none(start: int, end: int) -> None:
    assert make_route([span("a", 0, 9), span("b", 9, 10)], start, end) is None


def test_range_before_the_first_server_gives_none() -> None:
    assert make_route([span("a", 2, 10)], 0, 10) is None
    assert make_route([span("a", 2, 10)], 2, 10) == [Hop("a", 2, 10)]


def test_empty_swarm_gives_none() -> None:
    assert make_route([], 0, 1) is None


def test_sub_range_inside_one_server() -> None:
    assert make_route([span("a", 0, 30)], 7, 12) == [Hop("a", 7, 12)]


def test_sub_range_across_servers() -> None:
    spans = [span("a", 0, 10), span("b", 10, 20), span("c", 20, 30)]
    assert make_route(spans, 5, 25) == [Hop("a", 5, 10), Hop("b", 10, 20), Hop("c", 20, 25)]
    assert make_route(spans, 10, 20) == [Hop("b", 10, 20)]


def test_empty_range_is_an_empty_route() -> None:
    assert make_route([span("a", 0, 4)], 2, 2) == []
