"""Tensor parallelism: sharded decoder layers must match the unsharded ones (fp32, 1e-5)."""

from __future__ import annotations

import copy
import gc
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from corolla.errors import ConfigError
from corolla.runtime.tensor_parallel import (
    TP_MODEL_TYPES,
    ShardedAttention,
    ShardedMLP,
    check_tensor_parallel,
    shard_layers,
    tp_cache_config,
)

CPU = torch.device("cpu")
TWO_CPUS = [CPU, CPU]
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "num_hidden_layers": 3,
    "max_position_embeddings": 64,
    **TOKEN_IDS,
}
# (model_type, config overrides, attention implementation or None for the default)
CASES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "llama": ("llama", {}, None),
    "llama-bias-eager": ("llama", {"attention_bias": True, "mlp_bias": True}, "eager"),
    "mistral-sliding": ("mistral", {"sliding_window": 4}, None),
    "qwen2": ("qwen2", {}, None),
    "qwen2-sliding": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        None,
    ),
    "qwen3": ("qwen3", {"head_dim": 16}, None),
    "gemma2-sliding": ("gemma2", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16}, None),
    "gemma2-sliding-eager": (
        "gemma2",
        {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16},
        "eager",
    ),
    "phi3": ("phi3", {}, None),
}


def _config(model_type: str, **overrides: Any) -> Any:
    return AutoConfig.for_model(model_type, **{**SMALL, **overrides})


def _tiny(
    model_type: str, overrides: dict[str, Any], attn: str | None = None
) -> tuple[Any, nn.ModuleList, nn.Module]:
    """A seeded random model's config, layers and rotary embedding (fp32, eval)."""
    torch.manual_seed(0)
    cfg = _config(model_type, **overrides)
    kwargs = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_config(cfg, **kwargs).float().eval()
    with torch.no_grad():  # larger, varied weights so that every head and norm matters
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.1)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    return model.config, model.model.layers, model.model.rotary_emb


def _layer_types(config: Any) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers


def _run(
    config: Any,
    layers: nn.ModuleList,
    rotary_emb: nn.Module,
    chunks: list[torch.Tensor],
    *,
    cache: DynamicCache | None,
    first: int = 0,
) -> list[torch.Tensor]:
    """Run layers ``first..`` over ``chunks`` one after the other, the way the server does."""
    types = _layer_types(config)
    outputs = []
    with torch.no_grad():
        for hidden in chunks:
            past = cache.get_seq_length(first) if cache is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
            masks = {}
            for kind in set(types[first:]):
                make = (
                    create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                )
                masks[kind] = make(
                    config=config,
                    inputs_embeds=hidden,
                    attention_mask=None,
                    cache=cache,
                    position_ids=position_ids,
                    layer_idx=types.index(kind, first),
                )
            position_embeddings = rotary_emb(hidden, position_ids=position_ids)
            for idx in range(first, len(layers)):
                hidden = layers[idx](
                    hidden,
                    attention_mask=masks[types[idx]],
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=cache is not None,
                    position_embeddings=position_embeddings,
                )
            outputs.append(hidden)
    return outputs


def _compare(
    model_type: str,
    overrides: dict[str, Any],
    devices: list[torch.device],
    attn: str | None = None,
    first: int = 0,
) -> float:
    """Prefill 7 tokens without a cache, then prefill 5 + decode 3 with a cache; return the max diff."""
    config, layers, rotary_emb = _tiny(model_type, overrides, attn)
    ref_layers, ref_rotary = copy.deepcopy(layers).to(devices[0]), copy.deepcopy(rotary_emb).to(devices[0])
    tp_layers, tp_rotary = copy.deepcopy(layers), copy.deepcopy(rotary_emb).to(devices[0])
    shard_layers(tp_layers, config, devices)

    torch.manual_seed(1)
    hidden = torch.randn(2, 8, config.hidden_size, device=devices[0])
    max_diff = 0.0

    prefill = [hidden[:, :7]]
    expected = _run(config, ref_layers, ref_rotary, prefill, cache=None, first=first)
    actual = _run(config, tp_layers, tp_rotary, prefill, cache=None, first=first)

    steps = [hidden[:, :5], hidden[:, 5:6], hidden[:, 6:7], hidden[:, 7:8]]
    expected += _run(config, ref_layers, ref_rotary, steps, cache=DynamicCache(config=config), first=first)
    tp_cache = DynamicCache(config=tp_cache_config(config, len(devices)))
    actual += _run(config, tp_layers, tp_rotary, steps, cache=tp_cache, first=first)

    for exp, act in zip(expected, actual, strict=True):
        assert act.device == devices[0]
        torch.testing.assert_close(act, exp, atol=1e-5, rtol=0)
        max_diff = max(max_diff, (act - exp).abs().max().item())
    # every shard's cache slot holds the full sequence (or the sliding window of it)
    for idx in range(first, len(layers)):
        for shard in range(len(devices)):
            slot = idx + shard * len(layers)
            assert tp_cache.get_seq_length(slot) == tp_cache.get_seq_length(idx) > 0
    return max_diff


