"""Merged caches of concurrent sessions, kept from one decode pass to the next: every pass gives
each session what it gets alone, across rebuilds (a session stepping alone, the room running out)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from transformers import PretrainedConfig

from corolla.models.merged_cache import ROOM
from corolla.models.span import SpanModel
from corolla.runtime.loader import load_span

CPU = torch.device("cpu")
NUM_BLOCKS = 4  # tiny_llama_dir's depth
STEPS = ROOM + 8  # past the merge's room: it is rebuilt at least once


def span(tiny_llama_dir: Path, config: PretrainedConfig) -> SpanModel:
    return load_span(tiny_llama_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)


def test_consecutive_passes_reuse_the_merge_and_equal_each_session_alone(
    tiny_llama_dir: Path, config: PretrainedConfig
) -> None:
    s = span(tiny_llama_dir, config)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, n, config.hidden_size, generator=g) for n in (3, 6, 4)]
    steps = torch.randn(STEPS, len(prompts), 1, config.hidden_size, generator=g)
    max_lengths = (64, None, 64)  # preallocated and growing caches together
    with torch.inference_mode():
        alone = []
        for row, prompt in enumerate(prompts):
            cache = s.new_cache(max_lengths[row])
            s(prompt, cache=cache)
            alone.append([s(steps[i, row : row + 1], cache=cache) for i in range(STEPS)])
        caches = [s.new_cache(n) for n in max_lengths]
        for prompt, cache in zip(prompts, caches, strict=True):
            s(prompt, cache=cache)
        merges, previous = 0, None
        for i in range(STEPS):
            rows = [0, 2] if i == 5 else [0, 1, 2]  # session 1 steps alone once: the group changes
            if i == 5:
                torch.testing.assert_close(s(steps[i, 1:2], cache=caches[1]), alone[1][i], rtol=0, atol=1e-5)
            outs = s.decode_batch(
                [steps[i, r : r + 1] for r in rows], [caches[r] for r in rows], first=0, last=NUM_BLOCKS
            )
            merges += s._merged is not previous
            previous = s._merged
            for row, out in zip(rows, outs, strict=True):
                torch.testing.assert_close(out, alone[row][i], rtol=0, atol=1e-5)
    assert [c.get_seq_length() for c in caches] == [p.shape[1] + STEPS for p in prompts]
    assert 3 <= merges <= 5  # rebuilt when the group changed and when the room ran out, kept otherwise


def test_the_merge_is_dropped_when_one_of_its_sessions_is_gone(
    tiny_llama_dir: Path, config: PretrainedConfig
) -> None:
    s = span(tiny_llama_dir, config)
    caches = [s.new_cache(16) for _ in range(2)]
    with torch.inference_mode():
        [s(torch.randn(1, 3, config.hidden_size), cache=c) for c in caches]
        s.decode_batch(
            [torch.randn(1, 1, config.hidden_size) for _ in caches], caches, first=0, last=NUM_BLOCKS
        )
    assert s._merged is not None
    del caches[1]  # the session closed: its cache is freed
    gc.collect()
    assert s._merged is None  # and the merged copy of the keys with it
