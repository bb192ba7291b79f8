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


def save_tiny_chat_llama(path: Path, **overrides: Any) -> Path:
    """A tiny random Llama with the built-in model's tokenizer (vocabulary 49152, chat template), so
    the commands that encode text (``corolla generate``, ``corolla api``) run on it."""
    import shutil

    from corolla.config import BUILTIN_MODEL, default_cache_dir
    from corolla.models.resolve import resolve_model

    save_tiny_llama(path, **{"vocab_size": 49152, **overrides})
    tokenizer_dir = resolve_model(BUILTIN_MODEL, default_cache_dir()).path  # converted once, then cached
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")) or file.name == "chat_template.jinja":
            shutil.copy(file, path / file.name)
    return path


# Tiny seeded configs, one per supported family (4 blocks unless overridden). Sliding windows are
# shorter than the test sequences, so the sliding-window paths really run.
_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "phi3": ("phi3", {}),
    "falcon": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True}),
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False}),
    "bloom": ("bloom", {}),
    "gpt2": ("gpt2", {"n_positions": 256}),
}


def tiny_family_config(variant: str, **overrides: Any) -> Any:
    """The tiny config of one ``FAMILY_VARIANTS`` entry."""
    from transformers import AutoConfig

    model_type, extra = FAMILY_VARIANTS[variant]
    return AutoConfig.for_model(model_type, **{**_COMMON, **extra, **overrides})


def save_tiny_family(path: Path, variant: str, **overrides: Any) -> Path:
    """Save a seeded random float32 model of one ``FAMILY_VARIANTS`` entry to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_family_config(variant, **overrides))
    model.to(torch.float32).eval().save_pretrained(path)
    return path
