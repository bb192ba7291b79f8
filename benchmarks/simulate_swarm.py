"""Simulated swarms of 100 and 1,000 servers on an 80-block model: bottleneck against the bound.

Runs the real block choice (``choose_span``) and rebalancing decision (``should_move``) over
synthetic servers that join and leave (``corolla.swarm.simulator``), and prints, after the churn
stops and rebalancing settles, the swarm's bottleneck throughput, the upper bound, their ratio and
the moves it took; ``balance_quality`` 0 is the comparison without rebalancing (join-time choice
only). Every configuration of one size sees the very same servers come and go.

    python benchmarks/simulate_swarm.py
    python benchmarks/simulate_swarm.py --servers 1000 --churn 0.05 --balance_quality 0 0.95 --json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from corolla.swarm.simulator import DEFAULT_PROFILES, SimConfig, SimResult, simulate

COLUMNS = (
    ("servers", 7),
    ("balance_quality", 15),
    ("bottleneck", 10),
    ("bound", 8),
    ("simple bound", 12),
    ("ratio", 5),
    ("ratio in churn", 14),
    ("moves churn+settle", 18),
    ("blocks loaded", 13),
    ("settle rounds", 13),
    ("sim s", 5),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--balance_quality", type=float, nargs="+", default=[0.0, 0.75, 0.95, 1.0])
    parser.add_argument(
        "--churn", type=float, default=0.02, help="share of the servers leaving (and joining) per step"
    )
    parser.add_argument(
        "--joins", type=int, default=None, help="servers joining per step (overrides --churn)"
    )
    parser.add_argument(
        "--leaves", type=int, default=None, help="servers leaving per step (overrides --churn)"
    )
    parser.add_argument("--churn_steps", type=int, default=40)
    parser.add_argument(
        "--check_period", type=float, default=5.0, help="mean steps between a server's checks"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    return parser.parse_args()


def config_for(args: argparse.Namespace, servers: int, balance_quality: float) -> SimConfig:
    churn = max(1, round(args.churn * servers))
    return SimConfig(
        num_servers=servers,
        num_blocks=args.blocks,
        churn_steps=args.churn_steps,
        joins_per_step=churn if args.joins is None else args.joins,
        leaves_per_step=churn if args.leaves is None else args.leaves,
        check_period=args.check_period,
        balance_quality=balance_quality,
        seed=args.seed,
    )


def row(result: SimResult, seconds: float) -> dict[str, object]:
    final, cfg = result.final, result.config
    return {
        "servers": cfg.num_servers,
        "balance_quality": "0 (off)" if cfg.balance_quality == 0 else f"{cfg.balance_quality:g}",
        "bottleneck": f"{final.bottleneck:.1f}",
        "bound": f"{final.bound:.1f}",
        "simple bound": f"{final.simple_bound:.1f}",
        "ratio": f"{final.ratio:.3f}",
        "ratio in churn": f"{result.mean_ratio('churn'):.3f}",
        "moves churn+settle": f"{result.moves('churn')}+{result.moves('settle')}",
        "blocks loaded": result.blocks_loaded,
        "settle rounds": result.settle_rounds,
        "sim s": f"{seconds:.1f}",
    }


def as_json(result: SimResult, seconds: float) -> str:
    config = {k: v for k, v in asdict(result.config).items() if k != "profiles"}
    final = result.final
    return json.dumps(
        {
            "config": config,
            "bottleneck": final.bottleneck,
            "bound": final.bound,
            "simple_bound": final.simple_bound,
            "ratio": final.ratio,
            "ratio_in_churn": result.mean_ratio("churn"),
            "moves_churn": result.moves("churn"),
            "moves_settle": result.moves("settle"),
            "blocks_loaded": result.blocks_loaded,
            "settle_rounds": result.settle_rounds,
            "seconds": seconds,
            "history": [{**asdict(s), "ratio": s.ratio} for s in result.history],
        }
    )


def print_header(args: argparse.Namespace) -> None:
    mix = ", ".join(f"{p.name} {p.share:.0%}" for p in DEFAULT_PROFILES)
    print(f"model: {args.blocks} blocks; GPUs: {mix}")
    joins = f"{args.joins}" if args.joins is not None else f"{args.churn:.0%} of the servers"
    leaves = f"{args.leaves}" if args.leaves is not None else f"{args.churn:.0%} of the servers"
    print(
        f"churn: {args.churn_steps} steps, {joins} joining and {leaves} leaving per step; "
        f"each server checks every {args.check_period:g} steps on average; seed {args.seed}"
    )
    print(
        "ratio = bottleneck / bound after settling; ratio in churn = mean over the second half of the churn"
    )
    print()
    print(" | ".join(name.rjust(width) for name, width in COLUMNS))
    print("-|-".join("-" * width for _, width in COLUMNS))


def main() -> None:
    args = parse_args()
    if not args.json:
        print_header(args)
    for servers in args.servers:
        for balance_quality in args.balance_quality:
            started = time.perf_counter()
            result = simulate(config_for(args, servers, balance_quality))
            seconds = time.perf_counter() - started
            if args.json:
                print(as_json(result, seconds))
            else:
                values = row(result, seconds)
                print(" | ".join(str(values[name]).rjust(width) for name, width in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
