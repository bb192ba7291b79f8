"""Decode speed of the swarm against plain ``transformers`` on this machine, in one run.

Measures, for the same chat prompt and exactly ``--max_new_tokens`` greedy tokens:

1. local ``transformers`` (fp32), before any server is started;
2. a swarm of one server (all blocks) on loopback;
3. a swarm of two servers (the blocks split in half) on loopback;
4. local ``transformers`` again, after every server has stopped.

Phases never overlap, so on a small machine the local figures are not disturbed by busy
servers. Every figure is the median of ``--repeats`` timed runs, each after ``--warmup``
untimed runs. Decode rate = (tokens after the first) / (time after the first token); time
to first token (TTFT) = from calling ``generate`` (for the swarm: from opening the
inference session) to the first new token, prefill included.

With the one-server swarm up it also measures a prefill (one forward pass over a fixed
``--prefill_tokens``-token prompt, against local ``transformers``) and ``--sessions`` sessions
generating at once (their aggregate decode tokens/s against one session's; the server merges
their decode steps into one pass), and it reports every server's start-up time, each against
the targets of the performance issue.

    python benchmarks/bench_decode.py [--repeats 3] [--max_new_tokens 64] [--sessions 8] [--json]
    python benchmarks/bench_decode.py --defaults [--hog [--hog_apart]]

``--defaults`` starts the servers as a user would, with no flag beyond the model and the swarm
(no ``--num_threads`` split): what ``corolla serve`` plus a Python client on the same machine
give out of the box. ``--hog`` keeps one busy process per core running through every phase, the
local ones included (a volunteer's desktop with other work on it); their CPU shows in "others".
By default they run in the benchmark's own session, so the kernel shares the CPU among all
threads alike: the harder case. ``--hog_apart`` starts them in a session of their own, as
programs started from another terminal or the desktop are; where the kernel groups a session's
threads (autogroup, ``/proc/sys/kernel/sched_autogroup_enabled``) it then shares the CPU
between the sessions first.

Timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hivemind.utils.logging import use_hivemind_log_handler
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from corolla.cli.generate import encode_prompt
from corolla.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.lab.local_swarm import LocalServer, fresh_log_dir, shared_cores_args, start_swarm, usable_cores
from corolla.models.resolve import resolve_model
from corolla.protocol.messages import ServerInfoReply

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TARGETS = {"swarm_1": 0.85, "swarm_2": 0.75}  # swarm decode tokens/s over local, at least
PREFILL_TARGET = 1.2  # swarm prefill time over local, at most
CONCURRENT_TARGET = 3.0  # aggregate decode tokens/s of --sessions sessions over one session, at least
STARTUP_TARGET_S = 10.0  # server start until ready, at most


# --- measuring one generate() -----------------------------------------------------------------


class TokenClock(BaseStreamer):
    """A ``generate`` streamer that timestamps every new token (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now)
        self.tokens.extend(value.flatten().tolist())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class Run:
    """One timed ``generate``."""

    ttft_s: float
    decode_tokens_per_s: float
    tokens: list[int]


def run_from_clock(started: float, clock: TokenClock) -> Run:
    if len(clock.times) < 2:
        raise RuntimeError(f"generate produced {len(clock.times)} tokens; need at least 2 to time decoding")
    decode_s = clock.times[-1] - clock.times[0]
    return Run(
        ttft_s=clock.times[0] - started,
        decode_tokens_per_s=(len(clock.times) - 1) / decode_s,
        tokens=clock.tokens,
    )


def generation_kwargs(max_new_tokens: int) -> dict[str, Any]:
    """Greedy, and exactly ``max_new_tokens`` tokens (EOS is suppressed until then)."""
    return {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}


def local_generate(model: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int) -> Run:
    clock = TokenClock()
    input_ids = input_ids.to(model.device)
    started = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=clock,
        **generation_kwargs(max_new_tokens),
    )
    return run_from_clock(started, clock)


