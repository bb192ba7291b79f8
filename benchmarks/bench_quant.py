"""Weight memory and greedy-token agreement of quantised and lower-precision servers, in one run.

For each variant (``--variants``, default: float32, bfloat16, int8, nf4) a two-server swarm of
the built-in model is started on loopback (blocks 0:15 and 15:30) with that ``--torch_dtype`` /
``--quant_type``, and compared with local float32 ``transformers``:

- weight bytes per block, as the servers report them (``info`` RPC), against local float32's;
- greedy agreement over a fixed set of prompts: the reference is local float32 greedy decoding
  of ``--max_new_tokens`` tokens per prompt. *Identical* counts prompts whose whole greedy
  continuation from the swarm equals the reference; *top-1* is the share of the new positions
  where the swarm's most likely next token equals local float32's, both given the reference
  sequence (teacher forcing, so one early difference does not spoil the rest).

    python benchmarks/bench_quant.py [--variants fp32 bf16 int8 nf4] [--max_new_tokens 16] [--json]

``--reference FILE`` keeps the local float32 reference (computed once, reused while the prompts
and token count match), so runs of one variant each share it.

Figures are reported, never asserted (the integration tests assert loose bounds).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from corolla.cli.generate import encode_prompt
from corolla.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.lab.local_swarm import start_swarm, stop_all
from corolla.models.resolve import resolve_model
from corolla.runtime.loader import parameter_bytes

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
    "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
    "Explain what a volcano is in one sentence.",
    "Translate 'good morning' into Spanish.",
)
VARIANTS: dict[str, list[str]] = {
    "fp32": ["--torch_dtype", "float32", "--quant_type", "none"],
    "bf16": ["--torch_dtype", "bfloat16", "--quant_type", "none"],
    "int8": ["--torch_dtype", "float32", "--quant_type", "int8"],
    "nf4": ["--torch_dtype", "float32", "--quant_type", "nf4"],
}
SPLIT = [(0, 15), (15, 30)]


@dataclass
class Agreement:
    variant: str
    weight_bytes_per_block: float
    bytes_vs_fp32: float  # float32 bytes / these bytes
    identical: int
    prompts: int
    top1: float


@dataclass
class Reference:
    """Local float32's answers, and its weight bytes per block."""

    expected: list[tuple[torch.Tensor, torch.Tensor]]
    fp32_bytes_per_block: float


def load_reference(path: Path | None, prompts: list[torch.Tensor], max_new_tokens: int) -> Reference:
    """The local float32 reference: from ``path`` when it was made for these prompts and token
    count, else computed (and saved to ``path``, if given)."""
    key = {"prompts": [p.tolist() for p in prompts], "max_new_tokens": max_new_tokens}
    if path is not None and path.exists():
        saved = torch.load(path)
        if saved["key"] == key:
            return Reference(saved["expected"], saved["fp32_bytes_per_block"])
    model_path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layers = local.model.layers
    made = Reference(reference(local, prompts, max_new_tokens), parameter_bytes(layers) / len(layers))
    if path is not None:
        saved = {"key": key, "expected": made.expected, "fp32_bytes_per_block": made.fp32_bytes_per_block}
        torch.save(saved, path)
    return made


def reference(
    local: PreTrainedModel, prompts: list[torch.Tensor], max_new_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt: local float32's greedy continuation (prompt + new tokens), and its top-1 next
    token at each new position given that continuation."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            ref = local.generate(
                ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
            )
            out.append((ref, local(ref[:, :-1]).logits[0, ids.shape[1] - 1 :].argmax(-1)))
    return out


def weight_bytes_per_block(model: DistributedModelForCausalLM) -> float:
    manager = model.manager
    hops = manager.route(0, manager.num_blocks)
    replies = [manager.loop.run(call_info(manager.p2p, manager.peer(h)), timeout=30) for h in hops]
    total = sum(reply.weight_bytes for reply in replies)
    return total / manager.num_blocks


def agreement(
    model: DistributedModelForCausalLM,
    prompts: list[torch.Tensor],
    expected: list[tuple[torch.Tensor, torch.Tensor]],
    max_new_tokens: int,
) -> tuple[int, float]:
    """(prompts whose greedy continuation is identical, teacher-forced top-1 agreement)."""
    identical, hits, total = 0, 0, 0
    with torch.no_grad():
        for ids, (ref, top1) in zip(prompts, expected, strict=True):
            got = model.generate(
                ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
            )
            identical += int(torch.equal(got, ref))
            logits = model(ref[:, :-1]).logits[0, ids.shape[1] - 1 :]
            hits += int((logits.argmax(-1) == top1).sum())
            total += max_new_tokens
    return identical, hits / total


def measure(
    variants: list[str], max_new_tokens: int, log_dir: Path | None, questions: tuple[str, ...] = PROMPTS,
    reference_file: Path | None = None,
) -> list[Agreement]:  # fmt: skip
    path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [encode_prompt(tokenizer, p, True) for p in questions]
    ref = load_reference(reference_file, prompts, max_new_tokens)
    expected = ref.expected
    results: list[Agreement] = []
    for variant in tqdm(variants, desc="variants", file=sys.stderr):
        extra = [*VARIANTS[variant], "--dht_prefix", f"bench-{variant}"]
        servers = start_swarm(BUILTIN_MODEL, SPLIT, extra_args=extra, log_dir=log_dir)
        try:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                BUILTIN_MODEL, initial_peers=[servers[0].maddr or ""], dht_prefix=f"bench-{variant}"
            )
            try:
                per_block = weight_bytes_per_block(model)
                identical, top1 = agreement(model, prompts, expected, max_new_tokens)
            finally:
                model.manager.shutdown()
        finally:
            stop_all(servers)
        bytes_vs_fp32 = ref.fp32_bytes_per_block / per_block
        results.append(Agreement(variant, per_block, bytes_vs_fp32, identical, len(prompts), top1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the fixed prompts")
    parser.add_argument("--log_dir", type=Path, default=None, help="keep the servers' logs here")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument(
        "--reference", type=Path, default=None, metavar="FILE",
        help="keep local float32's answers here and reuse them in later runs (same prompts and tokens)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    results = measure(
        args.variants, args.max_new_tokens, args.log_dir, PROMPTS[: args.prompts], args.reference
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
        return 0
    print(
        f"built-in model, 2 servers (0:15, 15:30), "
        f"{args.prompts} prompts x {args.max_new_tokens} greedy tokens"
    )
    print(f"{'variant':8} {'MiB/block':>10} {'vs fp32':>8} {'identical':>10} {'top-1':>7}")
    for r in results:
        row: dict[str, Any] = asdict(r)
        print(
            f"{row['variant']:8} {r.weight_bytes_per_block / 2**20:10.2f} {r.bytes_vs_fp32:7.2f}x "
            f"{r.identical:>5}/{r.prompts:<4} {r.top1:7.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
