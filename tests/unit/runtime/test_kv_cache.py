from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig

from corolla.errors import AllocationFailed
from corolla.runtime.kv_cache import CacheBudget, cache_bytes_per_token_block


def test_reserve_and_release_move_used_and_left() -> None:
    budget = CacheBudget(1000)
    assert (budget.used, budget.left) == (0, 1000)
    first = budget.reserve(300)
    second = budget.reserve(700)
    assert (first.token_blocks, second.token_blocks) == (300, 700)
    assert (budget.used, budget.left) == (1000, 0)
    budget.release(first)
    assert first.released and not second.released
    assert (budget.used, budget.left) == (700, 300)
    budget.release(second)
    assert (budget.used, budget.left) == (0, 1000)


def test_over_budget_raises_allocation_failed_with_the_numbers() -> None:
    budget = CacheBudget(1000)
    budget.reserve(600)
    with pytest.raises(AllocationFailed) as info:
        budget.reserve(401)
    message = str(info.value)
    assert "cannot hold 401 more token-blocks" in message
    assert "(400 of 1000 free)" in message
    assert "shorter max_length" in message and "another server" in message
    assert "\n" not in message
    assert budget.used == 600  # the failed reservation took nothing


def test_exactly_the_remaining_budget_fits() -> None:
    budget = CacheBudget(10)
    budget.reserve(4)
    budget.reserve(6)
    assert budget.left == 0
    with pytest.raises(AllocationFailed, match="0 of 10 free"):
        budget.reserve(1)


def test_double_release_is_harmless() -> None:
    budget = CacheBudget(100)
    kept = budget.reserve(30)
    reservation = budget.reserve(50)
    budget.release(reservation)
    budget.release(reservation)
    assert budget.used == 30
    assert kept.released is False


def test_released_budget_can_be_reserved_again() -> None:
    budget = CacheBudget(100)
    budget.release(budget.reserve(100))
    assert budget.reserve(100).token_blocks == 100


def test_concurrent_reservations_never_overcommit() -> None:
    budget = CacheBudget(1000)
    granted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            try:
                budget.reserve(7)
            except AllocationFailed:
                with lock:
                    refused.append(1)
            else:
                with lock:
                    granted.append(7)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == budget.used == 1000 // 7 * 7
    assert len(granted) + len(refused) == 400


@pytest.mark.parametrize(
    ("dtype", "expected"),
    # 2 (keys + values) x 2 kv heads x head_dim 8 x element size
    [(torch.float32, 2 * 2 * 8 * 4), (torch.bfloat16, 2 * 2 * 8 * 2), (torch.float16, 2 * 2 * 8 * 2)],
)
def test_cache_bytes_with_grouped_query_attention(dtype: torch.dtype, expected: int) -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    assert cache_bytes_per_token_block(config, dtype) == expected


def test_cache_bytes_without_gqa_uses_all_heads() -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=8)
    assert cache_bytes_per_token_block(config, torch.float32) == 2 * 8 * 8 * 4


def test_cache_bytes_honours_an_explicit_head_dim() -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    assert cache_bytes_per_token_block(config, torch.bfloat16) == 2 * 2 * 32 * 2


def test_cache_bytes_match_a_real_cache() -> None:
    from transformers import DynamicCache

    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1)
    cache = DynamicCache(config=config)
    tokens = 5
    keys = torch.zeros(1, 2, tokens, 8, dtype=torch.float16)
    cache.update(keys, keys.clone(), 0)
    layer = cache.layers[0]
    actual = (
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    )
    assert actual == tokens * cache_bytes_per_token_block(config, torch.float16)


def test_reserve_waiting_is_woken_by_a_release_from_another_thread() -> None:
    import asyncio
    import time

    async def main() -> None:
        budget = CacheBudget(100)
        held = budget.reserve(80)
        threading.Timer(0.2, budget.release, args=(held,)).start()
        t0 = time.monotonic()
        reservation = await budget.reserve_waiting(50, timeout=5.0)
        assert 0.15 <= time.monotonic() - t0 < 2.0
        assert (reservation.token_blocks, budget.used, budget.waiting) == (50, 50, 0)

    asyncio.run(main())


def test_reserve_waiting_with_zero_timeout_fails_at_once_as_reserve_does() -> None:
    import asyncio

    budget = CacheBudget(100)
    budget.reserve(100)
    with pytest.raises(AllocationFailed, match=r"\(0 of 100 free\); ask for a shorter max_length"):
        asyncio.run(budget.reserve_waiting(1, timeout=0))


def test_waiters_that_fit_are_served_and_the_rest_keep_waiting() -> None:
    import asyncio

    async def main() -> None:
        budget = CacheBudget(100)
        held = budget.reserve(100)
        small = asyncio.ensure_future(budget.reserve_waiting(30, timeout=5.0))
        big = asyncio.ensure_future(budget.reserve_waiting(90, timeout=0.5))
        await asyncio.sleep(0.05)
        assert budget.waiting == 2
        budget.release(held)
        assert (await small).token_blocks == 30
        with pytest.raises(AllocationFailed, match="after waiting 0.5 s"):
            await big  # 70 free: woken, retried, kept waiting, then refused
        assert (budget.used, budget.waiting) == (30, 0)

    asyncio.run(main())
