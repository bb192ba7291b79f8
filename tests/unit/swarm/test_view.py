from __future__ import annotations

import json

import pytest

from corolla.protocol.records import ServerInfo, ServerState
from corolla.swarm.spans import BlockRecords
from corolla.swarm.view import (
    BAR_WIDTH,
    NAME_WIDTH,
    SwarmView,
    bar_lines,
    block_char,
    build_view,
    render_text,
    short_name,
    short_peer_id,
    to_json,
)
from helpers import swarm

ALICE = "12D3KooWAliceAliceAliceAliceAliceAliceAliceAli11111111"
BOB = "12D3KooWBobBobBobBobBobBobBobBobBobBobBobBobBob22222222"
CAROL = "12D3KooWCarolCarolCarolCarolCarolCarolCarolCa33333333"


def info(
    start: int,
    end: int,
    *,
    state: ServerState = ServerState.ONLINE,
    name: str | None = None,
    throughput: float = 100.0,
) -> ServerInfo:
    return swarm.record(start, end, state=state, throughput=throughput, public_name=name)


def records(num_blocks: int, *servers: tuple[str, ServerInfo]) -> BlockRecords:
    """Each server's record listed under every block of its span, as announce() stores it."""
    table: BlockRecords = [{} for _ in range(num_blocks)]
    for peer_id, record in servers:
        for index in range(record.start_block, min(record.end_block, num_blocks)):
            table[index][peer_id] = record
    return table


def spans(view: SwarmView) -> list[tuple[str | None, int, int, str]]:
    return [(r.public_name, r.start, r.end, r.state.name) for r in view.servers]


# ---------------------------------------------------------------- records -> view


def test_rows_sorted_by_span_with_every_state() -> None:
    view = build_view(
        records(
            6,
            (CAROL, info(4, 6, state=ServerState.OFFLINE, name="carol")),
            (BOB, info(1, 4, state=ServerState.JOINING, name="bob")),
            (ALICE, info(0, 3, name="alice")),
        ),
        "m",
        6,
    )
    assert spans(view) == [
        ("alice", 0, 3, "ONLINE"),
        ("bob", 1, 4, "JOINING"),
        ("carol", 4, 6, "OFFLINE"),
    ]
    assert view.servers[0].peer_id == ALICE
    assert view.servers[0].throughput == 100.0 and view.servers[0].version == "0.1.0"


def test_blocks_are_counted_over_online_servers_only() -> None:
    view = build_view(
        records(
            6,
            (ALICE, info(0, 3)),
            (BOB, info(1, 4)),
            (CAROL, info(3, 6, state=ServerState.OFFLINE)),
        ),
        "m",
        6,
    )
    assert view.block_counts == (1, 2, 2, 1, 0, 0)
    assert view.uncovered == [4, 5]


def test_a_peer_that_moved_is_shown_once_in_its_live_state() -> None:
    # it announced OFFLINE for the span it left (records not yet expired) and ONLINE for the new one
    table = records(8, (ALICE, info(0, 4, state=ServerState.OFFLINE)))
    for index, record in enumerate(records(8, (ALICE, info(4, 8)))):
        table[index].update(record)
    view = build_view(table, "m", 8)
    assert spans(view) == [(None, 4, 8, "ONLINE")]
    assert view.block_counts == (0, 0, 0, 0, 1, 1, 1, 1)


def test_no_records() -> None:
    view = build_view([{} for _ in range(3)], "m", 3)
    assert view.servers == () and view.block_counts == (0, 0, 0)
    text = render_text(view)
    assert "no servers found" in text and "PEER ID" not in text
    assert "uncovered blocks: 0-2 (3 of 3)" in text


# ---------------------------------------------------------------- the table


def table_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("PEER ID"))
    end = lines.index("", start)
    return lines[start:end]


def test_table_columns_stay_aligned_with_long_names() -> None:
    long_name = "a-very-long-public-name-" * 3
    view = build_view(
        records(30, (ALICE, info(0, 15, name=long_name)), (BOB, info(15, 30, name="b", throughput=12345.6))),
        "smollm2-135m",
        30,
    )
    header, *rows = table_lines(render_text(view))
    assert len(rows) == 2
    for column, cells in (("SPAN", ["0:15", "15:30"]), ("STATE", ["ONLINE", "ONLINE"])):
        at = header.index(column)
        assert [row[at:].split()[0] for row in rows] == cells
    # right-aligned numbers end under the end of their header
    end = header.index("THROUGHPUT") + len("THROUGHPUT")
    assert [row[:end].split()[-1] for row in rows] == ["100.0", "12,345.6"]
    assert long_name[:10] in rows[0] and long_name not in rows[0]  # shortened in the table


