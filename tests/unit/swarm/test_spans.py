from __future__ import annotations

import pytest

from corolla.protocol.records import ServerInfo, ServerState
from corolla.swarm.spans import BlockRecords, ServerSpan, coverage, missing_blocks, spans_from_records
from helpers.swarm import record as info


def records(num_blocks: int, servers: dict[str, tuple[ServerInfo, list[int]]]) -> BlockRecords:
    """Per-block records: each server's record is listed under the given block indices."""
    table: BlockRecords = [{} for _ in range(num_blocks)]
    for peer_id, (record, listed) in servers.items():
        for index in listed:
            table[index][peer_id] = record
    return table


def bounds(spans: list[ServerSpan]) -> list[tuple[str, int, int]]:
    return [(s.peer_id, s.start, s.end) for s in spans]


def test_no_records_no_spans() -> None:
    assert spans_from_records([]) == []
    assert spans_from_records([{}, {}, {}]) == []


def test_overlapping_servers_sorted_by_start_end_peer() -> None:
    a, b, c = info(0, 4), info(2, 6), info(2, 4)
    table = records(6, {"b": (b, [2, 3, 4, 5]), "a": (a, [0, 1, 2, 3]), "c": (c, [2, 3])})
    spans = spans_from_records(table)
    assert bounds(spans) == [("a", 0, 4), ("c", 2, 4), ("b", 2, 6)]
    assert spans[0].info == a and spans[0].length == 4
    assert spans[1].length == 2


def test_ties_in_start_and_end_are_ordered_by_peer_id() -> None:
    table = records(2, {"zed": (info(0, 2), [0, 1]), "amy": (info(0, 2), [0, 1])})
    assert bounds(spans_from_records(table)) == [("amy", 0, 2), ("zed", 0, 2)]


def test_non_contiguous_listing_keeps_the_longest_run() -> None:
    # announced 0..8, but missing from blocks 2 and 3 (e.g. records that have not propagated)
    table = records(8, {"p": (info(0, 8), [0, 1, 4, 5, 6])})
    assert bounds(spans_from_records(table)) == [("p", 4, 7)]


def test_equal_runs_keep_the_first() -> None:
    table = records(6, {"p": (info(0, 6), [0, 1, 3, 4])})
    assert bounds(spans_from_records(table)) == [("p", 0, 2)]


def test_single_listed_block() -> None:
    table = records(6, {"p": (info(0, 6), [3])})
    assert bounds(spans_from_records(table)) == [("p", 3, 4)]


def test_listings_outside_the_announced_span_are_ignored() -> None:
    # a stale record left under block 0 and 5 by a server that now announces 1..3
    table = records(6, {"p": (info(1, 3), [0, 1, 2, 5])})
    assert bounds(spans_from_records(table)) == [("p", 1, 3)]


def test_only_online_servers_by_default() -> None:
    table = records(
        4,
        {
            "on": (info(0, 2), [0, 1]),
            "joining": (info(0, 4, state=ServerState.JOINING), [0, 1, 2, 3]),
            "off": (info(2, 4, state=ServerState.OFFLINE), [2, 3]),
        },
    )
    assert bounds(spans_from_records(table)) == [("on", 0, 2)]


def test_states_filter_is_configurable() -> None:
    table = records(
        4,
        {
            "on": (info(0, 2), [0, 1]),
            "joining": (info(0, 4, state=ServerState.JOINING), [0, 1, 2, 3]),
            "off": (info(2, 4, state=ServerState.OFFLINE), [2, 3]),
        },
    )
    spans = spans_from_records(table, states=(ServerState.ONLINE, ServerState.JOINING))
    assert bounds(spans) == [("on", 0, 2), ("joining", 0, 4)]
    assert bounds(spans_from_records(table, states=(ServerState.OFFLINE,))) == [("off", 2, 4)]


def test_coverage_counts_servers_per_block() -> None:
    spans = [
        ServerSpan("a", 0, 3, info(0, 3)),
        ServerSpan("b", 2, 5, info(2, 5)),
        ServerSpan("c", 2, 3, info(2, 3)),
    ]
    assert coverage(spans, 6) == [1, 1, 3, 1, 1, 0]
    assert missing_blocks(spans, 6) == [5]


def test_coverage_clips_spans_beyond_the_model() -> None:
    spans = [ServerSpan("a", 2, 10, info(2, 10))]
    assert coverage(spans, 4) == [0, 0, 1, 1]
    assert missing_blocks(spans, 4) == [0, 1]


def test_missing_blocks_with_gaps_and_empty_swarm() -> None:
    spans = [ServerSpan("a", 1, 3, info(1, 3)), ServerSpan("b", 5, 6, info(5, 6))]
    assert missing_blocks(spans, 7) == [0, 3, 4, 6]
    assert missing_blocks([], 3) == [0, 1, 2]
    assert missing_blocks(spans, 0) == []


def test_records_to_missing_blocks_end_to_end() -> None:
    table = records(
        5,
        {
            "a": (info(0, 2), [0, 1]),
            "b": (info(3, 5, state=ServerState.OFFLINE), [3, 4]),
            "c": (info(4, 5), [4]),
        },
    )
    assert missing_blocks(spans_from_records(table), 5) == [2, 3]


@pytest.mark.parametrize(
    "listing",
    [
        # restarted with the same --identity_path after a crash: old records (0..3) have not expired yet
        [(0, 3), (0, 3), (0, 3), (3, 6), (3, 6), (3, 6)],
        # the record kept comes from a block outside the longest run
        [(0, 3), (0, 3), (0, 3), None, None, (5, 6)],
    ],
    ids=["stale-records-merge", "record-from-another-run"],
)
def test_span_never_claims_blocks_outside_its_record(listing: list[tuple[int, int] | None]) -> None:
    table: BlockRecords = [{} if bounds_ is None else {"p": info(*bounds_)} for bounds_ in listing]
    for span in spans_from_records(table):
        assert span.info.start_block <= span.start < span.end <= span.info.end_block