def swarm_generate(model: DistributedModelForCausalLM, input_ids: torch.Tensor, max_new_tokens: int) -> Run:
    clock = TokenClock()
    started = time.perf_counter()
    with torch.no_grad(), model.inference_session(max_length=input_ids.shape[1] + max_new_tokens):
        model.generate(input_ids, streamer=clock, **generation_kwargs(max_new_tokens))
    return run_from_clock(started, clock)


def prefill_ids(tokens: int) -> torch.Tensor:
    """A fixed random prompt of ``tokens`` tokens (the same in every run)."""
    return torch.randint(100, 10_000, (1, tokens), generator=torch.Generator().manual_seed(0))


def time_prefill(model: PreTrainedModel, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of a full forward pass over ``ids`` (logits of every position), after a warm-up."""
    times = []
    ids = ids.to(model.device)
    with torch.no_grad():
        for i in range(repeats + 1):
            started = time.perf_counter()
            model(ids)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            if i:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def concurrent_generate(
    model: DistributedModelForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, sessions: int
) -> tuple[float, list[list[int]]]:
    """``sessions`` threads, each generating in its own inference session at the same time: the
    aggregate new tokens/s (all tokens / wall time) and each session's new tokens."""
    results: list[list[int]] = [[] for _ in range(sessions)]

    def one(index: int) -> None:
        with torch.no_grad(), model.inference_session(max_length=input_ids.shape[1] + max_new_tokens):
            out = model.generate(input_ids, **generation_kwargs(max_new_tokens))
        results[index] = out[0, input_ids.shape[1] :].tolist()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sessions * max_new_tokens / (time.perf_counter() - started), results


# --- how busy the rest of the machine was ---------------------------------------------------------


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine, in clock ticks, from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


HOGS: set[int] = set()  # --hog's busy processes: other work on the machine, not ours


def _our_jiffies() -> int:
    """CPU time of this process and all its descendants (servers, p2p daemons), in clock ticks,
    those that ended included (a process's children's time once it has waited for them, such as
    llama-bench's); the ``--hog`` processes count as others'."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process has gone
        pid = int(stat.parent.name)
        parents[pid], ticks[pid] = int(rest[1]), sum(int(t) for t in rest[11:15])  # u, s, cu, cs time
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [
            pid for pid, ppid in parents.items() if ppid == parent and pid not in ours and pid not in HOGS
        ]
        ours.update(children)
        frontier += children
    return sum(ticks.get(pid, 0) for pid in ours)


class OthersLoad:
    """Share of the machine's CPU capacity used by processes that are not ours, between two points."""

    def __init__(self) -> None:
        self._start: tuple[int, int, int] | None = None

    def start(self) -> None:
        try:
            self._start = (*_machine_jiffies(), _our_jiffies())
        except (OSError, ValueError, IndexError):
            self._start = None  # no /proc here

    def share(self) -> float | None:
        if self._start is None:
            return None
        busy, total = _machine_jiffies()
        ours = _our_jiffies()
        elapsed = total - self._start[1]
        others = (busy - self._start[0]) - (ours - self._start[2])
        return max(0.0, others / elapsed) if elapsed > 0 else None


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Phase:
    """Timed runs of one configuration, and its servers' start-up times."""

    key: str
    label: str
    runs: list[Run] = field(default_factory=list)
    ready_after_s: list[float] = field(default_factory=list)
    others_cpu_share: float | None = None  # during the timed runs
    prefill_s: float | None = None  # median full forward pass over the prefill prompt
    concurrent_tokens_per_s: list[float] = field(default_factory=list)  # aggregate, per repeat
    concurrent_identical: bool | None = None  # every concurrent session gave the reference tokens
    decode_threads: list[int | None] = field(default_factory=list)  # the servers' choice, after the runs

    @property
    def decode_tokens_per_s(self) -> float:
        return statistics.median(r.decode_tokens_per_s for r in self.runs)

    @property
    def ttft_s(self) -> float:
        return statistics.median(r.ttft_s for r in self.runs)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "ttft_s": self.ttft_s,
            "runs": [{"decode_tokens_per_s": r.decode_tokens_per_s, "ttft_s": r.ttft_s} for r in self.runs],
            "ready_after_s": self.ready_after_s,
            "others_cpu_share": self.others_cpu_share,
            "prefill_s": self.prefill_s,
            "concurrent_tokens_per_s": (
                statistics.median(self.concurrent_tokens_per_s) if self.concurrent_tokens_per_s else None
            ),
            "concurrent_identical": self.concurrent_identical,
            "decode_threads": self.decode_threads,
        }


