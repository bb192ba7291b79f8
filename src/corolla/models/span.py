"""A contiguous span of a model's decoder blocks, runnable on its own.

Generic for the Llama layout of transformers 5: ``model.model.layers[i]`` is called with
hidden states, a causal mask, position ids, ``position_embeddings`` and a ``cache``. The
span keeps its own config copy whose layers are numbered from 0, so a ``DynamicCache``
made for the span, and ``create_causal_mask``, see only the span's layers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A config describing only layers ``start..end-1`` (renumbered from 0)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        cfg.layer_types = list(layer_types)[start:end]
    return cfg


class SpanModel(nn.Module):
    """Decoder layers ``start..end-1`` plus the rotary embedding they need."""

    def __init__(
        self, config: PretrainedConfig, start: int, end: int, layers: nn.ModuleList, rotary_emb: nn.Module
    ) -> None:
        super().__init__()
        self.start, self.end = start, end
        self.config = span_config(config, start, end)
        self.layers = layers
        self.rotary_emb = rotary_emb

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        first: int = 0,
        last: int | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Run local layers ``first..last-1`` on ``hidden`` [batch, seq, hidden].

        With a ``cache``, positions continue from the cache's length and the cache grows;
        a cache must always be used with the same ``first``/``last``."""
        last = len(self.layers) if last is None else last
        past = cache.get_seq_length(first) if cache is not None else 0
        position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=cache,
            position_ids=position_ids,
            layer_idx=first,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers[first:last]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden


def build_span_on_meta(config: PretrainedConfig, start: int, end: int) -> SpanModel:
    """Build the span's layers on the meta device (no memory), renumbered for the span cache."""
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    layers = nn.ModuleList(full.model.layers[start:end])
    for local_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = local_idx
    rotary_emb = type(full.model.rotary_emb)(config=config)  # real buffers, computed on CPU
    return SpanModel(config, start, end, layers, rotary_emb)
