"""Byte ranges: which parts of a safetensors file hold which tensors, and which requests fetch them.

Pure functions over ``(start, end)`` pairs (``end`` exclusive), shared by the store (what is on
disk) and the fetcher (what to ask the hub for)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

Range = tuple[int, int]

HEADER_PROBE = 8  # the first request of a file: the length of its header
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    start: int  # absolute offsets in the file
    end: int


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping, non-adjacent ranges covering the same bytes; empty ones dropped."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def subtract(wanted: Iterable[Range], present: Iterable[Range]) -> list[Range]:
    """The bytes of ``wanted`` that ``present`` lacks."""
    have = merge(present)
    out: list[Range] = []
    for start, end in merge(wanted):
        for p_start, p_end in have:
            if p_end <= start or p_start >= end:
                continue
            if p_start > start:
                out.append((start, p_start))
            start = max(start, p_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def total(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in merge(ranges))


def covers(present: Iterable[Range], wanted: Iterable[Range]) -> bool:
    return not subtract(wanted, present)


def requests(missing: Iterable[Range], *, max_gap: int, chunk: int) -> list[Range]:
    """HTTP range requests for ``missing``: neighbours less than ``max_gap`` apart are fetched in
    one request (the gap comes along), and no request is longer than ``chunk`` bytes, so that an
    interrupted download loses at most one chunk and progress moves steadily."""
    joined: list[Range] = []
    for start, end in merge(missing):
        if joined and start - joined[-1][1] < max_gap:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return [(s, min(s + chunk, end)) for start, end in joined for s in range(start, end, chunk)]


def header_length(prefix: bytes) -> int:
    """The total length of a safetensors header (its 8-byte size field included)."""
    if len(prefix) < 8:
        raise ValueError("a safetensors file is at least 8 bytes long")
    (size,) = struct.unpack("<Q", prefix[:8])
    if size > MAX_HEADER:
        raise ValueError(f"safetensors header of {size} bytes is larger than the format allows")
    return 8 + size


def parse_header(header: bytes) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file with its absolute byte range, from the file's first
    ``header_length`` bytes."""
    length = header_length(header)
    if len(header) < length:
        raise ValueError(f"safetensors header is {length} bytes, got {len(header)}")
    meta = json.loads(header[8:length])
    if not isinstance(meta, dict):
        raise ValueError("safetensors header is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(name, length + int(start), length + int(end))
    return entries
