"""A Python client in a network lab's host: greedy tokens in one inference session, in two parts.

``python lab_client.py MODEL INITIAL_PEER FIRST REST``: generates FIRST tokens, prints
``{"route": [...], "tokens": [...]}``, waits for a line on stdin (the test kills a server meanwhile),
generates REST more in the same session and prints the same for them."""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoTokenizer

from corolla.client.model import AutoDistributedModelForCausalLM
from corolla.config import default_cache_dir
from corolla.models.resolve import resolve_model

PROMPT = "The capital of France is"


def report(session, tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    print(json.dumps({"route": [h.peer_id for h in session.route], "tokens": tokens}), flush=True)


def main() -> None:
    model_name, peer, first, rest = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name, default_cache_dir()).path)
    model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=[peer])
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + first + rest) as session:
        out = model.generate(ids, max_new_tokens=first, do_sample=False)
        report(session, out[0, ids.shape[1] :].tolist())
        sys.stdin.readline()
        out = model.generate(None, max_new_tokens=rest, do_sample=False)  # only the new tokens
        report(session, out[0].tolist())
    model.manager.shutdown()


if __name__ == "__main__":
    main()
