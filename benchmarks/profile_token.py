"""Where a generated token's time goes: server compute, the client's own layers, and the rest.

For one session on a one-server and a two-server swarm (the built-in model, set up as
``bench_decode.py`` does), and for ``--sessions`` sessions at once on the one server:

- **server compute**: the servers' compute threads, from their ``compute_seconds`` (info RPC);
- **client layers**: the client's embeddings, final norm and LM head (timed by forward hooks);
- **rest**: everything else of the wall time: messages between processes, thread hops, and
  ``generate``'s own Python (sampling, stopping criteria, streamer).

With several sessions it also reports how many steps each merged decode pass ran and how long a
pass took. Figures are per generated token (per round of one token per session for the
concurrent case), medians of ``--repeats`` runs.

    python benchmarks/profile_token.py [--repeats 3] [--max_new_tokens 64] [--sessions 8]

Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_decode import (
    build_parser,
    concurrent_generate,
    generation_kwargs,
    machine_info,
    quiet_logs,
    route_infos,
    start_servers,
    stop_servers,
)
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from corolla.cli.generate import encode_prompt
from corolla.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from corolla.lab.local_swarm import fresh_log_dir
from corolla.models.resolve import resolve_model


@dataclass
class Split:
    """Per-token seconds of one measured run."""

    token: float
    server: float
    client: float
    passes_per_round: float = 0.0
    steps_per_pass: float = 0.0
    pass_s: float = 0.0

    @property
    def rest(self) -> float:
        return self.token - self.server - self.client


class ClientClock:
    """Wall time spent in the client's own layers (forward hooks on them), from every thread."""

    def __init__(self, model: DistributedModelForCausalLM) -> None:
        self.seconds = 0.0
        self._started: dict[tuple[int, int], float] = {}
        family = model.family
        modules = [model.get_input_embeddings(), family.final_norm(model), model.get_output_embeddings()]
        for module in modules:
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _key(self, module: torch.nn.Module) -> tuple[int, int]:
        return id(module), threading.get_ident()

    def _enter(self, module: torch.nn.Module, args: object) -> None:
        self._started[self._key(module)] = time.perf_counter()

    def _leave(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.seconds += time.perf_counter() - self._started.pop(self._key(module))


def server_totals(model: DistributedModelForCausalLM, num_blocks: int) -> tuple[float, int, int]:
    """Summed over the servers of the route: compute seconds, decode passes, merged steps."""
    seconds, passes, merged = 0.0, 0, 0
    for info in route_infos(model, num_blocks):
        seconds, passes, merged = (
            seconds + info.compute_seconds,
            passes + info.decode_passes,
            merged + info.batched_steps,
        )
    return seconds, passes, merged


@contextmanager
def measured(
    model: DistributedModelForCausalLM, clock: ClientClock, num_blocks: int
) -> Iterator[dict[str, float]]:
    before = (*server_totals(model, num_blocks), clock.seconds, time.perf_counter())
    delta: dict[str, float] = {}
    yield delta
    after = (*server_totals(model, num_blocks), clock.seconds, time.perf_counter())
    for i, name in enumerate(("server", "passes", "merged", "client", "wall")):
        delta[name] = after[i] - before[i]


def one_session(model: DistributedModelForCausalLM, ids: torch.Tensor, tokens: int) -> None:
    with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + tokens):
        model.generate(ids, **generation_kwargs(tokens))


def profile(
    label: str, run: Callable[[], object], model: DistributedModelForCausalLM, clock: ClientClock,
    num_blocks: int, rounds: int, repeats: int, sessions: int = 1,
) -> Split:  # fmt: skip
    run()  # warm-up
    splits = []
    for _ in tqdm(range(repeats), desc=label, file=sys.stderr):
        with measured(model, clock, num_blocks) as d:
            run()
        split = Split(token=d["wall"] / rounds, server=d["server"] / rounds, client=d["client"] / rounds)
        if sessions > 1 and d["passes"]:
            split.passes_per_round = d["passes"] / rounds
            split.steps_per_pass = d["merged"] / d["passes"]
            split.pass_s = d["server"] / d["passes"]
        splits.append(split)
    fields = ("token", "server", "client", "passes_per_round", "steps_per_pass", "pass_s")
    return Split(**{f: statistics.median(getattr(one, f) for one in splits) for f in fields})


def row(label: str, split: Split) -> str:
    ms = [1000 * x for x in (split.token, split.server, split.client, split.rest)]
    line = f"{label:<34}" + "".join(f"{x:>10.1f}" for x in ms)
    if split.passes_per_round:  # the sessions' client layers overlap in time: no "rest" to tell
        line = f"{label:<34}" + "".join(f"{x:>10.1f}" for x in ms[:3]) + f"{'-':>10}"
        line += (
            f"   {split.passes_per_round:.2f} passes/round, {split.steps_per_pass:.1f} steps/pass, "
            f"{1000 * split.pass_s:.1f} ms/pass"
        )
    return line


def profile_swarm(
    splits: list[tuple[int, int]], ids: torch.Tensor, num_blocks: int, args: argparse.Namespace, log_dir: Path
) -> list[str]:
    """The table's rows for a swarm of one server per span: one session, and (with one server)
    ``--sessions`` sessions at once."""
    tokens, lines = args.max_new_tokens, []
    servers = start_servers(splits, args, log_dir)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=[servers[0].maddr or ""], cache_dir=args.cache_dir
        )
        clock = ClientClock(model)
        label = f"one session, {len(splits)} server{'s' if len(splits) > 1 else ''}"
        split = profile(
            label, lambda: one_session(model, ids, tokens), model, clock, num_blocks, tokens, args.repeats
        )
        lines.append(row(label, split))
        if len(splits) == 1:
            label = f"{args.sessions} sessions, 1 server (per round)"
            run = lambda: concurrent_generate(model, ids, tokens, args.sessions)  # noqa: E731
            split = profile(label, run, model, clock, num_blocks, tokens, args.repeats, args.sessions)
            lines.append(row(label, split))
        model.manager.shutdown()
    finally:
        stop_servers(servers)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logs()
    model_dir = resolve_model(args.model, args.cache_dir).path
    num_blocks = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    ids = encode_prompt(AutoTokenizer.from_pretrained(model_dir), args.prompt, use_chat_template=True)
    tokens, half = args.max_new_tokens, num_blocks // 2
    log_dir = fresh_log_dir(args.cache_dir, "profile_token")
    lines = []
    for splits in ([(0, num_blocks)], [(0, half), (half, num_blocks)]):
        lines += profile_swarm(splits, ids, num_blocks, args, log_dir)
    m = machine_info()
    print(f"per-token time, ms (median of {args.repeats} runs of {tokens} tokens; {args.model}, fp32)")
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}")
    print(f"{'':<34}{'token':>10}{'server':>10}{'client':>10}{'rest':>10}")
    print("\n".join(lines))
    print(
        "server = the servers' compute threads; client = its embeddings, final norm and LM head;\n"
        "rest = messages between processes, thread hops and generate()'s own Python. With several\n"
        "sessions a round is one token of each, and the client's layers of different sessions overlap."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