@pytest.mark.parametrize("case", list(CASES))
def test_two_shards_match_unsharded(case: str) -> None:
    model_type, overrides, attn = CASES[case]
    max_diff = _compare(model_type, overrides, TWO_CPUS, attn)
    print(f"{case}: max abs diff {max_diff:.2e}")


@pytest.mark.parametrize("case", ["llama", "gemma2-sliding", "phi3"])
def test_span_starting_mid_way(case: str) -> None:
    model_type, overrides, attn = CASES[case]
    _compare(model_type, overrides, TWO_CPUS, attn, first=1)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3"])
def test_three_shards(model_type: str) -> None:
    overrides: dict[str, Any] = {
        "hidden_size": 96,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 192,
    }
    if model_type == "gemma2":
        overrides.update(head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
    _compare(model_type, overrides, [CPU, CPU, CPU])


def test_every_supported_type_is_tested() -> None:
    assert {model_type for model_type, _, _ in CASES.values()} == set(TP_MODEL_TYPES)


def test_shard_structure() -> None:
    config, layers, _ = _tiny("llama", {"attention_bias": True, "mlp_bias": True})
    original = layers[1].self_attn.q_proj.weight.detach().clone()
    shard_layers(layers, config, TWO_CPUS)
    for idx, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn, ShardedAttention) and isinstance(mlp, ShardedMLP)
        assert [s.layer_idx for s in attn.shards] == [idx, idx + 3]
        for i, shard in enumerate(attn.shards):
            assert shard.q_proj.weight.shape == (32, 64)
            assert shard.k_proj.weight.shape == (16, 64) and shard.v_proj.weight.shape == (16, 64)
            assert shard.o_proj.weight.shape == (64, 32)
            assert shard.q_proj.bias.shape == (32,)
            assert (shard.o_proj.bias is not None) == (i == 0)
            assert shard.num_key_value_groups == 2
            assert shard.config.num_attention_heads == 2 and config.num_attention_heads == 4
        for i, shard in enumerate(mlp.shards):
            assert shard.gate_proj.weight.shape == (64, 64) and shard.down_proj.weight.shape == (64, 64)
            assert (shard.down_proj.bias is not None) == (i == 0)
    q0, q1 = layers[1].self_attn.shards[0].q_proj.weight, layers[1].self_attn.shards[1].q_proj.weight
    torch.testing.assert_close(torch.cat([q0, q1]), original, atol=0, rtol=0)
    assert q0.data_ptr() != original.data_ptr()


def test_original_weights_are_freed() -> None:
    config, layers, _ = _tiny("llama", {})
    refs = [weakref.ref(layers[0].self_attn), weakref.ref(layers[0].mlp.down_proj.weight)]
    shard_layers(layers, config, TWO_CPUS)
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_phi3_fused_shards() -> None:
    config, layers, _ = _tiny("phi3", {})
    qkv = layers[0].self_attn.qkv_proj.weight.detach().clone()
    gate_up = layers[0].mlp.gate_up_proj.weight.detach().clone()
    shard_layers(layers, config, TWO_CPUS)
    for i, shard in enumerate(layers[0].self_attn.shards):
        q, k, v = (
            qkv[i * 32 : (i + 1) * 32],
            qkv[64 + i * 16 : 64 + (i + 1) * 16],
            qkv[96 + i * 16 : 96 + (i + 1) * 16],
        )
        torch.testing.assert_close(shard.qkv_proj.weight, torch.cat([q, k, v]), atol=0, rtol=0)
        assert shard.num_key_value_heads == 1
    for i, shard in enumerate(layers[0].mlp.shards):
        gate, up = gate_up[i * 64 : (i + 1) * 64], gate_up[128 + i * 64 : 128 + (i + 1) * 64]
        torch.testing.assert_close(shard.gate_up_proj.weight, torch.cat([gate, up]), atol=0, rtol=0)


def test_shard_layers_keeps_dtype() -> None:
    config, layers, _ = _tiny("qwen3", {"head_dim": 16})
    layers.to(torch.bfloat16)
    shard_layers(layers, config, TWO_CPUS)
    assert {p.dtype for p in layers.parameters()} == {torch.bfloat16}


