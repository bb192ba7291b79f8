"""SpanBackend: rolling a session's cache back, and merged decode steps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import PretrainedConfig

from corolla.runtime.backend import SpanBackend
from corolla.runtime.compute_thread import on_compute_thread
from corolla.runtime.loader import load_span

CPU = torch.device("cpu")
NUM_BLOCKS = 4  # tiny_llama_dir


def backend(tiny_llama_dir: Path, config: PretrainedConfig) -> SpanBackend:
    span = load_span(tiny_llama_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    return SpanBackend(span, torch.float32, CPU)


def test_crop_rolls_a_cache_back_to_a_position(tiny_llama_dir: Path, config: PretrainedConfig) -> None:
    b = backend(tiny_llama_dir, config)
    g = torch.Generator().manual_seed(0)
    prompt, first, second = (torch.randn(1, n, config.hidden_size, generator=g) for n in (5, 2, 2))

    async def scenario() -> tuple[torch.Tensor, torch.Tensor]:
        cache = b.new_cache()
        await b.run(prompt, 0, NUM_BLOCKS, cache)
        await b.run(first, 0, NUM_BLOCKS, cache)  # a step that is then replayed differently
        b.crop(cache, 5)
        assert cache.get_seq_length() == 5
        replayed = await b.run(second, 0, NUM_BLOCKS, cache)
        fresh = b.new_cache()
        await b.run(prompt, 0, NUM_BLOCKS, fresh)
        return replayed, await b.run(second, 0, NUM_BLOCKS, fresh)

    replayed, expected = asyncio.run(scenario())
    assert torch.equal(replayed, expected)
    b.shutdown()


@pytest.mark.parametrize(
    "max_lengths",
    [(None,) * 4, (16,) * 4, (16, None, 9, 16)],
    ids=["growing caches", "preallocated caches", "mixed"],
)
def test_concurrent_decode_steps_are_merged_and_exact(
    tiny_llama_dir: Path, config: PretrainedConfig, max_lengths: tuple[int | None, ...]
) -> None:
    b = backend(tiny_llama_dir, config)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, n, config.hidden_size, generator=g) for n in (2, 5, 3, 7)]
    steps = [torch.randn(1, 1, config.hidden_size, generator=g) for _ in prompts]

    async def scenario() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        alone, together = [], []
        for p, s in zip(prompts, steps, strict=True):
            cache = b.new_cache()
            await b.run(p, 0, NUM_BLOCKS, cache)
            alone.append(await b.run(s, 0, NUM_BLOCKS, cache))
        caches = [b.new_cache(n) for n in max_lengths]
        for p, cache in zip(prompts, caches, strict=True):
            await b.run(p, 0, NUM_BLOCKS, cache)
        # positions rolled back leave keys behind in a preallocated buffer: merging must mask them
        await b.run(torch.full((1, 3, config.hidden_size), 30.0), 0, NUM_BLOCKS, caches[0])
        b.crop(caches[0], prompts[0].shape[1])
        runs = (b.run(s, 0, NUM_BLOCKS, c) for s, c in zip(steps, caches, strict=True))
        together = await asyncio.gather(*runs)
        assert [c.get_seq_length() for c in caches] == [p.shape[1] + 1 for p in prompts]
        return alone, list(together)

    alone, together = asyncio.run(scenario())
    assert b.batched_steps >= 2  # at least some of the four steps shared a pass
    assert b.decode_passes < 8 and b.compute_seconds > 0  # 4 alone, then fewer than 4 for the merged
    for a, t in zip(alone, together, strict=True):
        torch.testing.assert_close(t, a, atol=1e-5, rtol=0)
    b.shutdown()


def test_a_preallocated_session_cache_gives_the_growing_caches_results(
    tiny_llama_dir: Path, config: PretrainedConfig
) -> None:
    from corolla.runtime.session_cache import PreallocatedLayer

    b = backend(tiny_llama_dir, config)
    h = torch.randn(1, 12, config.hidden_size, generator=torch.Generator().manual_seed(2))

    async def scenario() -> list[tuple[torch.Tensor, torch.Tensor]]:
        growing, fixed = b.new_cache(), b.new_cache(max_length=16)
        assert all(isinstance(layer, PreallocatedLayer) for layer in fixed.layers)
        pairs = [(await b.run(h[:, :6], 0, NUM_BLOCKS, growing), await b.run(h[:, :6], 0, NUM_BLOCKS, fixed))]
        for i in range(6, 10):
            step = h[:, i : i + 1]
            pairs.append((await b.run(step, 0, NUM_BLOCKS, growing), await b.run(step, 0, NUM_BLOCKS, fixed)))
        b.crop(growing, 7)
        b.crop(fixed, 7)
        tail = h[:, 10:12]
        pairs.append((await b.run(tail, 0, NUM_BLOCKS, growing), await b.run(tail, 0, NUM_BLOCKS, fixed)))
        assert fixed.get_seq_length() == 9
        return pairs

    for growing_out, fixed_out in asyncio.run(scenario()):
        assert torch.equal(growing_out, fixed_out)
    b.shutdown()


def test_decode_passes_run_with_the_tuners_thread_count_and_the_rest_with_every_thread(
    tiny_llama_dir: Path, config: PretrainedConfig
) -> None:
    from corolla.runtime.thread_tuner import ROUNDS

    main_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # so that there is a choice even on one core
    span = load_span(tiny_llama_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    tuned, plain = SpanBackend(span, torch.float32, CPU, tune_threads=True), backend(tiny_llama_dir, config)
    assert tuned.tuner is not None and tuned.max_threads == 2 and plain.tuner is None
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 4, config.hidden_size, generator=g)
    steps = torch.randn(12, 1, 1, config.hidden_size, generator=g)

    async def threads_now() -> int:
        return await on_compute_thread(torch.get_num_threads)

    async def scenario() -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        outs: dict[str, list[torch.Tensor]] = {"tuned": [], "plain": []}
        used: list[int] = []
        for name, b in (("tuned", tuned), ("plain", plain)):
            cache = b.new_cache()
            await b.run(prompt, 0, NUM_BLOCKS, cache)
            for step in steps:
                outs[name].append(await b.run(step, 0, NUM_BLOCKS, cache))
                if b is tuned:
                    used.append(await threads_now())
            if b is tuned:
                await b.run(prompt, 0, NUM_BLOCKS, b.new_cache())  # a prompt: every thread
                used.append(await threads_now())
        await on_compute_thread(torch.set_num_threads, main_threads)
        return outs["tuned"], outs["plain"], used

    try:
        tuned_outs, plain_outs, used = asyncio.run(scenario())
    finally:
        torch.set_num_threads(main_threads)
        tuned.shutdown()
    assert tuned.tuner.explorations >= 1 and sorted(set(used[: 2 * ROUNDS])) == [1, 2]  # both tried
    assert used[-1] == 2
    for t, p in zip(tuned_outs, plain_outs, strict=True):
        torch.testing.assert_close(t, p, atol=1e-5, rtol=0)


def test_steps_that_cannot_merge_are_tuned_too(tiny_llama_dir: Path, config: PretrainedConfig) -> None:
    from corolla.runtime.thread_tuner import ROUNDS

    main_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    span = load_span(tiny_llama_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    b = SpanBackend(span, torch.float32, CPU, tune_threads=True)
    g = torch.Generator().manual_seed(4)

    async def scenario() -> None:
        cache = b.new_cache()  # two sequences (beam search): their steps take the plain path
        await b.run(torch.randn(2, 3, config.hidden_size, generator=g), 0, NUM_BLOCKS, cache)
        for _ in range(2 * ROUNDS):
            await b.run(torch.randn(2, 1, config.hidden_size, generator=g), 0, NUM_BLOCKS, cache)
        await on_compute_thread(torch.set_num_threads, main_threads)

    try:
        asyncio.run(scenario())
    finally:
        torch.set_num_threads(main_threads)
        b.shutdown()
    assert b.tuner is not None and b.tuner.explorations == 1 and b.decode_passes == 0


def test_a_backend_built_after_tuned_passes_keeps_the_servers_thread_count(
    tiny_llama_dir: Path, config: PretrainedConfig
) -> None:
    """A server moving to other blocks builds the new backend on the compute thread, which the old
    span's decode passes may have left at fewer threads: the server's own count is passed in."""
    main_threads = torch.get_num_threads()
    span = load_span(tiny_llama_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)

    async def scenario() -> SpanBackend:
        await on_compute_thread(torch.set_num_threads, 1)  # as after decode passes with 1 thread
        try:
            return await on_compute_thread(
                lambda: SpanBackend(span, torch.float32, CPU, tune_threads=True, max_threads=2)
            )
        finally:
            await on_compute_thread(torch.set_num_threads, main_threads)

    try:
        b = asyncio.run(scenario())
    finally:
        torch.set_num_threads(main_threads)
    assert b.max_threads == 2 and b.tuner is not None and b.tuner.candidates == (2, 1)
    b.shutdown()