def repeat_runs(phase: Phase, generate_once: Callable[[], Run], warmup: int, repeats: int) -> Phase:
    with tqdm(total=warmup + repeats, desc=phase.label, unit="run", file=sys.stderr) as bar:
        for _ in range(warmup):
            generate_once()
            bar.update()
        load = OthersLoad()
        load.start()
        for _ in range(repeats):
            phase.runs.append(generate_once())
            bar.update()
        phase.others_cpu_share = load.share()
    return phase


def measure_llamacpp(model_dir: Path, input_ids: torch.Tensor, args: argparse.Namespace) -> Phase:
    """llama.cpp on the same model in float32 (``llamacpp_row.py``): per repeat, its generation rate
    and, as the time to the first token, its processing time for a prompt of the same length."""
    from llamacpp_row import bench, gguf_of

    threads = usable_cores()
    gguf = gguf_of(model_dir, Path(args.cache_dir))
    phase = Phase("llamacpp", f"llama.cpp float32, {threads} threads")
    load = OthersLoad()
    load.start()
    decode = bench(gguf, threads, prompt=0, generate=args.max_new_tokens, repeats=args.repeats)
    prompt = bench(gguf, threads, prompt=input_ids.shape[1], generate=0, repeats=args.repeats)
    phase.others_cpu_share = load.share()
    phase.runs = [Run(input_ids.shape[1] / p, d, []) for d, p in zip(decode, prompt, strict=True)]
    return phase


def measure_local(
    key: str, label: str, model: PreTrainedModel, input_ids: torch.Tensor, args: argparse.Namespace
) -> Phase:
    phase = repeat_runs(
        Phase(key, label),
        lambda: local_generate(model, input_ids, args.max_new_tokens),
        args.warmup,
        args.repeats,
    )
    phase.prefill_s = time_prefill(model, prefill_ids(args.prefill_tokens), args.repeats)
    return phase


def start_servers(
    splits: Sequence[tuple[int, int]], args: argparse.Namespace, log_dir: Path
) -> list[LocalServer]:
    """One server per span, each joining the first, the machine's cores split between them (as
    ``corolla demo`` does); stops those already started on failure."""
    extra = ["--cache_dir", args.cache_dir]
    if not args.defaults:
        extra += ["--device", args.device, "--torch_dtype", args.torch_dtype]
        if args.device == "cpu":
            extra += shared_cores_args(len(splits))
    servers: list[LocalServer] = []
    try:
        for start, end in tqdm(splits, desc="starting servers", unit="server", file=sys.stderr):
            peers = [servers[0].maddr or ""] if servers else []
            servers += start_swarm(
                args.model, [(start, end)], extra_args=extra, initial_peers=peers, log_dir=log_dir
            )
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def route_infos(model: DistributedModelForCausalLM, num_blocks: int) -> list[ServerInfoReply]:
    """The info RPC's reply of each server on the client's route through the model."""
    manager = model.manager
    return [
        manager.loop.run(call_info(manager.p2p, manager.peer(hop)), timeout=30)
        for hop in manager.route(0, num_blocks)
    ]


def stop_servers(servers: Sequence[LocalServer]) -> None:
    for server in servers:
        server.stop()


