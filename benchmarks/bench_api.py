"""Several answers in one API request: do ``n`` choices and lists of prompts run together?

One server of the built-in model (all blocks) and ``corolla api``'s app in-process (FastAPI's test
client). For each way of asking for ``--choices`` greedy answers of ``--tokens`` tokens, the
median of ``--repeats`` wall-clock times and the tokens per second over all choices:

- one request per answer, one after another (the baseline: nothing runs together);
- one request with ``n`` = choices (sampled with a seed: the answers differ);
- one completions request with a list of that many prompts.

The speed-up against the baseline says how much the server merged the choices' decode steps (on
this machine's 2 cores the server computes, the client runs each choice's LM head). Timing is
reported, never asserted.

    python benchmarks/bench_api.py [--choices 4] [--tokens 32] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.lab.local_swarm import fresh_log_dir, start_swarm, stop_all
from corolla.models.resolve import resolve_model

QUESTION = [{"role": "user", "content": "Tell me about the city of Paris."}]
PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn is", "In the year 2050"]


def timed(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """The median wall-clock seconds of ``repeats`` runs and the tokens the last one generated."""
    times, tokens = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--choices", type=int, default=4, help="answers per way of asking (at most 4 prompts)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args()

    from fastapi.testclient import TestClient

    from corolla.api.app import create_app
    from corolla.api.engine import Engine

    resolve_model(BUILTIN_MODEL, default_cache_dir())  # converted once, then cached
    servers = start_swarm(BUILTIN_MODEL, [(0, 30)], log_dir=fresh_log_dir(default_cache_dir(), "bench_api"))
    engine = Engine.load(BUILTIN_MODEL, initial_peers=[servers[0].maddr or ""])
    client = TestClient(create_app(engine))
    try:
        common = {"model": BUILTIN_MODEL, "max_tokens": args.tokens}

        def chat(n: int, **fields: Any) -> int:
            body = {**common, "messages": QUESTION, "n": n, **fields}
            return int(client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"])

        def one_by_one() -> int:
            return sum(chat(1, temperature=0) for _ in range(args.choices))

        def n_choices() -> int:
            return chat(args.choices, temperature=1.0, seed=1)

        def prompt_list() -> int:
            body = {**common, "prompt": PROMPTS[: args.choices], "temperature": 0}
            return int(client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"])

        chat(1, temperature=0)  # warm-up: routes, connections, caches
        figures: dict[str, Any] = {"choices": args.choices, "tokens": args.tokens}
        for name, run in (("one_by_one", one_by_one), ("n", n_choices), ("prompt_list", prompt_list)):
            seconds, tokens = timed(args.repeats, run)
            figures[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
        for name in ("n", "prompt_list"):
            figures[name]["speedup"] = round(
                figures[name]["tokens_per_s"] / figures["one_by_one"]["tokens_per_s"], 2
            )
    finally:
        engine.close()
        stop_all(servers)
    if args.json:
        print(json.dumps(figures))
        return
    print(
        f"{args.choices} answers of {args.tokens} tokens, built-in model, one server "
        f"(median of {args.repeats})"
    )
    for name, label in (("one_by_one", "one request each"), ("n", f"one request, n={args.choices}"),
                        ("prompt_list", f"one request, {args.choices} prompts")):  # fmt: skip
        row = figures[name]
        extra = f"  = {row['speedup']:.2f}x" if "speedup" in row else ""
        print(f"  {label:<28} {row['seconds']:6.2f} s  {row['tokens_per_s']:6.1f} tok/s{extra}")


if __name__ == "__main__":
    main()
