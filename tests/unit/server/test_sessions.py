from __future__ import annotations

import asyncio
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


# --- per-peer limit (--max_sessions_per_peer) -------------------------------------------------


def test_a_peer_past_its_limit_is_refused_and_other_peers_still_get_sessions() -> None:
    table = SessionTable(CacheBudget(10_000))
    mine = [table.open(**_args(), peer="peerAAAAAAAA1", max_per_peer=2) for _ in range(2)]
    with pytest.raises(AllocationFailed) as info:
        table.open(**_args(), peer="peerAAAAAAAA1", max_per_peer=2)
    message = str(info.value)
    assert message == (
        "peer ...AAAAAAA1 already has 2 sessions on this server, the most its --max_sessions_per_peer 2 "
        "allows; close one or use another server"
    )
    assert table.budget.used == 2 * 16 * 4  # the refused session reserved nothing
    other = table.open(**_args(), peer="peerBBBBBBBB2", max_per_peer=2)
    assert (table.sessions_of("peerAAAAAAAA1"), table.sessions_of("peerBBBBBBBB2")) == (2, 1)
    table.close(mine[0])
    table.close(mine[0])  # twice: counted once
    assert table.sessions_of("peerAAAAAAAA1") == 1
    table.open(**_args(), peer="peerAAAAAAAA1", max_per_peer=2)
    table.close(other)
    assert table.sessions_of("peerBBBBBBBB2") == 0


def test_a_refused_allocation_does_not_count_against_the_peer() -> None:
    table = SessionTable(CacheBudget(64))
    with pytest.raises(AllocationFailed, match="attention cache cannot hold"):
        table.open(**_args(max_length=100), peer="p1", max_per_peer=1)
    assert table.sessions_of("p1") == 0
    table.open(**_args(), peer="p1", max_per_peer=1)


def test_without_a_peer_there_is_no_limit() -> None:
    table = SessionTable(CacheBudget(10_000))
    for _ in range(5):
        table.open(**_args(max_length=1), max_per_peer=1)
    assert len(table) == 5


def _args(max_length: int = 16, end: int = 4) -> dict:
    return {"start": 0, "end": end, "max_length": max_length, "batch_size": 1, "cache": DynamicCache(),
            "timeout": 60.0}  # fmt: skip


# --- waiting for room (--max_alloc_timeout) ---------------------------------------------------


def test_a_new_session_waits_for_room_then_fails_with_a_clear_message() -> None:
    async def main() -> None:
        table = SessionTable(CacheBudget(64))
        table.open(**_args())  # the whole budget
        t0 = time.monotonic()
        with pytest.raises(AllocationFailed) as info:
            await table.open_waiting(**_args(), alloc_timeout=0.3, peer="p1", max_per_peer=4)
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 1.0
        assert str(info.value) == (
            "this server's attention cache cannot hold 64 more token-blocks (0 of 64 free after waiting "
            "0.3 s, its --max_alloc_timeout); ask for a shorter max_length or use another server"
        )
        assert (len(table), table.budget.waiting, table.sessions_of("p1")) == (1, 0, 0)

    asyncio.run(main())


def test_a_waiting_session_opens_when_another_closes() -> None:
    async def main() -> None:
        table = SessionTable(CacheBudget(64))
        full = table.open(**_args())
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, table.close, full)
        t0 = time.monotonic()
        session = await table.open_waiting(**_args(), alloc_timeout=5.0, peer="p1", max_per_peer=4)
        assert 0.15 <= time.monotonic() - t0 < 2.0
        assert session.reservation.token_blocks == 64 and table.budget.left == 0
        assert (len(table), table.budget.waiting, table.sessions_of("p1")) == (1, 0, 1)

    asyncio.run(main())


def test_a_waiter_that_goes_away_takes_nothing() -> None:
    async def main() -> None:
        table = SessionTable(CacheBudget(64))
        full = table.open(**_args())
        waiter = asyncio.ensure_future(
            table.open_waiting(**_args(), alloc_timeout=30.0, peer="p1", max_per_peer=4)
        )
        await asyncio.sleep(0.05)
        assert (table.budget.waiting, table.sessions_of("p1")) == (1, 1)  # a waiter counts for its peer
        waiter.cancel()  # the client closed its stream while waiting
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (table.budget.waiting, table.sessions_of("p1")) == (0, 0)
        table.close(full)
        assert table.budget.used == 0

    asyncio.run(main())


def test_a_session_larger_than_the_whole_budget_fails_without_waiting() -> None:
    async def main() -> None:
        table = SessionTable(CacheBudget(64))
        t0 = time.monotonic()
        with pytest.raises(AllocationFailed, match="cannot hold 400 more token-blocks"):
            await table.open_waiting(**_args(max_length=100), alloc_timeout=30.0)
        assert time.monotonic() - t0 < 0.5

    asyncio.run(main())