def measure_swarm(
    key: str,
    splits: Sequence[tuple[int, int]],
    input_ids: torch.Tensor,
    args: argparse.Namespace,
    log_dir: Path,
) -> Phase:
    count = len(splits)
    spans = ", ".join(f"{a}:{b}" for a, b in splits)
    phase = Phase(key, f"swarm, {count} server{'s' if count > 1 else ''} ({spans})")
    servers = start_servers(splits, args, log_dir)
    try:
        phase.ready_after_s = [s.ready_after or float("nan") for s in servers]
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=[servers[0].maddr or ""], cache_dir=args.cache_dir
        )
        try:
            repeat_runs(
                phase,
                lambda: swarm_generate(model, input_ids, args.max_new_tokens),
                args.warmup,
                args.repeats,
            )
            phase.decode_threads = [info.decode_threads for info in route_infos(model, splits[-1][1])]
            if count == 1:  # prefill and concurrent sessions: measured on the one-server swarm
                phase.prefill_s = time_prefill(model, prefill_ids(args.prefill_tokens), args.repeats)
                reference = phase.runs[0].tokens
                identical = True
                for _ in tqdm(range(args.repeats), desc=f"{args.sessions} sessions at once", file=sys.stderr):
                    rate, outputs = concurrent_generate(model, input_ids, args.max_new_tokens, args.sessions)
                    phase.concurrent_tokens_per_s.append(rate)
                    identical = identical and all(out == reference for out in outputs)
                phase.concurrent_identical = identical
        finally:
            model.manager.shutdown()
    finally:
        stop_servers(servers)
    return phase


# --- the report -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "cpu": cpu,
        "cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def build_report(phases: dict[str, Phase], args: argparse.Namespace, prompt_tokens: int) -> dict[str, Any]:
    local_runs = phases["local_before"].runs + phases["local_after"].runs
    local = Phase("local", "local (all runs)", runs=local_runs)
    reference = phases["local_before"].runs[0].tokens
    swarm_keys = [k for k in phases if k.startswith("swarm")]
    ours = [key for key in phases if key != "llamacpp"]  # llama.cpp: speed only
    identical = {key: all(r.tokens == reference for r in phases[key].runs) for key in ours}
    return {
        "machine": machine_info(),
        "settings": {
            "model": args.model,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "prompt_tokens": prompt_tokens,
            "dtype": args.torch_dtype,
            "device": args.device,
            "server_flags": "defaults" if args.defaults else "cores split (--num_threads)",
            "hogs": len(HOGS),
            "hogs_session": "own" if args.hog_apart else "the benchmark's",
        },
        "local": local.summary(),
        "phases": {key: phase.summary() for key, phase in phases.items()},
        "ratios": {key: compare(phases[key], local) for key in [*swarm_keys, "llamacpp"] if key in phases},
        "serving": serving_figures(phases, args),
        "tokens_identical": all(identical.values()),
        "tokens_identical_by_phase": identical,
    }


