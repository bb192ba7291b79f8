"""Churn soak in a network lab: servers dying and coming back under clients that keep generating.

The lab (``corolla.lab.netlab``): a public ``corolla dht``, 2 public server hosts, 4 server homes
behind NAT with ``--uplink_mbit`` uplinks, and 3 client homes. Six servers of the built-in model
place themselves (``--num_blocks 15``: the model is covered three times; twice while one is down);
the home servers are reachable only through relays on the ``corolla dht``. Each client runs greedy
generations of ``--tokens`` tokens back to back, in sessions of their own. Every ``--interval``
seconds a driver kills a random running server (SIGKILL or SIGTERM, at random) and starts it again
``--restart_after`` seconds later.

Printed at the end: generations started and completed, tokens equal to local ``transformers``
(every one of them), the stall after a kill (from the kill to the next token of each generation
then in flight) p50/p99/max, server crashes (exits the driver did not cause), whether every server
is back to no sessions and an empty cache, and the per-token latency of generations routed only
through direct servers against those with a relayed hop.

    python benchmarks/bench_churn.py [--minutes 10] [--seed 0]

Needs root (network namespaces, nftables); ``--minutes 2`` is the suite's version.
Also ``python benchmarks/bench_churn.py --client ...``: one client (the driver starts these).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "A good way to learn a new language is",
]
METRICS_PORT = 9100
DHT_PORT = 31000


# --- the client (runs in a client home) -------------------------------------------------------


def run_client(args: argparse.Namespace) -> None:
    import logging
    import os

    import torch
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.config import BUILTIN_MODEL, ClientConfig, default_cache_dir
    from corolla.models.resolve import resolve_model
    from corolla.swarm.maddrs import is_relayed

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt = True

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt:
                self.times.append(time.time())
            self.prompt = False

        def end(self) -> None:
            pass

    if os.environ.get("BENCH_CHURN_DEBUG"):  # the client's routing and failover decisions, in its log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("corolla").setLevel(logging.DEBUG)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(BUILTIN_MODEL, default_cache_dir()).path)
    config = ClientConfig(use_push=not os.environ.get("BENCH_CHURN_NO_PUSH"))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        BUILTIN_MODEL, initial_peers=[args.peer], client_config=config
    )
    out_path, stop = Path(args.out), Path(args.stop)
    index = args.first_prompt
    with out_path.open("a") as out, torch.no_grad():
        while not stop.exists():
            prompt = index % len(PROMPTS)
            ids = tokenizer(PROMPTS[prompt], return_tensors="pt").input_ids
            stamps = Stamps()
            record: dict[str, Any] = {"prompt": prompt, "start": time.time()}
            try:
                with model.inference_session(max_length=ids.shape[1] + args.tokens) as session:
                    tokens = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, streamer=stamps)
                    route = [h.peer_id for h in session.route]
                record["tokens"] = tokens[0, ids.shape[1] :].tolist()
                record["relayed_hops"] = sum(
                    1 for peer in route if any(is_relayed(a) for a in model.manager.addrs_of(peer)[:1])
                )
            except Exception as e:  # reported, not raised: the soak counts it as not completed
                record["error"] = " ".join(str(e).split())[:300]
            record["stamps"] = stamps.times
            out.write(json.dumps(record) + "\n")
            out.flush()
            index += 1
    model.manager.shutdown()


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class Volunteer:
    """One server host and the process running there now (None while it is down)."""

    host: str
    args: list[str]
    process: Any = None  # LocalServer
    starts: int = 0
    expected_exit: bool = False
    crashes: list[str] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--restart_after", type=float, default=10.0)
    parser.add_argument("--uplink_mbit", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_dir", default=None, help="keep the logs here (default: a temporary folder)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--stop", help=argparse.SUPPRESS)
    parser.add_argument("--first_prompt", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args)
        return 0
    from corolla.lab.netlab import exit_unless_available

    exit_unless_available("bench_churn")  # and SIGTERM then stops the servers and removes the lab
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            logs = Path(args.log_dir)
            logs.mkdir(parents=True, exist_ok=True)
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-churn-")))
        return soak(args, logs)


def soak(args: argparse.Namespace, logs: Path) -> int:
    from corolla.config import BUILTIN_MODEL, default_cache_dir
    from corolla.lab.local_swarm import LocalServer
    from corolla.lab.netlab import Home, Lab, PublicHost, Topology
    from corolla.models.resolve import resolve_model

    resolve_model(BUILTIN_MODEL, default_cache_dir())  # converted once, before anything is timed
    rng = random.Random(args.seed)
    topology = Topology(
        public=(PublicHost("dht"), PublicHost("pub1"), PublicHost("pub2")),
        homes=tuple(Home(f"home{i}", uplink_mbit=args.uplink_mbit) for i in range(1, 5))
        + tuple(Home(f"client{i}") for i in range(1, 4)),
    )
    print(f"# lab: 1 dht + 2 public servers + 4 servers behind NAT ({args.uplink_mbit:g} Mbit/s uplinks) "
          f"+ 3 clients behind NAT; {args.minutes:g} min, a kill every {args.interval:g} s, restart after "
          f"{args.restart_after:g} s; logs in {logs}", flush=True)  # fmt: skip
    with Lab.up(topology) as lab:
        dht = LocalServer(["--host_maddrs", f"/ip4/0.0.0.0/tcp/{DHT_PORT}"], log_dir=logs, name="dht",
                          module="corolla.cli.run_dht", prefix=lab.command("dht", []))  # fmt: skip
        volunteers: list[Volunteer] = []
        clients: list[subprocess.Popen[bytes]] = []
        stop_file = logs / "stop"
        try:
            peer = dht.wait_ready(60)
            server_args = [BUILTIN_MODEL, "--initial_peers", peer, "--num_blocks", "15",
                           "--metrics_port", str(METRICS_PORT), "--update_period", "10"]  # fmt: skip
            for host in ["pub1", "pub2", "home1", "home2", "home3", "home4"]:
                volunteers.append(Volunteer(host, server_args))
            t0 = time.monotonic()
            for v in volunteers:
                start_volunteer(lab, v, logs)
            for v in volunteers:
                v.process.wait_ready(300)
            print(f"# swarm ready in {time.monotonic() - t0:.0f} s", flush=True)
            for i in range(3):
                out = logs / f"client{i + 1}.jsonl"
                cmd = [sys.executable, __file__, "--client", "--peer", peer, "--out", str(out), "--stop",
                       str(stop_file), "--tokens", str(args.tokens), "--first_prompt", str(i)]  # fmt: skip
                log = (logs / f"client{i + 1}.log").open("w")
                clients.append(lab.popen(f"client{i + 1}", cmd, stdout=log, stderr=subprocess.STDOUT))
            kills = drive(lab, volunteers, logs, args, rng)
            stop_file.touch()
            for client in clients:
                try:
                    client.wait(120)
                except subprocess.TimeoutExpired:
                    client.kill()
            time.sleep(3.0)  # sessions end on the servers as their clients close them
            idle = {v.host: server_state(lab, v.host) for v in volunteers if v.process is not None}
        finally:
            stop_file.touch()
            for client in clients:
                if client.poll() is None:
                    client.kill()
            for v in volunteers:
                if v.process is not None:
                    v.expected_exit = True
                    v.process.stop()
            dht.stop()
    return report(args, logs, kills, volunteers, idle)


def start_volunteer(lab: Any, v: Volunteer, logs: Path) -> None:
    from corolla.lab.local_swarm import LocalServer

    v.starts += 1
    v.expected_exit = False
    v.process = LocalServer(v.args, log_dir=logs, name=f"{v.host}-{v.starts}", prefix=lab.command(v.host, []))


def drive(lab: Any, volunteers: list[Volunteer], logs: Path, args: argparse.Namespace,
          rng: random.Random) -> list[float]:  # fmt: skip
    """Kill a random running server every ``interval`` s, restart it ``restart_after`` s later;
    the wall-clock times of the kills."""
    kills: list[float] = []
    restarts: list[tuple[float, Volunteer]] = []
    end = time.monotonic() + args.minutes * 60
    next_kill = time.monotonic() + args.interval
    while time.monotonic() < end:
        time.sleep(0.5)
        now = time.monotonic()
        for v in volunteers:  # an exit nobody asked for is a crash
            if v.process is not None and not v.expected_exit and v.process.process.poll() is not None:
                v.crashes.append(f"{v.host}: exited {v.process.process.returncode}; {v.process.log_tail(5)}")
                v.process = None
                restarts.append((now + args.restart_after, v))
        for due, v in list(restarts):
            if now >= due:
                restarts.remove((due, v))
                start_volunteer(lab, v, logs)
        if now >= next_kill:
            next_kill = now + args.interval
            running = [v for v in volunteers if v.process is not None and v.process.ready_after is not None]
            if running:
                victim = rng.choice(running)
                how = rng.choice([signal.SIGKILL, signal.SIGTERM])
                victim.expected_exit = True
                victim.process.process.send_signal(how)
                kills.append(time.time())
                print(f"# {time.strftime('%H:%M:%S')} {how.name} {victim.host}", flush=True)
                try:
                    victim.process.process.wait(30)
                except subprocess.TimeoutExpired:
                    victim.process.kill()
                victim.process = None
                restarts.append((now + args.restart_after, victim))
    for _, v in restarts:  # leave the swarm whole for the idle check
        start_volunteer(lab, v, logs)
    for v in volunteers:
        if v.process is not None:
            with contextlib.suppress(Exception):
                v.process.wait_ready(300)
    return kills


def server_state(lab: Any, host: str) -> tuple[float, float]:
    """(active sessions, attention-cache tokens in use) from the server's Prometheus metrics."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    out = lab.run(host, [sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout
    values = {}
    for line in out.splitlines():
        if line.startswith(("corolla_server_active_sessions ", "corolla_server_cache_tokens_used ")):
            name, value = line.split()
            values[name] = float(value)
    return (
        values.get("corolla_server_active_sessions", -1.0),
        values.get("corolla_server_cache_tokens_used", -1.0),
    )