def test_summary_counts_states() -> None:
    view = build_view(
        records(4, (ALICE, info(0, 2)), (BOB, info(2, 4, state=ServerState.JOINING))), "tiny", 4
    )
    first = render_text(view).splitlines()[0]
    assert first == "swarm 'tiny' (4 blocks): 2 servers (1 online, 1 joining)"


def test_short_peer_id_keeps_the_distinctive_tail() -> None:
    assert short_peer_id(ALICE) == "...11111111"
    assert short_peer_id("QmShort") == "QmShort"


def test_short_name() -> None:
    assert short_name(None) == "-" and short_name("") == "-"
    assert short_name("alice") == "alice"
    long = "x" * (NAME_WIDTH + 5)
    assert len(short_name(long)) == NAME_WIDTH and short_name(long).endswith("...")
    assert short_name("evil\x1b[2J\nname") == "evil?[2J?name"  # no escapes reach the terminal


# ---------------------------------------------------------------- the bar


@pytest.mark.parametrize(("count", "char"), [(0, "."), (1, "1"), (9, "9"), (10, "+"), (123, "+")])
def test_block_char(count: int, char: str) -> None:
    assert block_char(count) == char


def test_bar_has_a_ruler_and_one_char_per_block() -> None:
    tens, units, bar = bar_lines([1, 2, 2, 1, 0, 0, 0, 0, 0, 0, 12, 3])
    margin = len("servers  ")
    assert bar == "servers  1221......+3"
    assert units[margin:] == "012345678901"
    assert tens.startswith("block") and tens[margin:] == "0         10"


def test_long_bars_wrap_and_keep_absolute_indices() -> None:
    lines = bar_lines([1] * (BAR_WIDTH + 20))
    assert len(lines) == 7 and lines[3] == ""  # two chunks, a blank line between them
    second_tens = lines[4].split()
    assert second_tens[:2] == ["block", str(BAR_WIDTH)]
    assert lines[6].endswith("1" * 20) and len(lines[6]) == len(lines[5])


def test_coverage_line() -> None:
    covered = build_view(records(4, (ALICE, info(0, 4))), "m", 4)
    assert render_text(covered).splitlines()[-1] == "all 4 blocks covered"
    gap = build_view(records(6, (ALICE, info(0, 3)), (BOB, info(1, 4))), "m", 6)
    assert render_text(gap).splitlines()[-1] == "uncovered blocks: 4-5 (2 of 6)"


def test_coverage_line_tells_which_uncovered_blocks_are_being_loaded() -> None:
    view = build_view(records(6, (ALICE, info(0, 2)), (BOB, info(2, 4, state=ServerState.JOINING))), "m", 6)
    assert render_text(view).splitlines()[-1] == (
        "uncovered blocks: 2-5 (4 of 6); joining servers are loading 2-3"
    )


# ---------------------------------------------------------------- JSON


def test_json_has_full_ids_names_and_the_bar() -> None:
    long_name = "n" * (NAME_WIDTH * 2)
    view = build_view(
        records(6, (BOB, info(1, 4, name=long_name)), (ALICE, info(0, 3, name="alice"))), "m", 6
    )
    out = json.loads(json.dumps(to_json(view)))
    assert out["dht_prefix"] == "m" and out["num_blocks"] == 6
    assert out["block_counts"] == [1, 2, 2, 1, 0, 0]
    assert out["uncovered_blocks"] == [4, 5]
    assert out["servers"] == [
        {
            "peer_id": ALICE,
            "public_name": "alice",
            "start": 0,
            "end": 3,
            "state": "ONLINE",
            "throughput": 100.0,
            "version": "0.1.0",
        },
        {
            "peer_id": BOB,
            "public_name": long_name,
            "start": 1,
            "end": 4,
            "state": "ONLINE",
            "throughput": 100.0,
            "version": "0.1.0",
        },
    ]
