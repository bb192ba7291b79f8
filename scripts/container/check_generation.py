"""Generate greedily through a swarm and compare with local transformers (scripts/build_container.sh).

Usage: python scripts/container/check_generation.py MODEL_DIR INITIAL_PEER   (the host's .venv)
Exit status 0 when the token ids are exactly equal; prints both.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM

NEW_TOKENS = 24


def main(model_dir: str, peer: str) -> int:
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(7))
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=[peer])
    try:
        started = time.monotonic()
        with torch.no_grad():
            got = remote.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        elapsed = time.monotonic() - started
    finally:
        remote.manager.shutdown()
    print(f"local:  {expected[0].tolist()}")
    print(f"remote: {got[0].tolist()}  ({NEW_TOKENS} tokens in {elapsed:.2f} s through the container)")
    if got.shape != expected.shape or not torch.equal(got, expected):
        print("MISMATCH: the container's server gave other tokens than local transformers")
        return 1
    print(f"identical: {got.shape[1] - ids.shape[1]} greedy tokens, same ids as local transformers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
