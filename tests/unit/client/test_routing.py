from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest

from corolla.client.routing import Hop, LatencyModel, bottleneck, latency_route, make_route, throughput_route
from corolla.swarm.spans import ServerSpan
from helpers.swarm import span


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


# --- latency_route ------------------------------------------------------------------------------


def test_latency_prefers_the_near_server_on_the_same_span() -> None:
    spans = [span("far", 0, 6), span("near", 0, 6)]
    assert latency_route(spans, 0, 6, rtt={"far": 0.1, "near": 0.01}) == [Hop("near", 0, 6)]
    assert latency_route(spans, 0, 6, rtt={"far": 0.01, "near": 0.1}) == [Hop("far", 0, 6)]


def test_latency_takes_two_fast_hops_over_one_long_slow_one() -> None:
    rtt = {"slow": 0.01, "f1": 0.01, "f2": 0.01}
    spans = [span("slow", 0, 10, throughput=10.0), span("f1", 0, 5, 1000.0), span("f2", 5, 10, 1000.0)]
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("f1", 0, 5), Hop("f2", 5, 10)]
    # a fast single hop beats two: one round trip fewer
    spans[0] = span("slow", 0, 10, throughput=1000.0)
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("slow", 0, 10)]


def test_latency_counts_round_trips_against_compute() -> None:
    # one hop costs 0.5 s of network; two hops 2 x 0.01 s plus 10 blocks at 100/s = 0.12 s
    spans = [span("one", 0, 10, 1000.0), span("a", 0, 5, 100.0), span("b", 5, 10, 100.0)]
    rtt = {"one": 0.5, "a": 0.01, "b": 0.01}
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("a", 0, 5), Hop("b", 5, 10)]
    rtt["one"] = 0.05
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("one", 0, 10)]


def test_latency_unknown_rtt_is_the_default() -> None:
    spans = [span("unknown", 0, 4), span("known", 0, 4)]
    assert latency_route(spans, 0, 4, rtt={"known": 0.2}) == [Hop("unknown", 0, 4)]
    assert latency_route(spans, 0, 4, rtt={"known": 0.01}) == [Hop("known", 0, 4)]
    assert latency_route(spans, 0, 4, rtt={"known": 0.2}, default_rtt=0.5) == [Hop("known", 0, 4)]


def test_latency_fewer_hops_win_ties() -> None:
    spans = [span("a", 0, 3), span("b", 3, 6), span("whole", 0, 6)]
    rtt = {"a": 0.0, "b": 0.0, "whole": 0.0}  # same compute either way: only the hop penalty differs
    assert latency_route(spans, 0, 6, rtt=rtt) == [Hop("whole", 0, 6)]
    assert latency_route(spans, 0, 6, rtt=rtt, hop_penalty=0.0) == [Hop("whole", 0, 6)]


def test_latency_switches_server_where_it_pays() -> None:
    # a is slow, b is fast; they overlap on 3..6: run as much as possible on b
    spans = [span("a", 0, 6, throughput=10.0), span("b", 3, 10, throughput=100.0)]
    rtt = {"a": 0.01, "b": 0.01}
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("a", 0, 3), Hop("b", 3, 10)]
    spans = [span("a", 0, 6, throughput=100.0), span("b", 3, 10, throughput=10.0)]
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("a", 0, 6), Hop("b", 6, 10)]


def test_latency_zero_throughput_is_slow_not_impossible() -> None:
    assert latency_route([span("zero", 0, 4, 0.0)], 0, 4, rtt={}) == [Hop("zero", 0, 4)]
    spans = [span("zero", 0, 4, 0.0), span("some", 0, 4, 5.0)]
    assert latency_route(spans, 0, 4, rtt={}) == [Hop("some", 0, 4)]


