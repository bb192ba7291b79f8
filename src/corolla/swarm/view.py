"""Pure: the DHT's block records -> what ``corolla swarm`` shows (a table of servers, a bar of blocks).

No I/O here: ``build_view`` turns records into a ``SwarmView``; ``render_text`` and ``to_json``
turn that into the terminal table or a JSON-ready dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corolla.errors import format_ranges
from corolla.protocol.records import ServerState
from corolla.swarm.spans import BlockRecords, ServerSpan, coverage, spans_from_records

# A peer seen in several states (e.g. OFFLINE records of a span it left, ONLINE for its new one)
# is shown in the first state of this order that it has.
STATE_PRIORITY = (ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE)
UNCOVERED = "."
MANY = "+"  # ten servers or more on a block
BAR_WIDTH = 100  # blocks per line of the bar; longer models wrap
PEER_ID_TAIL = 8  # characters of a peer id shown in the table
NAME_WIDTH = 40  # longest public name shown in the table (the JSON has it whole)
LABEL_WIDTH = 9  # the bar's left margin: "block", "servers"
LEGEND = f"{'':{LABEL_WIDTH}}(ONLINE servers per block; {UNCOVERED!r} none, {MANY!r} ten or more)"


@dataclass(frozen=True)
class ServerRow:
    """One server: its announced span, state and figures."""

    peer_id: str
    public_name: str | None
    start: int
    end: int
    state: ServerState
    throughput: float
    version: str


@dataclass(frozen=True)
class SwarmView:
    """The swarm of one model: servers sorted by span, and how many ONLINE servers hold each block."""

    dht_prefix: str
    num_blocks: int
    servers: tuple[ServerRow, ...]
    block_counts: tuple[int, ...]

    @property
    def uncovered(self) -> list[int]:
        return [i for i, n in enumerate(self.block_counts) if n == 0]

    def count(self, state: ServerState) -> int:
        return sum(row.state == state for row in self.servers)

    def blocks_in_state(self, state: ServerState) -> set[int]:
        """Blocks held by at least one server in ``state``."""
        rows = (row for row in self.servers if row.state == state)
        return {i for row in rows for i in range(row.start, min(row.end, self.num_blocks))}


# ---------------------------------------------------------------- records -> view


def build_view(block_records: BlockRecords, dht_prefix: str, num_blocks: int) -> SwarmView:
    """One row per peer (in its most alive state), sorted by span; blocks counted over ONLINE servers."""
    spans = _one_span_per_peer(block_records)
    online = [s for s in spans if s.info.state == ServerState.ONLINE]
    return SwarmView(
        dht_prefix=dht_prefix,
        num_blocks=num_blocks,
        servers=tuple(_row(s) for s in spans),
        block_counts=tuple(coverage(online, num_blocks)),
    )


def _one_span_per_peer(block_records: BlockRecords) -> list[ServerSpan]:
    chosen: dict[str, ServerSpan] = {}
    for state in STATE_PRIORITY:
        for span in spans_from_records(block_records, states=(state,)):
            chosen.setdefault(span.peer_id, span)
    return sorted(chosen.values(), key=lambda s: (s.start, s.end, s.peer_id))


def _row(span: ServerSpan) -> ServerRow:
    info = span.info
    return ServerRow(
        peer_id=span.peer_id,
        public_name=info.public_name,
        start=span.start,
        end=span.end,
        state=info.state,
        throughput=info.throughput,
        version=info.version,
    )


# ---------------------------------------------------------------- view -> JSON


def to_json(view: SwarmView) -> dict[str, Any]:
    """The same content as the text, with full peer ids and names."""
    return {
        "dht_prefix": view.dht_prefix,
        "num_blocks": view.num_blocks,
        "servers": [_row_json(row) for row in view.servers],
        "block_counts": list(view.block_counts),
        "uncovered_blocks": view.uncovered,
    }


def _row_json(row: ServerRow) -> dict[str, Any]:
    return {
        "peer_id": row.peer_id,
        "public_name": row.public_name,
        "start": row.start,
        "end": row.end,
        "state": row.state.name,
        "throughput": row.throughput,
        "version": row.version,
    }


# ---------------------------------------------------------------- view -> text


def render_text(view: SwarmView) -> str:
    """Summary line, table of servers, bar of blocks and the uncovered blocks, as lines of text."""
    parts = [_summary(view), "", *_table(view.servers)] if view.servers else [_summary(view)]
    bar = [*bar_lines(view.block_counts), LEGEND] if view.num_blocks else []
    return "\n".join([*parts, "", *bar, "", coverage_line(view)])


def _summary(view: SwarmView) -> str:
    if not view.servers:
        return f"swarm {view.dht_prefix!r} ({view.num_blocks} blocks): no servers found"
    states = ", ".join(f"{view.count(s)} {s.name.lower()}" for s in STATE_PRIORITY if view.count(s))
    noun = "server" if len(view.servers) == 1 else "servers"
    return f"swarm {view.dht_prefix!r} ({view.num_blocks} blocks): {len(view.servers)} {noun} ({states})"


HEADERS = ("PEER ID", "NAME", "SPAN", "BLOCKS", "STATE", "THROUGHPUT", "VERSION")
RIGHT_ALIGNED = {"BLOCKS", "THROUGHPUT"}


def _table(rows: tuple[ServerRow, ...]) -> list[str]:
    cells = [HEADERS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    return [_format_line(line, widths) for line in cells]


def _cells(row: ServerRow) -> tuple[str, ...]:
    return (
        short_peer_id(row.peer_id),
        short_name(row.public_name),
        f"{row.start}:{row.end}",
        str(row.end - row.start),
        row.state.name,
        f"{row.throughput:,.1f}",
        printable(row.version),
    )


def _format_line(cells: tuple[str, ...], widths: list[int]) -> str:
    padded = [
        cell.rjust(width) if header in RIGHT_ALIGNED else cell.ljust(width)
        for cell, width, header in zip(cells, widths, HEADERS, strict=True)
    ]
    return "  ".join(padded).rstrip()


def short_peer_id(peer_id: str) -> str:
    """The distinctive tail of a peer id (they all begin with the same "12D3KooW")."""
    return peer_id if len(peer_id) <= PEER_ID_TAIL + 3 else "..." + peer_id[-PEER_ID_TAIL:]


def short_name(name: str | None) -> str:
    if not name:
        return "-"
    name = printable(name)
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 3] + "..."


def printable(text: str) -> str:
    """A peer chose this text: keep control characters (newlines, escapes) out of the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def bar_lines(counts: tuple[int, ...] | list[int]) -> list[str]:
    """An index ruler over one character per block (servers holding it), wrapped every BAR_WIDTH."""
    lines: list[str] = []
    for first in range(0, len(counts), BAR_WIDTH):
        chunk = counts[first : first + BAR_WIDTH]
        indices = range(first, first + len(chunk))
        lines += [""] if lines else []
        lines += [
            "block".ljust(LABEL_WIDTH) + _tens_ruler(indices),
            "".ljust(LABEL_WIDTH) + "".join(str(i % 10) for i in indices),
            "servers".ljust(LABEL_WIDTH) + "".join(block_char(n) for n in chunk),
        ]
    return lines


def _tens_ruler(indices: range) -> str:
    """Each multiple of ten written from its own column: "0         10        20"."""
    ruler = ""
    for column, index in enumerate(indices):
        if index % 10 == 0 and len(ruler) <= column:
            ruler = ruler.ljust(column) + str(index)
    return ruler


def block_char(count: int) -> str:
    if count <= 0:
        return UNCOVERED
    return str(count) if count <= 9 else MANY


def coverage_line(view: SwarmView) -> str:
    uncovered = view.uncovered
    if not uncovered:
        return f"all {view.num_blocks} blocks covered"
    line = f"uncovered blocks: {format_ranges(uncovered)} ({len(uncovered)} of {view.num_blocks})"
    loading = sorted(set(uncovered) & view.blocks_in_state(ServerState.JOINING))
    return f"{line}; joining servers are loading {format_ranges(loading)}" if loading else line
