"""``corolla demo``: a private swarm of two servers splitting the built-in model, one chat answer
streamed through it, the route it took, then everything shut down."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from corolla.cli.args import client_parser, run_client_command
from corolla.cli.generate import encode_prompt
from corolla.config import BUILTIN_MODEL

PROG = "corolla demo"
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def build_parser() -> argparse.ArgumentParser:
    p = client_parser(PROG, __doc__, swarm=False)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="what to ask the model")
    p.add_argument("--max_new_tokens", type=int, default=64, help="most tokens to generate")
    return p


def run(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, TextStreamer

    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.lab.local_swarm import fresh_log_dir, shared_cores_args, start_swarm, stop_all
    from corolla.models.resolve import resolve_model

    print(f"Preparing the built-in model {BUILTIN_MODEL} (converted once, then cached)...", flush=True)
    path = resolve_model(BUILTIN_MODEL, args.cache_dir).path
    num_blocks = AutoConfig.from_pretrained(path).num_hidden_layers
    half = num_blocks // 2
    print(f"Starting two servers: blocks 0:{half} and {half}:{num_blocks} ...", flush=True)
    t0 = time.monotonic()
    log_dir = fresh_log_dir(args.cache_dir, "demo")
    servers = start_swarm(
        BUILTIN_MODEL,
        [(0, half), (half, num_blocks)],
        extra_args=["--cache_dir", args.cache_dir, *shared_cores_args(2)],
        log_dir=log_dir,
    )
    try:
        print(f"Swarm ready in {time.monotonic() - t0:.1f} s; the servers' logs: {log_dir}", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            BUILTIN_MODEL, initial_peers=[servers[0].maddr or ""], cache_dir=args.cache_dir
        )
        input_ids = encode_prompt(tokenizer, args.prompt, use_chat_template=True)
        print(f"\nUser: {args.prompt}\nAssistant: ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad(), model.inference_session(input_ids.shape[1] + args.max_new_tokens) as session:
            model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
            route = session.route
        print("\nRoute taken:")
        for hop in route:
            print(f"  blocks {hop.start:>2}:{hop.end:<2} on server ...{hop.peer_id[-12:]}")
        model.manager.shutdown()
    finally:
        print("Shutting the swarm down...", flush=True)
        stop_all(servers)


def main(argv: Sequence[str] | None = None) -> int:
    return run_client_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
