"""A long prompt through servers on slow uplinks, in a network lab: what dominates, and how much
sending activations in bfloat16 (``ClientConfig.wire_dtype``) saves, measured for exactness.

The lab: a public ``corolla dht``; two homes behind NAT with ``--uplink_mbit`` uplinks, each
serving half of the built-in model (reachable through relays on the dht); a client in a third home
with the same uplink. For each prompt length, the client times the prefill (the time to the
first token of ``generate``: one inference step over the whole prompt) with activations in
float32 and in bfloat16, and compares the last position's logits and 16 greedy tokens with
local ``transformers``; local prefill is timed on the same machine. The bytes one prefill puts
on each uplink are printed too.

    python benchmarks/bench_uplink.py [--uplink_mbit 20] [--prompt_tokens 128 512]

Needs root (network namespaces, nftables). Also ``--client ...`` (the driver starts it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPEATS = 3
NEW_TOKENS = 16


def prompt_ids(tokenizer: Any, length: int) -> Any:
    text = " ".join(["The history of the city goes back many centuries, and its people"] * (length // 8 + 2))
    return tokenizer(text, return_tensors="pt").input_ids[:, :length]


def run_client(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.config import BUILTIN_MODEL, ClientConfig, default_cache_dir
    from corolla.models.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(BUILTIN_MODEL, default_cache_dir()).path)
    results: dict[str, Any] = {}
    for wire in ("float32", "bfloat16"):
        config = ClientConfig(wire_dtype=None if wire == "float32" else wire)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            BUILTIN_MODEL, initial_peers=[args.peer], client_config=config
        )
        with torch.no_grad():
            for length in args.prompt_tokens:
                ids = prompt_ids(tokenizer, length)
                times = []
                for _ in range(REPEATS):  # time to the first token: the prefill, as generate runs it
                    started = time.perf_counter()
                    model.generate(ids, max_new_tokens=1, do_sample=False)
                    times.append(time.perf_counter() - started)
                logits = model(ids).logits[0, -1]
                tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, length:].tolist()
                results[f"{wire}/{length}"] = {
                    "seconds": statistics.median(times), "logits": logits.tolist(), "tokens": tokens,
                }  # fmt: skip
        model.manager.shutdown()
    print(json.dumps(results), flush=True)


def local_reference(lengths: list[int]) -> dict[int, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.config import BUILTIN_MODEL, default_cache_dir
    from corolla.models.resolve import resolve_model

    path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for length in lengths:
            ids = prompt_ids(tokenizer, length)
            model(ids)  # warm up
            times = []
            for _ in range(REPEATS):
                started = time.perf_counter()
                logits = model(ids).logits[0, -1]
                times.append(time.perf_counter() - started)
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, length:].tolist()
            out[length] = {"seconds": statistics.median(times), "logits": logits, "tokens": tokens}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uplink_mbit", type=float, default=20.0)
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args)
        return 0
    from corolla.lab.netlab import exit_unless_available

    exit_unless_available("bench_uplink")
    return drive(args)


def drive(args: argparse.Namespace) -> int:
    import tempfile

    import torch
    from transformers import AutoConfig

    from corolla.config import BUILTIN_MODEL, default_cache_dir
    from corolla.lab.local_swarm import LocalServer, stop_all
    from corolla.lab.netlab import Home, Lab, PublicHost, Topology
    from corolla.models.resolve import resolve_model

    path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    hidden = AutoConfig.from_pretrained(path).hidden_size
    reference = local_reference(args.prompt_tokens)
    topology = Topology(
        public=(PublicHost("dht"),),
        homes=tuple(Home(name, uplink_mbit=args.uplink_mbit) for name in ("home1", "home2", "client")),
    )
    logs = Path(tempfile.mkdtemp(prefix="bench-uplink-"))
    with Lab.up(topology) as lab:
        dht = LocalServer(["--host_maddrs", "/ip4/0.0.0.0/tcp/31000"], log_dir=logs, name="dht",
                          module="corolla.cli.run_dht", prefix=lab.command("dht", []))  # fmt: skip
        servers = [dht]
        try:
            peer = dht.wait_ready(60)
            for host, span in (("home1", "0:15"), ("home2", "15:30")):
                server_args = [BUILTIN_MODEL, "--initial_peers", peer, "--block_indices", span]
                prefix = lab.command(host, [])
                servers.append(LocalServer(server_args, log_dir=logs, name=host, prefix=prefix))
            for server in servers:
                server.wait_ready(300)
            lengths = [str(n) for n in args.prompt_tokens]
            command = [sys.executable, __file__, "--client", "--peer", peer, "--prompt_tokens", *lengths]
            client = lab.run("client", command, capture_output=True, text=True, timeout=1200)
            if client.returncode != 0:
                print(client.stderr[-3000:], file=sys.stderr)
                return 1
            results = json.loads(client.stdout.strip().splitlines()[-1])
        finally:
            stop_all(servers)
    print(f"# built-in model, 2 servers behind NAT (blocks 0:15 and 15:30, through relays), client "
          f"behind NAT; every uplink {args.uplink_mbit:g} Mbit/s; median of {REPEATS}")  # fmt: skip
    print("| prompt tokens | local prefill s | wire | swarm prefill s | / local | MiB per activation "
          "| its time on one uplink s | max logit error | 16 greedy tokens equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.prompt_tokens:
        local = reference[length]
        for wire, size in (("float32", 4), ("bfloat16", 2)):
            got = results[f"{wire}/{length}"]
            error = (torch.tensor(got["logits"]) - local["logits"]).abs().max().item()
            mib = length * hidden * size / 2**20
            uplink_s = length * hidden * size * 8 / (args.uplink_mbit * 1e6)
            print(f"| {length} | {local['seconds']:.2f} | {wire} | {got['seconds']:.2f} "
                  f"| {got['seconds'] / local['seconds']:.1f} | {mib:.2f} | {uplink_s:.2f} | {error:.1e} "
                  f"| {'yes' if got['tokens'] == local['tokens'] else 'no'} |")  # fmt: skip
    print(
        "(a prefill puts one activation on the client's uplink, two on the first server's (its reply and "
        "its push to the next server), one on the second's)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