def test_shard_layers_needs_renumbered_layers() -> None:
    config, layers, _ = _tiny("llama", {})
    span = nn.ModuleList(layers[1:])  # still numbered 1 and 2, but a span of 2 layers
    with pytest.raises(ValueError, match="renumber"):
        shard_layers(span, config, TWO_CPUS)


def test_shard_layers_needs_loaded_weights() -> None:
    config = _config("llama")
    with torch.device("meta"):
        layers = AutoModelForCausalLM.from_config(config).model.layers
    with pytest.raises(ValueError, match="load the span's weights first"):
        shard_layers(layers, config, TWO_CPUS)


def test_tp_cache_config() -> None:
    config = _config("gemma2", head_dim=16, sliding_window=4)
    types = list(config.layer_types)
    cache_config = tp_cache_config(config, 2)
    assert cache_config.num_hidden_layers == 6 and cache_config.layer_types == types * 2
    assert config.num_hidden_layers == 3 and config.layer_types == types  # the span config is untouched
    cache = DynamicCache(config=cache_config)
    assert cache.is_sliding == [t == "sliding_attention" for t in types * 2]
    mistral = tp_cache_config(_config("mistral", sliding_window=4), 3)
    assert DynamicCache(config=mistral).is_sliding == [True] * 9


# ---- refusals ----------------------------------------------------------------------------------


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Pretend to have CUDA devices; the returned dict maps index -> total memory (edit it)."""
    memory = {0: 80 * 2**30, 1: 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(memory))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=memory[int(i)])
    )
    return memory


GPUS = [torch.device("cuda:0"), torch.device("cuda:1")]


def test_refuses_one_device() -> None:
    with pytest.raises(ConfigError, match="at least 2 devices, got 1"):
        check_tensor_parallel(_config("llama"), [CPU])


def test_refuses_mixed_device_types() -> None:
    with pytest.raises(ConfigError, match="devices of one type, got cpu/cuda"):
        check_tensor_parallel(_config("llama"), [CPU, torch.device("cuda:0")])


def test_refuses_unsupported_model_type() -> None:
    with pytest.raises(ConfigError, match="does not support model type 'gpt2'; supported: llama, mistral"):
        check_tensor_parallel(AutoConfig.for_model("gpt2"), TWO_CPUS)


@pytest.mark.parametrize(
    ("overrides", "n", "message"),
    [
        ({}, 3, "num_attention_heads=4 is not divisible by the 3"),
        ({"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96}, 3, "num_key_value_heads=2"),
        ({"intermediate_size": 129}, 2, "intermediate_size=129 is not divisible by the 2"),
    ],
)
def test_refuses_indivisible_sizes(overrides: dict[str, Any], n: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(_config("llama", **overrides), [CPU] * n)


def test_refuses_missing_cuda_device(fake_gpus: dict[int, int]) -> None:
    del fake_gpus[1]
    with pytest.raises(ConfigError, match=r"device cuda:1 does not exist: this machine has 1 CUDA device"):
        check_tensor_parallel(_config("llama"), GPUS)


def test_refuses_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        check_tensor_parallel(_config("llama"), GPUS)


def test_refuses_uneven_gpu_memory(fake_gpus: dict[int, int]) -> None:
    check_tensor_parallel(_config("llama"), GPUS)
    fake_gpus[1] = 73 * 2**30  # within 10% of 80 GiB
    check_tensor_parallel(_config("llama"), GPUS)
    fake_gpus[1] = 40 * 2**30
    with pytest.raises(ConfigError, match=r"uneven memory \(cuda:0=80.0 GiB, cuda:1=40.0 GiB\)"):
        check_tensor_parallel(_config("llama"), GPUS)


def test_messages_are_one_line(fake_gpus: dict[int, int]) -> None:
    fake_gpus[1] = 40 * 2**30
    for config, devices in [
        (_config("llama"), [CPU]),
        (AutoConfig.for_model("gpt2"), TWO_CPUS),
        (_config("llama"), [CPU] * 3),
        (_config("llama"), GPUS),
    ]:
        with pytest.raises(ConfigError) as info:
            check_tensor_parallel(config, devices)
        assert "\n" not in str(info.value) and "; " in str(info.value)


# ---- GPUs --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "names",
    [
        pytest.param(
            ["cuda:0", "cuda:0"],
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
        pytest.param(
            ["cuda:0", "cuda:1"],
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
        ),
    ],
)
@pytest.mark.parametrize("case", ["llama-bias-eager", "gemma2-sliding", "qwen3", "phi3"])
def test_cuda_shards_match_unsharded(names: list[str], case: str) -> None:
    model_type, overrides, attn = CASES[case]
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        max_diff = _compare(model_type, overrides, [torch.device(n) for n in names], attn)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    print(f"{case} on {names}: max abs diff {max_diff:.2e}")
