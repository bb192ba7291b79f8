"""Tiny random Llama configs and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """4 blocks, hidden 64, 2 heads (no grouping), vocab 128; ``overrides`` change any field."""
    from transformers import LlamaConfig  # imported lazily, like the fixtures that use it

    values: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_llama(path: Path, **overrides: Any) -> Path:
    """Save a seeded random float32 Llama of :func:`tiny_llama_config` (with ``overrides``) to ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).eval().save_pretrained(path)
    return path
