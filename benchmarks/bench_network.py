"""The swarm over a network that behaves like the internet: push on/off, and the stall of a failover.

1. Push: three servers splitting the model, each behind a delaying relay (``--delay_ms`` each
   way), one greedy generation with server-to-server push off and one with it on; per-token
   latency (median time between tokens) for each, and their ratio. Without push a step costs
   one round trip per server; with push, one trip through the chain plus one back.
2. Failover: two full replicas on plain loopback; a ``--failover_tokens`` greedy generation;
   the replica in use is killed with SIGKILL halfway. Reports the stall (the longest gap
   between two tokens, against the median gap) and whether the tokens equal an undisturbed run.

    python benchmarks/bench_network.py [--model smollm2-135m] [--delay_ms 20] [--tokens 32]

Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from hivemind.utils.logging import use_hivemind_log_handler
from transformers import AutoConfig, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from corolla.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from corolla.config import BUILTIN_MODEL, ClientConfig, default_cache_dir
from corolla.lab.local_swarm import LocalServer, fresh_log_dir, start_dht_peer, start_swarm, stop_all
from corolla.lab.relay import DelayRelay, start_delayed_server
from corolla.models.resolve import resolve_model


class TokenTimes(BaseStreamer):
    """Timestamps each new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


class KillServerAt(StoppingCriteria):
    """SIGKILL the server the session uses for block 0 once ``at`` tokens exist."""

    def __init__(self, session, servers: list[LocalServer], at: int) -> None:  # type: ignore[no-untyped-def]
        self.session, self.servers, self.at, self.done = session, servers, at, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if not self.done and input_ids.shape[1] >= self.at:
            peer = self.session.route[0].peer_id
            next(s for s in self.servers if (s.maddr or "").endswith(peer)).kill()
            self.done = True
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def client(model: str, peer: str, **config: object) -> DistributedModelForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=[peer], client_config=replace(ClientConfig(), **config)
    )


def timed_generate(model: DistributedModelForCausalLM, ids: torch.Tensor, tokens: int) -> TokenTimes:
    clock = TokenTimes()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock)
    return clock


def measure_push(model: str, num_blocks: int, delay_s: float, tokens: int, log_dir: Path) -> None:
    dht = start_dht_peer(log_dir=log_dir)
    cuts = [0, num_blocks // 3, 2 * num_blocks // 3, num_blocks]
    started: list[tuple[LocalServer, DelayRelay]] = []
    try:
        for a, b in zip(cuts, cuts[1:], strict=False):
            peers = [dht.maddr or ""]
            server = start_delayed_server(
                model, (a, b), delay_s, initial_peers=peers, extra_args=["--throughput", "1"], log_dir=log_dir
            )
            started.append(server)
        ids = torch.arange(1, 9).unsqueeze(0)
        latency = {}
        for push in (False, True):
            remote = client(model, dht.maddr or "", use_push=push)
            timed_generate(remote, ids, 4)  # warm-up: connections, RTTs
            latency[push] = statistics.median(timed_generate(remote, ids, tokens).gaps())
            remote.manager.shutdown()
        print(f"push, 3 servers behind {delay_s * 1000:.0f} ms relays (each way), {tokens} tokens:")
        ratio = latency[True] / latency[False]
        print(f"  per-token latency without push {latency[False] * 1000:.1f} ms, "
              f"with push {latency[True] * 1000:.1f} ms, ratio {ratio:.2f} (target <= 0.67)")  # fmt: skip
    finally:
        for server, relay in started:
            server.stop()
            relay.stop()
        dht.stop()


def measure_failover(model: str, num_blocks: int, tokens: int, log_dir: Path) -> None:
    servers = start_swarm(model, [(0, num_blocks), (0, num_blocks)], extra_args=["--throughput", "1"],
                          log_dir=log_dir)  # fmt: skip
    ids = torch.arange(1, 9).unsqueeze(0)
    try:
        remote = client(model, servers[0].maddr or "", step_timeout=10.0)
        undisturbed = timed_generate(remote, ids, tokens)
        with torch.no_grad():
            expected = remote.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        clock = TokenTimes()
        with torch.no_grad(), remote.inference_session(max_length=ids.shape[1] + tokens) as session:
            killer = KillServerAt(session, servers, ids.shape[1] + tokens // 2)
            got = remote.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  streamer=clock, stopping_criteria=[killer])  # fmt: skip
        gaps = clock.gaps()
        print(
            f"failover, 2 replicas, {tokens} tokens, SIGKILL of the serving replica at token {tokens // 2}:"
        )
        same = "yes" if torch.equal(got, expected) else "NO"
        print(f"  stall {max(gaps) * 1000:.0f} ms (median gap {statistics.median(gaps) * 1000:.1f} ms, "
              f"undisturbed median {statistics.median(undisturbed.gaps()) * 1000:.1f} ms); "
              f"tokens identical to an undisturbed run: {same}")  # fmt: skip
        remote.manager.shutdown()
    finally:
        stop_all(servers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=BUILTIN_MODEL, help="model name or path (default: the built-in one)"
    )
    parser.add_argument("--delay_ms", type=float, default=20.0, help="relay delay each way, per server")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated for the push figures")
    parser.add_argument("--failover_tokens", type=int, default=200, help="tokens of the failover run")
    args = parser.parse_args(argv)
    use_hivemind_log_handler("nowhere")
    path = resolve_model(args.model, default_cache_dir()).path
    num_blocks = AutoConfig.from_pretrained(path).num_hidden_layers
    log_dir = fresh_log_dir(default_cache_dir(), "bench_network")
    print(f"model {args.model} ({num_blocks} blocks); server logs in {log_dir}", flush=True)
    measure_push(args.model, num_blocks, args.delay_ms / 1000, args.tokens, log_dir)
    measure_failover(args.model, num_blocks, args.failover_tokens, log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
