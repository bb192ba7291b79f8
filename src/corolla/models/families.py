"""The model families corolla serves, and the few facts that differ between them.

One generic path serves every family: transformers builds the decoder layers, and a family
adapter says where they live in the model (``layers_path``), which local modules the client
keeps (``embed_path``, ``norm_path``) and how the layers are called (``style``):

- ``rope``: the Llama layout of transformers 5 (``model.layers``, rotary position embeddings
  computed once per call, one causal mask per attention kind: full or sliding window);
- ``falcon``: rotary or ALiBi (``config.alibi``), called with ``layer_past=``;
- ``bloom``: ALiBi biases built from the key length; the embedding layer norm runs on the client;
- ``gpt2``: learned absolute positions, added on the client.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.errors import UnsupportedModel

Style = Literal["rope", "falcon", "bloom", "gpt2"]


@dataclass(frozen=True)
class Family:
    """How one model family is laid out and called."""

    name: str  # the transformers ``model_type``
    architecture: str  # the causal-LM class in transformers
    style: Style
    layers_path: str  # the decoder layers inside the causal-LM model
    embed_path: str  # token embeddings (client side)
    norm_path: str  # final norm (client side)
    notes: str  # what is special about it, for people reading the table of families

    @property
    def classifier(self) -> str:
        """The family's sequence-classification class in transformers."""
        base = self.architecture.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
        return f"{base}ForSequenceClassification"

    @property
    def body(self) -> str:
        """The base model attribute: ``model`` or ``transformer``."""
        return self.layers_path.split(".")[0]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return operator.attrgetter(self.layers_path)(model)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, name = self.layers_path.rpartition(".")
        setattr(operator.attrgetter(parent_path)(model), name, layers)

    def embeddings(self, model: nn.Module) -> nn.Module:
        return operator.attrgetter(self.embed_path)(model)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return operator.attrgetter(self.norm_path)(model)

    def first_hidden(self, model: nn.Module, inputs_embeds: torch.Tensor, past_length: int) -> torch.Tensor:
        """What enters block 0, from the token embeddings of positions ``past_length…``: adds
        GPT-2's learned positions, applies BLOOM's embedding layer norm, else nothing."""
        if self.style == "gpt2":
            seq = inputs_embeds.shape[1]
            positions = torch.arange(past_length, past_length + seq, device=inputs_embeds.device)
            return inputs_embeds + model.transformer.wpe(positions).unsqueeze(0).to(inputs_embeds.dtype)
        if self.style == "bloom":
            return model.transformer.word_embeddings_layernorm(inputs_embeds)
        return inputs_embeds


def _rope(name: str, architecture: str, notes: str) -> Family:
    return Family(name, architecture, "rope", "model.layers", "model.embed_tokens", "model.norm", notes)


FAMILIES: tuple[Family, ...] = (
    _rope("llama", "LlamaForCausalLM", "grouped-query attention; Llama 3 rope scaling"),
    _rope("mistral", "MistralForCausalLM", "sliding-window attention"),
    _rope("qwen2", "Qwen2ForCausalLM", "q/k/v biases"),
    _rope("qwen3", "Qwen3ForCausalLM", "q/k norms"),
    _rope("mixtral", "MixtralForCausalLM", "mixture of experts (top-k routing)"),
    _rope("gemma2", "Gemma2ForCausalLM", "alternating sliding/full attention, logit soft-capping"),
    _rope("phi3", "Phi3ForCausalLM", "fused qkv and gate/up projections"),
    Family(
        "falcon",
        "FalconForCausalLM",
        "falcon",
        "transformer.h",
        "transformer.word_embeddings",
        "transformer.ln_f",
        "rotary or ALiBi, parallel attention/MLP",
    ),
    Family(
        "bloom",
        "BloomForCausalLM",
        "bloom",
        "transformer.h",
        "transformer.word_embeddings",
        "transformer.ln_f",
        "ALiBi; embedding layer norm on the client",
    ),
    Family(
        "gpt2",
        "GPT2LMHeadModel",
        "gpt2",
        "transformer.h",
        "transformer.wte",
        "transformer.ln_f",
        "learned positions on the client",
    ),
)
_BY_NAME = {family.name: family for family in FAMILIES}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_BY_NAME)


def family_for(config: PretrainedConfig) -> Family:
    """The family of ``config`` (by ``model_type``), or ``UnsupportedModel`` listing the supported ones."""
    family = _BY_NAME.get(getattr(config, "model_type", ""))
    if family is None:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise UnsupportedModel(
            f"model type {getattr(config, 'model_type', '?')!r} (architecture {archs}) is not supported; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return family


def check_supported(config: PretrainedConfig) -> str:
    """The family name of ``config``, or ``UnsupportedModel`` listing what is supported."""
    return family_for(config).name
