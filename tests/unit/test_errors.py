from __future__ import annotations

import pytest

from corolla import errors
from corolla.errors import CorollaError, MissingBlocks, format_ranges


@pytest.mark.parametrize(
    ("indices", "text"),
    [
        ([], ""),
        ([7], "7"),
        ([0, 1, 2, 5], "0-2, 5"),
        ([0, 2, 4], "0, 2, 4"),
        ([3, 4], "3-4"),
        ([9, 1, 0, 8, 2], "0-2, 8-9"),
        ([5, 5, 6, 6], "5-6"),
        (list(range(30)), "0-29"),
    ],
)
def test_format_ranges(indices: list[int], text: str) -> None:
    assert format_ranges(indices) == text


def test_missing_blocks_message_names_the_ranges_and_the_fix() -> None:
    error = MissingBlocks([3, 4, 5, 9])
    assert error.missing == [3, 4, 5, 9]
    assert str(error) == (
        "no online server hosts block(s) 3-5, 9; start a server for them "
        "(corolla serve MODEL --initial_peers ...) or check --initial_peers"
    )


def test_missing_blocks_message_mentions_the_wait() -> None:
    message = str(MissingBlocks([0], waited=29.6))
    assert message.startswith("no online server hosts block(s) 0 after waiting 30 s; ")


def test_missing_blocks_copies_its_input() -> None:
    missing = [1, 2]
    error = MissingBlocks(missing)
    missing.append(3)
    assert error.missing == [1, 2]


def test_every_error_is_a_corolla_error() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == errors.__name__
    ]
    assert len(classes) >= 10
    assert all(issubclass(cls, CorollaError) for cls in classes)
