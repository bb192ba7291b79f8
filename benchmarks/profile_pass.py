"""Where a server's decode pass goes: the blocks' kernels against per-operation overhead.

Times one decode step (one new position, a cache of ``--prompt_tokens``) through every block of
the model on a ``SpanBackend`` alone in this process (no client, no messages), at each decode
thread count a server may choose (all cores, halving down to 1). Then the same on a model of the
same family and depth with tiny dimensions (hidden size 64): it runs the same operations on
almost no data, so its pass is the floor that Python, the dispatcher and the thread team cost
whatever the weights. What the real pass takes above that floor is its kernels reading the
weights; a compiled or fused decode step could remove most of the floor.

    python benchmarks/profile_pass.py [--passes 50] [--model smollm2-135m]
    GOMP_SPINCOUNT=10000 python benchmarks/profile_pass.py   # idle workers as a server's wait

The process keeps libgomp's default spinning unless the environment sets it; corolla's servers
start with ``GOMP_SPINCOUNT=10000``.

Compare with ``llama-bench``'s whole token (``bench_decode.py --defaults --llamacpp``). Timing is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.models.resolve import resolve_model
from corolla.runtime.backend import SpanBackend
from corolla.runtime.loader import load_span
from corolla.runtime.thread_tuner import candidate_counts

CPU = torch.device("cpu")
TINY = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "vocab_size": 256}


def tiny_twin(config: PretrainedConfig, directory: Path) -> PretrainedConfig:
    """A random model of ``config``'s family and depth with tiny dimensions, saved to ``directory``."""
    heads = config.num_attention_heads
    grouped = (getattr(config, "num_key_value_heads", None) or heads) < heads
    shape = {"num_attention_heads": 4, "num_key_value_heads": 2 if grouped else 4}
    twin = config.__class__(**{**config.to_dict(), **TINY, **shape})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(twin).save_pretrained(directory)
    return twin


def pass_ms(model_dir: Path, config: PretrainedConfig, threads: int, passes: int, prompt: int
            ) -> tuple[float, int]:  # fmt: skip
    """Median milliseconds of a decode pass through every block with ``threads`` threads, and the
    blocks' weight bytes."""
    blocks = config.num_hidden_layers

    async def measure() -> tuple[float, int]:
        span = load_span(model_dir, config, 0, blocks, dtype=torch.float32, device=CPU)
        weights = sum(p.numel() * p.element_size() for p in span.parameters())
        backend = SpanBackend(span, torch.float32, CPU, tune_threads=False, max_threads=threads)
        cache = backend.new_cache(prompt + passes + 8)
        await backend.run(torch.randn(1, prompt, config.hidden_size), 0, blocks, cache)
        times = []
        for _ in range(passes):
            step = torch.randn(1, 1, config.hidden_size)
            started = time.perf_counter()
            await backend.run(step, 0, blocks, cache)
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times), weights

    return asyncio.run(measure())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=BUILTIN_MODEL, help="model name or path (default: %(default)s)")
    parser.add_argument("--passes", type=int, default=50, help="timed passes per figure (default: 50)")
    parser.add_argument("--prompt_tokens", type=int, default=46, help="positions in the cache before them")
    parser.add_argument("--cache_dir", default=default_cache_dir(), help="where converted models live")
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model, args.cache_dir).path
    config = AutoConfig.from_pretrained(model_dir)
    counts = candidate_counts(torch.get_num_threads())
    rows, weights = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        twin = tiny_twin(config, Path(tmp))
        with tqdm(total=2 * len(counts), desc="decode passes", unit="figure", file=sys.stderr) as bar:
            for threads in counts:
                real, weights = pass_ms(model_dir, config, threads, args.passes, args.prompt_tokens)
                bar.update()
                floor, _ = pass_ms(Path(tmp), twin, threads, args.passes, args.prompt_tokens)
                bar.update()
                rows.append((threads, real, floor))
    print(f"decode pass through {config.num_hidden_layers} blocks of {args.model} (float32, "
          f"{weights / 1e6:.0f} MB of weights), median of {args.passes}, alone in this process")  # fmt: skip
    print(f"{'threads':>8}{'pass ms':>10}{'floor ms':>10}{'kernels ms':>12}{'weights GB/s':>14}")
    for threads, real, floor in rows:
        kernels = max(real - floor, 1e-9)
        print(f"{threads:>8}{real:>10.1f}{floor:>10.1f}{kernels:>12.1f}{weights / kernels / 1e6:>14.1f}")
    print(
        "floor = the same pass on a same-depth model with hidden size 64 (Python, dispatch, threads);\n"
        "kernels = pass - floor; weights GB/s = the blocks' weights over the kernels' time."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
