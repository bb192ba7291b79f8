from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, PretrainedConfig

from corolla.models.span import SpanModel, build_span_on_meta, span_config
from corolla.runtime.loader import load_span

CPU = torch.device("cpu")
NUM_BLOCKS = 4  # tiny_llama_dir's depth
ATOL = 1e-5


@pytest.fixture(scope="module")
def whole_span(tiny_llama_dir: Path, config: PretrainedConfig) -> SpanModel:
    return load_span(tiny_llama_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)


def cached_reference(model: LlamaForCausalLM, steps: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Decode ``steps`` (token ids per step) with the full model and its own cache.

    Returns, per step, the hidden states leaving each decoder layer."""
    cache = DynamicCache(config=model.config)
    outputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    results: list[list[torch.Tensor]] = []
    hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
    try:
        for input_ids in steps:
            outputs.clear()
            with torch.no_grad():
                model(input_ids, cache=cache, use_cache=True)
            results.append(list(outputs))
    finally:
        for hook in hooks:
            hook.remove()
    assert cache.get_seq_length() == sum(ids.shape[1] for ids in steps)
    return results


def decoding_steps(vocab_size: int) -> list[torch.Tensor]:
    """A 5-token prefill, then four single-token steps and one of two tokens (batch 2)."""
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 1, 1, 2, 1, 1]
    return [torch.randint(0, vocab_size, (2, n), generator=generator) for n in lengths]


def test_span_config_renumbers_layers(config: PretrainedConfig) -> None:
    sub = span_config(config, 1, 3)
    assert sub.num_hidden_layers == 2
    assert config.num_hidden_layers == NUM_BLOCKS  # the original is untouched
    if getattr(config, "layer_types", None) is not None:
        assert list(sub.layer_types) == list(config.layer_types)[1:3]


def test_build_on_meta_allocates_nothing_and_renumbers(config: PretrainedConfig) -> None:
    span = build_span_on_meta(config, 2, 4)
    assert (span.start, span.end, len(span.layers)) == (2, 4, 2)
    assert all(p.device.type == "meta" for p in span.layers.parameters())
    assert [layer.self_attn.layer_idx for layer in span.layers] == [0, 1]
    assert span.config.num_hidden_layers == 2


def test_new_cache_is_empty_and_sized_for_the_span(whole_span: SpanModel) -> None:
    cache = whole_span.new_cache()
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == 0
    assert len(cache.layers) == NUM_BLOCKS


def test_cached_decoding_matches_full_model(whole_span: SpanModel, full_model: LlamaForCausalLM) -> None:
    steps = decoding_steps(full_model.config.vocab_size)
    expected = cached_reference(full_model, steps)
    cache = whole_span.new_cache()
    position = 0
    for input_ids, layer_outputs in zip(steps, expected, strict=True):
        with torch.no_grad():
            out = whole_span(full_model.model.embed_tokens(input_ids), cache=cache)
        position += input_ids.shape[1]
        assert cache.get_seq_length() == position
        torch.testing.assert_close(out, layer_outputs[-1], atol=ATOL, rtol=0)


def test_chain_of_spans_with_own_caches_matches_full_model(
    tiny_llama_dir: Path, config: PretrainedConfig, full_model: LlamaForCausalLM
) -> None:
    first = load_span(tiny_llama_dir, config, 0, 1, dtype=torch.float32, device=CPU)
    second = load_span(tiny_llama_dir, config, 1, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    caches = (first.new_cache(), second.new_cache())
    steps = decoding_steps(config.vocab_size)
    for input_ids, layer_outputs in zip(steps, cached_reference(full_model, steps), strict=True):
        with torch.no_grad():
            hidden = first(full_model.model.embed_tokens(input_ids), cache=caches[0])
            torch.testing.assert_close(hidden, layer_outputs[0], atol=ATOL, rtol=0)
            hidden = second(hidden, cache=caches[1])
        torch.testing.assert_close(hidden, layer_outputs[-1], atol=ATOL, rtol=0)


def test_sub_spans_with_separate_caches(whole_span: SpanModel, full_model: LlamaForCausalLM) -> None:
    # one server, two sessions on different sub-spans: first..last local layers each
    head, tail = whole_span.new_cache(), whole_span.new_cache()
    steps = decoding_steps(full_model.config.vocab_size)
    for input_ids, layer_outputs in zip(steps, cached_reference(full_model, steps), strict=True):
        with torch.no_grad():
            hidden = whole_span(full_model.model.embed_tokens(input_ids), first=0, last=2, cache=head)
            torch.testing.assert_close(hidden, layer_outputs[1], atol=ATOL, rtol=0)
            hidden = whole_span(hidden, first=2, cache=tail)
        torch.testing.assert_close(hidden, layer_outputs[-1], atol=ATOL, rtol=0)
    total = sum(ids.shape[1] for ids in steps)
    assert head.get_seq_length(0) == head.get_seq_length(1) == total
    assert tail.get_seq_length(2) == tail.get_seq_length(3) == total


def test_middle_sub_span_without_cache(whole_span: SpanModel, full_model: LlamaForCausalLM) -> None:
    input_ids = torch.randint(
        0, full_model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4)
    )
    (layer_outputs,) = cached_reference(full_model, [input_ids])
    with torch.no_grad():
        out = whole_span(layer_outputs[0], first=1, last=3)
    torch.testing.assert_close(out, layer_outputs[2], atol=ATOL, rtol=0)
