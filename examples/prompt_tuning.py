"""Prompt-tune the built-in model through a swarm, so it answers like a pirate.

The servers keep the model frozen and run forward and backward passes; only prompt embeddings
(``--pre_seq_len`` positions, one set per block: deep prompt tuning; ``--shallow`` trains only
the input prompt) are trained here, on ``pirate.jsonl`` (12 questions with pirate answers),
with a torch optimizer. About 2.5 minutes on 2 CPU cores; seen here: loss 3.94 -> 0.23, and
'What is the tallest mountain?' -> 'Arr, matey! The tallest mountain be Mount Everest.'.

    python examples/prompt_tuning.py                          # starts a private two-server swarm
    python examples/prompt_tuning.py --initial_peers MADDR    # or uses a running one

It prints the answer to a held-out question and the training loss before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.cli.generate import encode_prompt
from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.lab.local_swarm import start_swarm, stop_all
from corolla.models.resolve import resolve_model

DATA = Path(__file__).with_name("pirate.jsonl")
HELD_OUT = "What is the tallest mountain?"


def examples(tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """(input ids, labels) per example: the chat prompt is masked out (-100), the answer is learned."""
    out = []
    for line in DATA.read_text().splitlines():
        item = json.loads(line)
        prompt = encode_prompt(tokenizer, item["question"], True)[0]
        answer = tokenizer(item["answer"] + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids = torch.cat([prompt, torch.tensor(answer)])
        labels = torch.cat([torch.full_like(prompt, -100), torch.tensor(answer)])
        out.append((ids.unsqueeze(0), labels.unsqueeze(0)))
    return out


def mean_loss(model, data) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return sum(model(input_ids=ids, labels=labels).loss.item() for ids, labels in data) / len(data)


def answer(model, tokenizer, question: str) -> str:  # type: ignore[no-untyped-def]
    ids = encode_prompt(tokenizer, question, True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def report(when: str, model, tokenizer, data) -> None:  # type: ignore[no-untyped-def]
    loss, reply = mean_loss(model, data), answer(model, tokenizer, HELD_OUT)
    print(f"{when + ':':7} loss {loss:.3f}; {HELD_OUT!r} -> {reply!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--initial_peers", nargs="*", default=[], help="a running swarm (default: start one)")
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps (one example each)")
    parser.add_argument("--pre_seq_len", type=int, default=8, help="trainable prompt positions")
    parser.add_argument(
        "--shallow", action="store_true", help="train only the input prompt (ptune), not one per block"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    path = resolve_model(BUILTIN_MODEL, default_cache_dir()).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    servers = [] if args.initial_peers else start_swarm(BUILTIN_MODEL, [(0, 15), (15, 30)])
    peers = args.initial_peers or [servers[0].maddr or ""]
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            BUILTIN_MODEL, initial_peers=peers,
            tuning_mode="ptune" if args.shallow else "deep_ptune", pre_seq_len=args.pre_seq_len,
        )  # fmt: skip
        data = examples(tokenizer)
        report("before", model, tokenizer, data)
        trainable = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in trainable)
        print(f"training {count:,} prompt parameters; the servers' weights stay frozen")
        optimizer = torch.optim.Adam(trainable, lr=args.lr)
        bar = tqdm(range(args.steps), desc="prompt tuning", file=sys.stderr)
        for step in bar:
            ids, labels = data[step % len(data)]
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        report("after", model, tokenizer, data)
        model.manager.shutdown()
    finally:
        stop_all(servers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
