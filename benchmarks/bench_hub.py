"""Big spans from a hub: what each server fetches, how soon it is ready, and the memory it holds.

A Llama-shaped model of realistic width (default: hidden 2048, 16 blocks, grouped-query attention,
bfloat16 random weights saved as a sharded checkpoint) is served through a local endpoint that
speaks the hub's file API (``corolla.lab.hub_endpoint``, reached through ``HF_ENDPOINT`` exactly as
the hub is) by ``--servers`` servers splitting its blocks, each with a cache and an endpoint of its
own, as on separate machines. Per server it prints:

- bytes fetched (weight files only) against the span's tensor bytes (target: ratio <= 1.1);
- time to ready from a cold cache, then again warm (the same servers restarted: nothing fetched);
- memory: the PSS of the whole process tree (the server, its DHT child, p2pd) at ready and after a
  client's forward pass has gone through every server (CPU servers map bfloat16 weights from the
  cache lazily: they are resident only once used), against the span's weight bytes (target:
  overhead <= 250 MiB).

Servers announce a fixed ``--throughput`` so that time to ready is fetch + load + join, without the
compute benchmark. The checkpoint is generated once under ``CACHE_DIR/bench_hub``.

    python benchmarks/bench_hub.py [--servers 3] [--hidden_size 2048] [--num_blocks 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from corolla.config import default_cache_dir
from corolla.hub import ranges
from corolla.lab.hub_endpoint import HubEndpoint
from corolla.lab.local_swarm import LocalServer, fresh_log_dir, server_args, start_dht_peer, stop_all

REPO = "bench/llama-shaped"
MIB = 1024 * 1024


def make_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """Random bfloat16 weights of a Llama of the requested shape, sharded like the hub's models."""
    marker = path / ".complete"
    if marker.exists():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_blocks, num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=max(1, args.hidden_size // 512), vocab_size=args.vocab_size,
        dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, Any]] = [{}]
    for name, shape in shapes.items():
        if sum(t.numel() * 2 for t in shards[-1].values()) > args.shard_mib * MIB:
            shards.append({})
        shards[-1][name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": sum(p.stat().st_size for p in path.glob("*.safetensors"))}}
    (path / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    marker.touch()
    return path


def span_bytes(model_dir: Path, start: int, end: int) -> int:
    """The bytes of blocks ``start..end-1``'s tensors, from the checkpoint's headers."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as f:
            length = ranges.header_length(f.read(8))
            f.seek(0)
            entries = ranges.parse_header(f.read(length))
        for name, entry in entries.items():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"] and start <= int(parts[2]) < end:
                total += entry.end - entry.start
    return total


def pss_of_tree(pid: int) -> int:
    """The proportional set size of ``pid`` and all its descendants, in bytes."""
    total = 0
    for child in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def descendants(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children + [d for c in children for d in descendants(c)]


def splits(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def run_round(
    model_dir: Path, spans: list[tuple[int, int]], caches: list[Path], log_dir: Path, label: str,
    *, forward: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Start one server per span (each with its own endpoint and cache), wait until all are ready,
    measure, stop them."""
    hubs = [HubEndpoint().start() for _ in spans]
    for hub in hubs:
        hub.add_repo(REPO, model_dir)
    dht = start_dht_peer(log_dir=log_dir)
    servers: list[LocalServer] = []
    try:
        for i, (span, hub, cache) in enumerate(zip(spans, hubs, caches, strict=True)):
            extra = ["--throughput", "100", "--cache_dir", str(cache), "--num_threads", "1"]
            args = server_args(REPO, span, "/ip4/127.0.0.1/tcp/0", [dht.maddr or ""], extra)
            env = {"HF_ENDPOINT": hub.url}
            servers.append(LocalServer(args, env=env, log_dir=log_dir, name=f"{label}-server{i}"))
        rows = []
        for server, span, hub in zip(servers, spans, hubs, strict=True):
            server.wait_ready(1800)
            fetched = sum(n for f, n in hub.bytes_sent(REPO).items() if f.endswith(".safetensors"))
            rows.append({"span": f"{span[0]}:{span[1]}", "fetched": fetched, "ready_s": server.ready_after})
        time.sleep(1.0)  # let the freshly started processes settle
        for row, server in zip(rows, servers, strict=True):
            row["pss"] = pss_of_tree(server.process.pid)
        if forward:  # a forward pass through every server touches every weight
            forward_once(hubs[0].url, dht.maddr or "", log_dir)
            for row, server in zip(rows, servers, strict=True):
                row["pss_after_forward"] = pss_of_tree(server.process.pid)
        return rows
    finally:
        stop_all([*servers, dht])
        for hub in hubs:
            hub.stop()


def forward_once(hub_url: str, peer: str, log_dir: Path) -> None:
    """One 16-token forward pass from a client (with a cache of its own) through the swarm."""
    import torch

    from corolla import AutoDistributedModelForCausalLM

    os.environ["HF_ENDPOINT"] = hub_url
    model = AutoDistributedModelForCausalLM.from_pretrained(
        REPO, initial_peers=[peer], cache_dir=str(log_dir / "cache-client")
    )
    try:
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (1, 16)))
    finally:
        model.manager.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--hidden_size", type=int, default=2048)
    p.add_argument("--intermediate_size", type=int, default=5632)
    p.add_argument("--num_blocks", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--shard_mib", type=int, default=400, help="about this many MiB per checkpoint shard")
    p.add_argument("--cache_dir", default=default_cache_dir())
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args()

    shape = f"h{args.hidden_size}-i{args.intermediate_size}-b{args.num_blocks}-v{args.vocab_size}"
    model_dir = make_checkpoint(Path(args.cache_dir) / "bench_hub" / shape, args)
    work = fresh_log_dir(args.cache_dir, "bench_hub")
    spans = splits(args.num_blocks, args.servers)
    caches = [work / f"cache-server{i}" for i in range(len(spans))]
    cold = run_round(model_dir, spans, caches, work, "cold", forward=True)
    warm = run_round(model_dir, spans, caches, work, "warm")
    rows = []
    for span, c, w in zip(spans, cold, warm, strict=True):
        need = span_bytes(model_dir, *span)
        rows.append({
            "span": c["span"], "span_bytes": need, "fetched": c["fetched"],
            "fetched_ratio": c["fetched"] / need,
            "ready_cold_s": c["ready_s"], "ready_warm_s": w["ready_s"], "fetched_warm": w["fetched"],
            "pss": c["pss"], "pss_after_forward": c["pss_after_forward"],
            "overhead_after_forward_mib": (c["pss_after_forward"] - need) / MIB,
        })  # fmt: skip
    report = {"model": shape, "servers": rows, "checkpoint_bytes": checkpoint_bytes(model_dir)}
    print(json.dumps(report, indent=1) if args.json else table(report))


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} (bfloat16), checkpoint {report['checkpoint_bytes'] / MIB:.0f} MiB, "
        f"{os.cpu_count()} cores",
        "| span | span MiB | fetched MiB | fetched / span | ready cold s | ready warm s | fetched warm MiB "
        "| PSS at ready MiB | PSS after a forward MiB | that - span MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["servers"]:
        lines.append(
            f"| {r['span']} | {r['span_bytes'] / MIB:.0f} | {r['fetched'] / MIB:.1f} "
            f"| {r['fetched_ratio']:.3f} "
            f"| {r['ready_cold_s']:.1f} | {r['ready_warm_s']:.1f} | {r['fetched_warm'] / MIB:.1f} "
            f"| {r['pss'] / MIB:.0f} | {r['pss_after_forward'] / MIB:.0f} "
            f"| {r['overhead_after_forward_mib']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
