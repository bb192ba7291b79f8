"""A contiguous span of a model's decoder blocks, runnable on its own.

The layers are transformers' own, for any family in ``families.FAMILIES``. The span keeps its
own config copy whose layers are numbered from 0, so a ``DynamicCache`` made for the span, and
the mask functions, see only the span's layers. What the family's model does around its
layers (position ids, rotary embeddings, ALiBi biases, one mask per attention kind) is redone
here per call, from the positions the cache has already seen.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from corolla.models.families import Family, family_for
from corolla.models.merged_cache import MergedCaches

MASK_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A config describing only layers ``start..end-1`` (renumbered from 0)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        cfg.layer_types = list(layer_types)[start:end]
    return cfg


def attention_kind(config: PretrainedConfig, index: int) -> str:
    """``full_attention`` or ``sliding_attention`` for layer ``index`` of ``config``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return str(layer_types[index])
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


class SpanModel(nn.Module):
    """Decoder layers ``start..end-1`` plus the position machinery they need (``rotary_emb``;
    None for families without rotary embeddings)."""

    def __init__(
        self,
        config: PretrainedConfig,
        start: int,
        end: int,
        layers: nn.ModuleList,
        rotary_emb: nn.Module | None,
    ) -> None:
        super().__init__()
        self.family: Family = family_for(config)
        self.start, self.end = start, end
        self.config = span_config(config, start, end)
        self.cache_config = self.config  # tensor parallelism gives each shard its own cache slots
        self.layers = layers
        self.rotary_emb = rotary_emb
        self.attention_kinds = frozenset(attention_kind(self.config, i) for i in range(len(layers)))
        self._merged: MergedCaches | None = None  # decode_batch's merge, kept for the same sessions

    def new_cache(self, max_length: int | None = None) -> DynamicCache:
        """A cache for this span; with ``max_length`` its full-attention layers are allocated once."""
        from corolla.runtime.session_cache import session_cache

        return session_cache(self.cache_config, max_length)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        first: int = 0,
        last: int | None = None,
        cache: DynamicCache | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run local layers ``first..last-1`` on ``hidden`` [batch, seq, hidden].

        With a ``cache``, positions continue from the cache's length and the cache grows;
        a cache must always be used with the same ``first``/``last``. Deep ``prompts``
        [last - first, batch, prefix, hidden] are added to positions ``0..prefix-1`` of the
        sequence before each layer (P-tuning v2, as Petals does)."""
        last = len(self.layers) if last is None else last
        past = cache.get_seq_length(first) if cache is not None else 0
        position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        layers = [_Prompted(layer, prompts, k, past) for k, layer in enumerate(self.layers[first:last])]
        run = _RUNNERS[self.family.style]
        return run(self, hidden, first, last, cache, position_ids, layers)

    @property
    def can_batch_decode(self) -> bool:
        """Whether ``decode_batch`` can merge sessions: the Llama layout with full attention only and
        one cache slot per layer (no tensor parallelism)."""
        one_slot = self.cache_config is self.config
        return self.family.style == "rope" and self.attention_kinds == {"full_attention"} and one_slot

    def decode_batch(
        self, hiddens: list[torch.Tensor], caches: list[DynamicCache], *, first: int, last: int
    ) -> list[torch.Tensor]:
        """One decode step (one new position each) of several sessions in one pass over the
        weights. Each session keeps its own cache and positions: their keys and values are merged
        (``MergedCaches``, kept for the next pass of the same sessions) and a per-row mask shows each
        row only its own, so every row computes what it would alone (up to float rounding of batched
        kernels). Each cache grows by one."""
        merged = self._merged
        if merged is None or not merged.fits(caches, first, last):
            merged = self._merged = MergedCaches(caches, first, last, self.cache_config, self._forget)
        x = torch.cat(hiddens, dim=0)
        cache, mask = merged.step_cache(x.dtype)
        position_ids = torch.tensor(merged.lengths, device=x.device).unsqueeze(1)
        position_embeddings = self.rotary_emb(x, position_ids=position_ids)
        for layer in self.layers[first:last]:
            out = layer(
                x,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            x = _layer_output(out)
        merged.commit(caches)
        return list(x.split(1, dim=0))

    def _forget(self, merged: MergedCaches) -> None:
        """Drop ``merged`` if it is still the kept one (one of its sessions is gone); a pass using
        it holds its own reference."""
        if self._merged is merged:
            self._merged = None

    def _mask(
        self,
        kind: str,
        hidden: torch.Tensor,
        cache: DynamicCache | None,
        position_ids: torch.Tensor,
        **kw: Any,
    ) -> Any:
        return MASK_FUNCTIONS[kind](
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=cache,
            position_ids=position_ids,
            **kw,
        )


def _layer_output(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Prompted:
    """A layer that first adds its deep prompt to the prompt positions of its input (if any)."""

    def __init__(self, layer: nn.Module, prompts: torch.Tensor | None, index: int, past: int) -> None:
        self.layer, self.prompts, self.index, self.past = layer, prompts, index, past

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.layer(add_prompt(hidden, self.prompts, self.index, self.past), *args, **kwargs)


def add_prompt(hidden: torch.Tensor, prompts: torch.Tensor | None, index: int, past: int) -> torch.Tensor:
    """``hidden`` (positions ``past…``) plus prompt ``index`` on the positions below its length."""
    if prompts is None or past >= prompts.shape[2]:
        return hidden
    n = min(prompts.shape[2] - past, hidden.shape[1])
    prompt = prompts[index, :, past : past + n].to(hidden.dtype)
    return torch.cat([hidden[:, :n] + prompt, hidden[:, n:]], dim=1)


def _run_rope(
    span: SpanModel,
    hidden: torch.Tensor,
    first: int,
    last: int,
    cache: DynamicCache | None,
    position_ids: torch.Tensor,
    layers: list[_Prompted],
) -> torch.Tensor:
    kinds = [attention_kind(span.config, i) for i in range(first, last)]
    masks = {
        kind: span._mask(kind, hidden, cache, position_ids, layer_idx=first + kinds.index(kind))
        for kind in dict.fromkeys(kinds)
    }
    position_embeddings = span.rotary_emb(hidden, position_ids=position_ids)
    for layer, kind in zip(layers, kinds, strict=True):
        out = layer(
            hidden,
            attention_mask=masks[kind],
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        hidden = _layer_output(out)
    return hidden


def _run_falcon(
    span: SpanModel,
    hidden: torch.Tensor,
    first: int,
    last: int,
    cache: DynamicCache | None,
    position_ids: torch.Tensor,
    layers: list[_Prompted],
) -> torch.Tensor:
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    config = span.config
    batch, seq, _ = hidden.shape
    # Always materialised, so ALiBi biases can be folded into it (as FalconModel does).
    mask = span._mask(
        "full_attention", hidden, cache, position_ids, layer_idx=first, allow_is_causal_skip=False
    )
    alibi = None
    if config.alibi:
        past = int(position_ids[0, 0])
        ones = torch.ones((batch, seq + past), device=hidden.device, dtype=torch.long)
        alibi = build_alibi_tensor(ones, config.num_attention_heads, dtype=hidden.dtype)
        if mask is not None and mask.ndim == 4:
            min_dtype = torch.finfo(hidden.dtype).min
            if mask.dtype == torch.bool:
                zero = torch.full((), 0.0, device=mask.device, dtype=hidden.dtype)
                mask = torch.where(mask, zero, min_dtype)
            alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
            head_dim = config.hidden_size // config.num_attention_heads
            mask = torch.masked_fill(alibi / math.sqrt(head_dim), mask < -1, min_dtype)
    position_embeddings = span.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        out = layer(
            hidden,
            layer_past=cache,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            alibi=alibi,
            position_embeddings=position_embeddings,
        )
        hidden = _layer_output(out)
    return hidden


def _run_bloom(
    span: SpanModel,
    hidden: torch.Tensor,
    first: int,
    last: int,
    cache: DynamicCache | None,
    position_ids: torch.Tensor,
    layers: list[_Prompted],
) -> torch.Tensor:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    batch, seq, _ = hidden.shape
    kv_length = int(position_ids[0, 0]) + seq
    slopes = _get_alibi_slopes(span.config.n_head, hidden.device)
    alibi = slopes[:, None, None] * torch.arange(kv_length, device=hidden.device)
    alibi = alibi.repeat(batch, 1, 1).to(hidden.dtype)
    mask = span._mask("full_attention", hidden, cache, position_ids, layer_idx=first)
    for layer in layers:
        out = layer(hidden, layer_past=cache, attention_mask=mask, use_cache=cache is not None, alibi=alibi)
        hidden = _layer_output(out)
    return hidden


def _run_gpt2(
    span: SpanModel,
    hidden: torch.Tensor,
    first: int,
    last: int,
    cache: DynamicCache | None,
    position_ids: torch.Tensor,
    layers: list[_Prompted],
) -> torch.Tensor:
    mask = span._mask("full_attention", hidden, cache, position_ids, layer_idx=first)
    for layer in layers:
        out = layer(hidden, cache, mask, None, use_cache=cache is not None, position_ids=position_ids)
        hidden = _layer_output(out)
    return hidden


_RUNNERS = {"rope": _run_rope, "falcon": _run_falcon, "bloom": _run_bloom, "gpt2": _run_gpt2}


def build_model_on_meta(config: PretrainedConfig) -> PreTrainedModel:
    """The whole causal-LM model with parameters on the meta device (no memory) and buffers real
    (rotary frequencies, masks), as transformers computes them on CPU."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def renumber_layers(layers: nn.ModuleList) -> None:
    """Number the layers' attention from 0, so they index a span-sized cache."""
    for local_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = local_idx


def span_from_model(model: PreTrainedModel, config: PretrainedConfig, start: int, end: int) -> SpanModel:
    """The span of ``model``'s layers ``start..end-1``, renumbered for a span cache."""
    family = family_for(config)
    layers = nn.ModuleList(family.layers(model)[start:end])
    renumber_layers(layers)
    rotary_emb = getattr(getattr(model, family.body), "rotary_emb", None)
    return SpanModel(config, start, end, layers, rotary_emb)


def build_span_on_meta(config: PretrainedConfig, start: int, end: int) -> SpanModel:
    """Build the span's layers with parameters on the meta device (buffers real, on CPU)."""
    return span_from_model(build_model_on_meta(config), config, start, end)