def test_latency_banned_and_gaps() -> None:
    spans = [span("a", 0, 10), span("b", 0, 5), span("c", 5, 10)]
    rtt = {"a": 0.01, "b": 0.02, "c": 0.02}
    assert latency_route(spans, 0, 10, rtt=rtt) == [Hop("a", 0, 10)]
    assert latency_route(spans, 0, 10, rtt=rtt, banned=frozenset({"a"})) == [Hop("b", 0, 5), Hop("c", 5, 10)]
    assert latency_route(spans, 0, 10, rtt=rtt, banned=frozenset({"a", "c"})) is None
    assert latency_route([span("a", 0, 4), span("b", 5, 10)], 0, 10, rtt={}) is None
    assert latency_route([span("a", 2, 10)], 0, 10, rtt={}) is None
    assert latency_route([span("a", 0, 9)], 0, 10, rtt={}) is None
    assert latency_route([], 0, 1, rtt={}) is None


def test_latency_ranges() -> None:
    spans = [span("a", 0, 10), span("b", 10, 20), span("c", 20, 30)]
    assert latency_route(spans, 5, 25, rtt={}) == [Hop("a", 5, 10), Hop("b", 10, 20), Hop("c", 20, 25)]
    assert latency_route(spans, 12, 18, rtt={}) == [Hop("b", 12, 18)]
    assert latency_route(spans, 3, 3, rtt={}) == []


def test_latency_ties_do_not_depend_on_the_order_of_spans() -> None:
    spans = [span("b", 0, 6), span("a", 0, 6), span("c", 0, 3), span("d", 3, 6), span("e", 2, 6)]
    routes = {tuple(latency_route(list(p), 0, 6, rtt={}) or []) for p in itertools.permutations(spans)}
    assert routes == {(Hop("a", 0, 6),)}


def _is_chain(route: list[Hop], spans: list[ServerSpan], start: int, end: int) -> bool:
    """Contiguous hops from ``start`` to ``end``, each inside its server's span."""
    by_peer = {s.peer_id: s for s in spans}
    bounds = [start, *(h.end for h in route)]
    inside = all(by_peer[h.peer_id].start <= h.start < h.end <= by_peer[h.peer_id].end for h in route)
    return inside and [h.start for h in route] == bounds[:-1] and bounds[-1] == end


def _all_routes(spans: list[ServerSpan], position: int, end: int) -> Iterator[list[Hop]]:
    if position == end:
        yield []
        return
    for s in spans:
        if s.start <= position < s.end:
            for to in range(position + 1, min(s.end, end) + 1):
                for rest in _all_routes(spans, to, end):
                    yield [Hop(s.peer_id, position, to), *rest]


