"""``corolla generate [MODEL] "prompt" --initial_peers …``: stream an answer through the swarm."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from corolla.cli.args import client_parser, run_client_command

PROG = "corolla generate"


def build_parser() -> argparse.ArgumentParser:
    p = client_parser(PROG, __doc__)
    p.add_argument("prompt", help="what to ask; the model's chat template is applied when it has one")
    p.add_argument("--max_new_tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding; > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no_chat_template", action="store_true", help="send the prompt as plain text")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, route) instead of streaming text",
    )
    return p


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool):  # type: ignore[no-untyped-def]
    """Token ids [1, n] of the prompt, chat-formatted when the tokenizer has a template."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def run(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.resolve import resolve_model

    path = resolve_model(args.model, args.cache_dir, revision=args.revision, token=args.token).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, cache_dir=args.cache_dir,
        swarm_key=args.swarm_key, identity_path=args.identity_path, revision=args.revision, token=args.token,
    )  # fmt: skip
    input_ids = encode_prompt(tokenizer, args.prompt, not args.no_chat_template)
    sampling = (
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
        if args.temperature > 0
        else {"do_sample": False}
    )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with (
        torch.no_grad(),
        model.inference_session(max_length=input_ids.shape[1] + args.max_new_tokens) as session,
    ):
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
        route = [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in session.route]
    new_ids = output[0, input_ids.shape[1] :].tolist()
    if args.json:
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        print(
            json.dumps(
                {"text": text, "token_ids": new_ids, "prompt_ids": input_ids[0].tolist(), "route": route}
            )
        )
    model.manager.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    return run_client_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