def serving_figures(phases: dict[str, Phase], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill over local, concurrent sessions over one, and start-up, against their targets."""
    one = phases["swarm_1"]
    local_prefill = statistics.median(
        p.prefill_s for key, p in phases.items() if key.startswith("local") and p.prefill_s is not None
    )
    prefill = (one.prefill_s or float("nan")) / local_prefill
    concurrent = statistics.median(one.concurrent_tokens_per_s) / one.decode_tokens_per_s
    startup = max(r for key in phases if key.startswith("swarm") for r in phases[key].ready_after_s)
    return {
        "prefill_tokens": args.prefill_tokens,
        "prefill_local_s": local_prefill,
        "prefill_swarm_s": one.prefill_s,
        "prefill_vs_local": prefill,
        "prefill_target_met": prefill <= PREFILL_TARGET,
        "sessions": args.sessions,
        "concurrent_tokens_per_s": statistics.median(one.concurrent_tokens_per_s),
        "concurrent_vs_one_session": concurrent,
        "concurrent_target_met": concurrent >= CONCURRENT_TARGET,
        "concurrent_identical": one.concurrent_identical,
        "slowest_startup_s": startup,
        "startup_target_met": startup <= STARTUP_TARGET_S,
    }


def compare(phase: Phase, local: Phase) -> dict[str, Any]:
    """Swarm over local: decode rate (higher is better) and TTFT (lower is better)."""
    decode = phase.decode_tokens_per_s / local.decode_tokens_per_s
    target = TARGETS.get(phase.key)
    return {
        "decode_vs_local": decode,
        "ttft_vs_local": phase.ttft_s / local.ttft_s,
        "decode_target": target,
        "decode_target_met": None if target is None else decode >= target,
    }


def format_table(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"corolla decode benchmark: {s['model']} ({s['dtype']}), prompt {s['prompt_tokens']} tokens, "
        f"{s['max_new_tokens']} new tokens (greedy, forced), median of {s['repeats']} runs",
        f"machine: {m['gpu'] + ' on ' if s['device'] != 'cpu' and m['gpu'] else ''}"
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} torch threads, "
        f"python {m['python']}",
        f"servers: {s['server_flags']}; busy processes beside the benchmark (--hog): {s['hogs']}"
        + (f", in {s['hogs_session']} session" if s["hogs"] else ""),
        "",
        f"{'configuration':<32}{'decode tok/s':>13}{'(min-max)':>13}{'x local':>9}{'target':>14}"
        f"{'TTFT s':>9}{'x local':>9}{'others':>8}  {'ready s'}",
    ]
    phases = report["phases"]
    lines += [format_row(phases[key], None) for key in phases if key.startswith("local")]
    lines.append(format_row(report["local"], None, baseline=True))
    lines += [format_row(phases[key], report["ratios"][key]) for key in phases if key.startswith("swarm")]
    if "llamacpp" in phases:
        lines.append(format_row(phases["llamacpp"], report["ratios"]["llamacpp"]))
    v = report["serving"]
    lines += [
        "",
        f"prefill of {v['prefill_tokens']} tokens, one server: {v['prefill_swarm_s']:.3f} s vs local "
        f"{v['prefill_local_s']:.3f} s = {v['prefill_vs_local']:.2f}x (target <= {PREFILL_TARGET}: "
        f"{'ok' if v['prefill_target_met'] else 'MISS'})",
        f"{v['sessions']} sessions at once on one server: {v['concurrent_tokens_per_s']:.1f} tok/s in all = "
        f"{v['concurrent_vs_one_session']:.2f}x one session (target >= {CONCURRENT_TARGET}: "
        f"{'ok' if v['concurrent_target_met'] else 'MISS'}); tokens identical to one session: "
        f"{'yes' if v['concurrent_identical'] else 'no'}",
        f"slowest server start-up until ready: {v['slowest_startup_s']:.1f} s "
        f"(target <= {STARTUP_TARGET_S:.0f}: {'ok' if v['startup_target_met'] else 'MISS'})",
        "",
        "decode threads the servers chose (measured while serving): "
        + "; ".join(
            f"{phases[key]['label']}: {', '.join(str(t) for t in phases[key]['decode_threads'])}"
            for key in phases
            if key.startswith("swarm")
        ),
        "others = share of the machine's CPU used by processes other than this benchmark during the timed",
        "runs; well above 0% means those figures were disturbed. ready s = server start until ready.",
        format_identical(report),
    ]
    if "llamacpp" in phases:
        lines.append("llama.cpp: llama-bench's generation rate, its prompt processing as TTFT (speed only)")
    return "\n".join(lines)


def format_identical(report: dict[str, Any]) -> str:
    line = f"tokens identical: {'yes' if report['tokens_identical'] else 'no'}"
    if not report["tokens_identical"]:
        by_phase = report["tokens_identical_by_phase"].items()
        line += " (by phase: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in by_phase) + ")"
    return line


def format_row(phase: dict[str, Any], ratio: dict[str, Any] | None, *, baseline: bool = False) -> str:
    decode_ratio = ttft_ratio = target = ""
    if baseline:
        decode_ratio, ttft_ratio = "1.00", "1.00"
    if ratio is not None:
        decode_ratio, ttft_ratio = f"{ratio['decode_vs_local']:.2f}", f"{ratio['ttft_vs_local']:.2f}"
        if ratio["decode_target"] is not None:
            target = f">={ratio['decode_target']:.2f} {'ok' if ratio['decode_target_met'] else 'MISS'}"
    rates = [r["decode_tokens_per_s"] for r in phase["runs"]]
    spread = f"({min(rates):.1f}-{max(rates):.1f})"
    others = "" if phase["others_cpu_share"] is None else f"{phase['others_cpu_share']:.0%}"
    ready = ", ".join(f"{r:.1f}" for r in phase["ready_after_s"])
    return (
        f"{phase['label']:<32}{phase['decode_tokens_per_s']:>13.1f}{spread:>13}{decode_ratio:>9}{target:>14}"
        f"{phase['ttft_s']:>9.3f}{ttft_ratio:>9}{others:>8}  {ready}"
    ).rstrip()


# --- main -------------------------------------------------------------------------------------


def quiet_logs() -> None:
    """Warnings and errors only, hivemind's included, on stderr."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    use_hivemind_log_handler("nowhere")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUILTIN_MODEL, help="model name or path (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message, chat-templated")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens per run, forced (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default: 1)")
    p.add_argument("--prefill_tokens", type=int, default=512, help="prompt length of the prefill figure")
    p.add_argument("--sessions", type=int, default=8, help="sessions at once for the batching figure")
    p.add_argument("--cache_dir", default=default_cache_dir(), help="where converted models live")
    p.add_argument("--device", default="cpu", help="where servers and the local model compute: cpu or cuda")
    p.add_argument(
        "--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype"
    )
    p.add_argument(
        "--defaults", action="store_true",
        help="servers with default flags (no --num_threads split, default device and dtype)",
    )  # fmt: skip
    p.add_argument("--hog", action="store_true", help="one busy process per core during every phase")
    p.add_argument(
        "--hog_apart", action="store_true",
        help="with --hog: the busy processes in a session of their own (as another terminal's programs)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--llamacpp", action="store_true",
        help="add a row for llama.cpp running the same model in float32 (installed by make llamacpp)",
    )  # fmt: skip
    return p


def start_hogs(apart: bool) -> list[subprocess.Popen]:
    """One process per core spinning in pure Python (other work on the machine), in a session of
    their own if ``apart``."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=apart)
        for _ in range(usable_cores())
    ]
    HOGS.update(h.pid for h in hogs)
    return hogs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 2:
        raise SystemExit("--repeats must be >= 1 and --max_new_tokens >= 2")
    if args.hog_apart and not args.hog:
        raise SystemExit("--hog_apart says where --hog's busy processes run: give --hog too")
    if args.llamacpp:
        from llamacpp_row import unavailable_reason

        if (reason := unavailable_reason()) is not None:
            raise SystemExit(f"--llamacpp: {reason}")
    quiet_logs()
    model_dir = resolve_model(args.model, args.cache_dir).path
    num_blocks = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = encode_prompt(tokenizer, args.prompt, use_chat_template=True)
    dtype = getattr(torch, args.torch_dtype)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    log_dir = fresh_log_dir(args.cache_dir, "bench_decode")
    half = num_blocks // 2
    phases: dict[str, Phase] = {}
    hogs = start_hogs(args.hog_apart) if args.hog else []
    try:
        before = measure_local("local_before", "local, before servers", local, input_ids, args)
        phases["local_before"] = before
        phases["swarm_1"] = measure_swarm("swarm_1", [(0, num_blocks)], input_ids, args, log_dir)
        halves = [(0, half), (half, num_blocks)]
        phases["swarm_2"] = measure_swarm("swarm_2", halves, input_ids, args, log_dir)
        phases["local_after"] = measure_local("local_after", "local, after servers", local, input_ids, args)
        if args.llamacpp:
            phases["llamacpp"] = measure_llamacpp(model_dir, input_ids, args)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    report = build_report(phases, args, prompt_tokens=input_ids.shape[1])
    report["server_logs"] = str(log_dir)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