@pytest.mark.parametrize("seed", range(30))
def test_latency_route_is_optimal_on_random_views(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    spans = []
    for i in range(rng.randint(1, 6)):
        start = rng.randrange(n)
        spans.append(
            span(f"p{i}", start, rng.randint(start + 1, n), throughput=rng.choice([0.0, 2.0, 20.0, 200.0]))
        )
    rtt = {s.peer_id: rng.choice([0.001, 0.01, 0.1]) for s in spans if rng.random() < 0.7}
    model = LatencyModel(rtt)
    best = min((model.route(r, spans) for r in _all_routes(spans, 0, n)), default=None)
    route = latency_route(spans, 0, n, rtt=rtt)
    if best is None:
        assert route is None
    else:
        assert route is not None
        assert _is_chain(route, spans, 0, n)
        assert model.route(route, spans) == pytest.approx(best, rel=1e-9)


def test_latency_model_adds_round_trips_compute_and_penalty() -> None:
    spans = [span("a", 0, 4, throughput=100.0), span("b", 4, 8, throughput=0.0)]
    model = LatencyModel({"a": 0.03}, default_rtt=0.05, hop_penalty=0.001, min_throughput=2.0)
    route = [Hop("a", 0, 4), Hop("b", 4, 8)]
    assert model.route(route, spans) == pytest.approx((0.03 + 0.001 + 4 / 100) + (0.05 + 0.001 + 4 / 2))


# --- throughput_route ---------------------------------------------------------------------------


def test_throughput_prefers_the_strongest_chain() -> None:
    spans = [span("weak", 0, 10, 5.0), span("b", 0, 5, 50.0), span("c", 5, 10, 40.0)]
    route = throughput_route(spans, 0, 10)
    assert route == [Hop("b", 0, 5), Hop("c", 5, 10)]
    assert bottleneck(route, spans) == 40.0
    assert make_route(spans, 0, 10) == [Hop("weak", 0, 10)]  # fewest hops would take the weak one


def test_throughput_avoids_a_weak_link_in_the_middle() -> None:
    spans = [span("x", 0, 4, 100.0), span("y", 4, 8, 1.0), span("z", 8, 12, 100.0), span("w", 2, 10, 50.0)]
    assert throughput_route(spans, 0, 12) == [Hop("x", 0, 4), Hop("w", 4, 10), Hop("z", 10, 12)]


def test_throughput_ties_go_to_fewer_hops() -> None:
    spans = [span("b", 0, 5, 40.0), span("c", 5, 10, 60.0), span("whole", 0, 10, 40.0)]
    assert throughput_route(spans, 0, 10) == [Hop("whole", 0, 10)]


def test_throughput_banned_gaps_and_ranges() -> None:
    spans = [span("strong", 0, 10, 100.0), span("a", 0, 5, 1.0), span("b", 5, 10, 2.0)]
    assert throughput_route(spans, 0, 10) == [Hop("strong", 0, 10)]
    assert throughput_route(spans, 0, 10, banned=frozenset({"strong"})) == [Hop("a", 0, 5), Hop("b", 5, 10)]
    assert throughput_route(spans, 0, 10, banned=frozenset({"strong", "b"})) is None
    assert throughput_route([span("a", 0, 4), span("b", 5, 10)], 0, 10) is None
    assert throughput_route([], 0, 3) is None
    assert throughput_route([], 3, 3) == []
    assert throughput_route(spans, 6, 8, banned=frozenset({"strong"})) == [Hop("b", 6, 8)]


@pytest.mark.parametrize("seed", range(30))
def test_throughput_route_is_optimal_on_random_views(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    spans = []
    for i in range(rng.randint(1, 6)):
        start = rng.randrange(n)
        spans.append(span(f"p{i}", start, rng.randint(start + 1, n), throughput=rng.choice([1.0, 2.0, 3.0])))
    routes = list(_all_routes(spans, 0, n))
    route = throughput_route(spans, 0, n)
    if not routes:
        assert route is None
        return
    assert route is not None and _is_chain(route, spans, 0, n)
    best = max((bottleneck(r, spans), -len(r)) for r in routes)
    assert (bottleneck(route, spans), -len(route)) == best


RELAYED = ("/ip4/10.0.0.10/tcp/31000/p2p/QmTMJfP82ZeqNk92Re9wqootgDe7pAgYWXSHTEZCAvkpEa/p2p-circuit",)


def test_a_direct_server_wins_over_a_relayed_one_holding_the_same_blocks() -> None:
    # "a" sorts first and measures the same round trip: only the relay tells them apart
    spans = [span("a", 0, 4, addrs=RELAYED), span("b", 0, 4, addrs=("/ip4/10.0.0.11/tcp/1",))]
    assert latency_route(spans, 0, 4, rtt={"a": 0.01, "b": 0.01}) == [Hop("b", 0, 4)]
    assert make_route(spans, 0, 4) == [Hop("b", 0, 4)]


def test_a_relayed_server_still_serves_when_it_is_the_only_one_or_much_faster() -> None:
    assert latency_route([span("a", 0, 4, addrs=RELAYED)], 0, 4, rtt={}) == [Hop("a", 0, 4)]
    spans = [span("a", 0, 4, 100.0, addrs=RELAYED), span("b", 0, 4, 1.0)]
    assert latency_route(spans, 0, 4, rtt={"a": 0.02, "b": 0.01}) == [Hop("a", 0, 4)]