def reference_tokens(tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.config import BUILTIN_MODEL, default_cache_dir
    from corolla.models.resolve import resolve_model

    path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append(
                model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1] :].tolist()
            )
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(args: argparse.Namespace, logs: Path, kills: list[float], volunteers: list[Volunteer],
           idle: dict[str, tuple[float, float]]) -> int:  # fmt: skip
    records = [json.loads(line) for path in sorted(logs.glob("client*.jsonl")) for line in path.open()]
    reference = reference_tokens(args.tokens)
    completed = [r for r in records if "tokens" in r]
    exact = [r for r in completed if r["tokens"] == reference[r["prompt"]]]
    stalls = []
    for kill in kills:  # from each kill to the next token of every generation in flight then
        for r in records:
            stamps = r["stamps"]
            if r["start"] <= kill and stamps and kill < stamps[-1]:
                stalls.append(next(t for t in stamps if t > kill) - kill)
    gaps = {0: [], 1: []}
    for r in completed:
        if len(r["stamps"]) > 1:
            per_token = (r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1)
            gaps[min(1, r.get("relayed_hops", 0))].append(per_token)
    crashes = [c for v in volunteers for c in v.crashes]
    back_to_idle = all(sessions == 0 and used == 0 for sessions, used in idle.values())
    print("| generations started | completed | tokens equal to local | stall after a kill p50 / p99 / max "
          "| kills | server crashes | sessions and cache idle at the end |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(records)} | {len(completed)} ({100 * len(completed) / max(1, len(records)):.0f} %) "
          f"| {len(exact)} of {len(completed)} ({100 * len(exact) / max(1, len(completed)):.0f} %) "
          f"| {percentile(stalls, 0.5):.2f} / {percentile(stalls, 0.99):.2f} / "
          f"{max(stalls, default=0):.2f} s "
          f"| {len(kills)} | {len(crashes)} | {'yes' if back_to_idle else 'no'} {idle} |")  # fmt: skip
    direct = statistics.median(gaps[0]) if gaps[0] else float("nan")
    relayed = statistics.median(gaps[1]) if gaps[1] else float("nan")
    print(
        f"per-token latency (median over generations): direct route {1000 * direct:.0f} ms "
        f"({len(gaps[0])} generations), with a relayed hop {1000 * relayed:.0f} ms ({len(gaps[1])})"
    )
    for r in records:
        if "error" in r:
            print(f"  failed: {r['error']}")
    for crash in crashes:
        print(f"  crash: {crash}")
    correct = bool(records) and len(completed) == len(records) and len(exact) == len(completed)
    correct = correct and not crashes and back_to_idle
    stall_ok = percentile(stalls, 0.99) <= 5.0 if stalls else True
    print(f"correctness (100 % completed, 100 % exact, 0 crashes, idle at the end): "
          f"{'met' if correct else 'NOT met'}")  # fmt: skip
    print(f"stall target (p99 <= 5 s): {'met' if stall_ok else 'NOT met'}")
    return 0 if correct else 1  # speed is reported, correctness decides


if __name__ == "__main__":
    sys.exit(main())
