from __future__ import annotations

import time

import pytest
from transformers import DynamicCache

from corolla.errors import AllocationFailed, BadRequest
from corolla.runtime.kv_cache import CacheBudget
from corolla.server.sessions import Session, SessionTable


def open_session(
    table: SessionTable,
    *,
    start: int = 0,
    end: int = 4,
    max_length: int = 16,
    batch_size: int = 1,
    timeout: float = 60.0,
) -> Session:
    return table.open(
        start=start,
        end=end,
        max_length=max_length,
        batch_size=batch_size,
        cache=DynamicCache(),
        timeout=timeout,
    )


def test_open_reserves_tokens_times_batch_times_blocks() -> None:
    table = SessionTable(CacheBudget(1000))
    session = open_session(table, start=2, end=5, max_length=10, batch_size=4)
    assert session.reservation.token_blocks == 10 * 4 * 3
    assert table.budget.used == 120
    assert len(table) == 1
    assert (session.start, session.end, session.max_length, session.batch_size, session.length) == (
        2,
        5,
        10,
        4,
        0,
    )


def test_sessions_get_distinct_ids_and_a_deadline() -> None:
    table = SessionTable(CacheBudget(1000))
    before = time.monotonic()
    first = open_session(table, timeout=30.0)
    second = open_session(table, timeout=30.0)
    assert first.id != second.id
    assert before + 30.0 <= first.deadline <= time.monotonic() + 30.0


def test_close_releases_the_budget_and_drops_the_cache() -> None:
    table = SessionTable(CacheBudget(100))
    kept = open_session(table, max_length=10, end=4)  # 40
    closing = open_session(table, max_length=15, end=4)  # 60
    assert table.budget.left == 0
    table.close(closing)
    assert len(table) == 1
    assert table.budget.used == 40
    assert closing.cache is None
    assert kept.cache is not None


def test_closing_twice_is_harmless() -> None:
    table = SessionTable(CacheBudget(100))
    kept = open_session(table, max_length=5, end=4)  # 20
    session = open_session(table, max_length=5, end=4)
    table.close(session)
    table.close(session)
    assert table.budget.used == 20
    assert len(table) == 1
    table.close(kept)
    assert table.budget.used == 0 and len(table) == 0


def test_open_beyond_the_budget_fails_and_leaves_nothing_behind() -> None:
    table = SessionTable(CacheBudget(100))
    open_session(table, max_length=20, end=4)  # 80
    with pytest.raises(AllocationFailed, match="cannot hold 24 more token-blocks"):
        open_session(table, max_length=6, end=4)
    assert len(table) == 1
    assert table.budget.used == 80


def test_closed_budget_lets_a_new_session_open() -> None:
    table = SessionTable(CacheBudget(64))
    table.close(open_session(table, max_length=16, end=4))
    assert open_session(table, max_length=16, end=4).reservation.token_blocks == 64


@pytest.fixture
def session() -> Session:
    table = SessionTable(CacheBudget(10_000))
    session = open_session(table, max_length=10, batch_size=2)
    session.length = 4
    return session


@pytest.mark.parametrize(("position", "new_tokens"), [(4, 1), (4, 6), (0, 10), (2, 3), (0, 1)])
def test_steps_that_fit_pass(session: Session, position: int, new_tokens: int) -> None:
    session.check_step(position, 2, new_tokens)
    assert session.length == 4  # checking does not change the session


@pytest.mark.parametrize("batch_size", [1, 3])
def test_wrong_batch_size(session: Session, batch_size: int) -> None:
    with pytest.raises(BadRequest) as info:
        session.check_step(4, batch_size, 1)
    assert str(info.value) == f"step has batch size {batch_size}, the session was opened with 2"


def test_position_beyond_length(session: Session) -> None:
    with pytest.raises(BadRequest) as info:
        session.check_step(5, 2, 1)
    assert str(info.value) == "step starts at position 5 but the session holds only 4 tokens"


@pytest.mark.parametrize(("position", "new_tokens"), [(4, 7), (0, 11), (3, 8)])
def test_exceeding_max_length(session: Session, position: int, new_tokens: int) -> None:
    with pytest.raises(BadRequest) as info:
        session.check_step(position, 2, new_tokens)
    message = str(info.value)
    assert f"exceed its max_length 10 ({position} + {new_tokens} tokens)" in message
    assert "larger max_length" in message
