"""Byte-range arithmetic and safetensors headers: what is on disk, what to ask the hub for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from corolla.hub import ranges


def test_merge_sorts_joins_and_drops_empty() -> None:
    assert ranges.merge([(10, 20), (0, 5), (5, 7), (18, 30), (40, 40)]) == [(0, 7), (10, 30)]


@pytest.mark.parametrize(
    ("wanted", "present", "missing"),
    [
        ([(0, 100)], [], [(0, 100)]),
        ([(0, 100)], [(0, 100)], []),
        ([(0, 100)], [(10, 20), (50, 60)], [(0, 10), (20, 50), (60, 100)]),
        ([(0, 10), (20, 30)], [(5, 25)], [(0, 5), (25, 30)]),
        ([(10, 20)], [(0, 5), (30, 40)], [(10, 20)]),
    ],
)
def test_subtract(wanted: list, present: list, missing: list) -> None:
    assert ranges.subtract(wanted, present) == missing
    assert ranges.covers(present, wanted) == (missing == [])


def test_requests_join_small_gaps_and_split_long_ranges() -> None:
    missing = [(0, 10), (12, 20), (100, 130)]
    assert ranges.requests(missing, max_gap=5, chunk=1000) == [(0, 20), (100, 130)]
    assert ranges.requests(missing, max_gap=1, chunk=1000) == [(0, 10), (12, 20), (100, 130)]
    assert ranges.requests([(0, 25)], max_gap=1, chunk=10) == [(0, 10), (10, 20), (20, 25)]
    # what the requests fetch beyond the missing bytes is the joined gaps only
    fetched = ranges.total(ranges.requests(missing, max_gap=5, chunk=7))
    assert fetched == ranges.total(missing) + 2


def test_parse_header_gives_absolute_offsets(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float16)
    save_file({"a": a, "b": b}, path, metadata={"format": "pt"})
    data = path.read_bytes()
    length = ranges.header_length(data[:8])
    entries = ranges.parse_header(data[:length])
    assert set(entries) == {"a", "b"}
    ea, eb = entries["a"], entries["b"]
    assert np.frombuffer(data[ea.start : ea.end], np.float32).tolist() == a.ravel().tolist()
    assert np.frombuffer(data[eb.start : eb.end], np.float16).tolist() == b.tolist()


def test_bad_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 8 bytes"):
        ranges.header_length(b"abc")
    with pytest.raises(ValueError, match="larger than the format allows"):
        ranges.header_length((2**40).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="header is 20 bytes, got 10"):
        ranges.parse_header((12).to_bytes(8, "little") + b"{}")
