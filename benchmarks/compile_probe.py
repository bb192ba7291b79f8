"""How much ``torch.compile`` gains on a CPU decode step: local ``transformers`` on the built-in model,
greedy, eager against compiled (inductor, static cache), tokens compared. A probe toward a compiled
decode step in the server (see the README's comparison with llama.cpp).

    python benchmarks/compile_probe.py [--max_new_tokens 32]

Compiling takes a minute or two on 2 cores; timing is reported, never asserted."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.models.resolve import resolve_model

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 28, 905]


def timed(model, ids: torch.Tensor, tokens: int, **kwargs: object) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    """(tokens/s, tokens) of one greedy run of exactly ``tokens`` tokens, prompt included."""
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)
    return tokens / (time.perf_counter() - started), out[0, ids.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, n = torch.tensor([PROMPT_IDS]), args.max_new_tokens
    with torch.no_grad():
        timed(model, ids, 4)  # warm-up
        eager, reference = timed(model, ids, n)
        timed(model, ids, 4, cache_implementation="static")
        static, static_tokens = timed(model, ids, n, cache_implementation="static")
        model.forward = torch.compile(model.forward, dynamic=False)
        started = time.perf_counter()
        timed(model, ids, 4, cache_implementation="static")  # compiles
        compile_s = time.perf_counter() - started
        timed(model, ids, 8, cache_implementation="static")
        compiled, compiled_tokens = timed(model, ids, n, cache_implementation="static")
    print(f"eager, dynamic cache:    {eager:6.1f} tok/s")
    print(f"eager, static cache:     {static:6.1f} tok/s  tokens identical: {static_tokens == reference}")
    print(f"compiled, static cache:  {compiled:6.1f} tok/s  tokens identical: {compiled_tokens == reference}"
          f"  ({compiled / eager:.2f}x eager; compiling took {compile_s:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
