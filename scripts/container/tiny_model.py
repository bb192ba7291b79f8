"""Save a tiny seeded random Llama (4 blocks, hidden 64, fp32) for scripts/build_container.sh.

Usage: python scripts/container/tiny_model.py DIR   (run with the host's .venv)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: str) -> None:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,  # so every greedy run produces all its tokens
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).eval().save_pretrained(out)
    for path in [Path(out), *Path(out).iterdir()]:  # readable by the container's non-root user
        path.chmod(0o755 if path.is_dir() else 0o644)


if __name__ == "__main__":
    main(sys.argv[1])
