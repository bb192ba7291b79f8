"""Block uids: ``"{dht_prefix}.{index}"`` names one block of one model in the DHT."""

from __future__ import annotations

UID_DELIMITER = "."


def make_uid(dht_prefix: str, index: int) -> str:
    return f"{dht_prefix}{UID_DELIMITER}{index}"


def make_uids(dht_prefix: str, start: int, end: int) -> list[str]:
    return [make_uid(dht_prefix, i) for i in range(start, end)]


def parse_uid(uid: str) -> tuple[str, int]:
    """``"model.12"`` -> ``("model", 12)``; raises ValueError for anything else."""
    prefix, sep, index = uid.rpartition(UID_DELIMITER)
    if not sep or not prefix or not index.isdigit():
        raise ValueError(f"not a block uid: {uid!r}")
    return prefix, int(index)
