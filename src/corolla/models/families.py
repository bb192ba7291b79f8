"""Which model architectures corolla can serve, and how to recognise them."""

from __future__ import annotations

from transformers import PretrainedConfig

from corolla.errors import UnsupportedModel

# Architectures whose decoder layers follow the Llama layout in transformers 5
# (``model.layers[i]`` called with hidden states, mask, position embeddings and a cache).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)


def check_supported(config: PretrainedConfig) -> str:
    """Return the architecture name, or raise ``UnsupportedModel`` listing what is supported."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    found = ", ".join(archs) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedModel(
        f"architecture {found} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
