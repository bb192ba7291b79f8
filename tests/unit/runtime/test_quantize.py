from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch

from corolla.errors import ConfigError
from corolla.runtime.quantize import (
    QUANT_TYPES,
    check_quant_supported,
    default_quant_type,
    quantize_module,
    quantized_bytes,
)
from helpers.models import tiny_llama_config

CPU = torch.device("cpu")
LINEARS_PER_LLAMA_LAYER = 7  # q, k, v, o, gate, up, down
# Measured here (bitsandbytes 0.50.2, CPU): one Linear ~0.9 % (int8) and ~9 % (nf4); the two-layer
# stack's residual update ~1 % (int8) and ~12 % (nf4).
LINEAR_REL_ERR = {"int8": 0.02, "nf4": 0.15}
STACK_REL_ERR = {"int8": 0.03, "nf4": 0.25}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2))
    # Stronger than the 0.02 init, so that the layers' update is not lost in the residual stream.
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def run_layers(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The blocks of ``model.model`` on ``hidden`` (a causal prefill), as a server's span runs them."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_embeddings = model.model.rotary_emb(hidden, position_ids)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
    )
    with torch.no_grad():
        for layer in model.model.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
    return hidden


def linear_round_trip(quant_type: str, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(576, 1536)).to(dtype).eval()
    quantized = copy.deepcopy(reference)
    assert quantize_module(quantized, quant_type, device) == 1
    x = torch.randn(2, 5, 576, dtype=dtype)
    with torch.no_grad():
        want = reference(x)
        got = quantized(x.to(device))
    assert got.dtype == dtype and got.shape == want.shape
    return rel_err(got.cpu(), want)


def stack_round_trip(quant_type: str, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Relative error of the two layers' update to the residual stream (``out - in``)."""
    model = tiny_llama(dtype)
    quantized = copy.deepcopy(model).to(device)
    replaced = quantize_module(quantized.model.layers, quant_type, device)
    assert replaced == LINEARS_PER_LLAMA_LAYER * 2
    import bitsandbytes as bnb  # after quantize_module, which imports it with its noise filtered

    expected_cls = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    expected_dtype = torch.int8 if quant_type == "int8" else torch.uint8
    for layer in quantized.model.layers:
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == LINEARS_PER_LLAMA_LAYER
        for linear in linears:
            assert isinstance(linear, expected_cls)
            assert linear.weight.dtype == expected_dtype
            assert linear.weight.device.type == device.type
            assert not linear.training
    torch.manual_seed(1)
    hidden = torch.randn(1, 8, 64, dtype=dtype)
    want = run_layers(model, hidden) - hidden
    got = run_layers(quantized, hidden.to(device)).cpu() - hidden
    assert got.dtype == dtype and torch.isfinite(got).all()
    return rel_err(got, want)


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_linear_round_trip_is_close(quant_type: str) -> None:
    err = linear_round_trip(quant_type, CPU)
    print(f"{quant_type}: Linear(576, 1536) relative error {err:.4f}")
    assert 0 < err < LINEAR_REL_ERR[quant_type]


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_llama_layers_are_all_replaced_and_close(quant_type: str) -> None:
    err = stack_round_trip(quant_type, CPU)
    print(f"{quant_type}: 2 Llama layers, relative error of the residual update {err:.4f}")
    assert 0 < err < STACK_REL_ERR[quant_type]


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_bfloat16_weights_quantise_and_run_on_bfloat16(quant_type: str) -> None:
    err = linear_round_trip(quant_type, CPU, torch.bfloat16)
    print(f"{quant_type}: bfloat16 Linear(576, 1536) relative error {err:.4f}")
    assert 0 < err < LINEAR_REL_ERR[quant_type] + 0.01
    err = stack_round_trip(quant_type, CPU, torch.bfloat16)
    print(f"{quant_type}: bfloat16 Llama layers relative error {err:.4f}")
    assert 0 < err < STACK_REL_ERR[quant_type] + 0.02


def test_nf4_compute_dtype_follows_the_weights() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        module = torch.nn.Sequential(torch.nn.Linear(64, 64).to(dtype))
        quantize_module(module, "nf4", CPU)
        assert module[0].compute_dtype == dtype
        assert module[0].bias.dtype == dtype


@pytest.mark.parametrize(("quant_type", "low", "high"), [("int8", 3.5, 4.1), ("nf4", 6.0, 8.1)])
def test_quantized_bytes_shrink(quant_type: str, low: float, high: float) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(256, 512)).eval()
    float_bytes = quantized_bytes(module)
    assert float_bytes == (512 * 256 + 512) * 4
    quantize_module(module, quant_type, CPU)
    before = quantized_bytes(module)
    with torch.no_grad():
        module(torch.randn(1, 1, 256))  # int8 moves its scales, nf4 may repack on the first forward
    after = quantized_bytes(module)
    print(
        f"{quant_type}: {float_bytes} float32 bytes -> {before} ({float_bytes / before:.2f}x), "
        f"after a forward {after} ({float_bytes / after:.2f}x)"
    )
    for size in (before, after):
        assert low < float_bytes / size < high


def test_none_is_a_no_op() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(64, 64))
    weight = module[0].weight
    assert quantize_module(module, "none", CPU) == 0
    assert type(module[0]) is torch.nn.Linear and module[0].weight is weight


def test_unknown_quant_type_is_a_config_error() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ConfigError, match="int8") as info:
        quantize_module(module, "fp8", CPU)
    assert "\n" not in str(info.value)
    assert all(name in str(info.value) for name in QUANT_TYPES)
    with pytest.raises(ConfigError):
        check_quant_supported("int4", CPU)


def test_skip_keeps_named_layers_in_float() -> None:
    model = tiny_llama()
    layers = model.model.layers
    names: list[str] = []

    def skip(name: str) -> bool:
        names.append(name)
        return name.endswith("mlp.down_proj") or name.startswith("1.self_attn.")

    assert quantize_module(layers, "int8", CPU, skip=skip) == 2 * LINEARS_PER_LLAMA_LAYER - 2 - 4
    assert "0.self_attn.q_proj" in names and "1.mlp.down_proj" in names
    for layer in layers:
        assert type(layer.mlp.down_proj) is torch.nn.Linear
    assert all(type(m) is torch.nn.Linear for m in layers[1].self_attn.children())
    assert type(layers[0].self_attn.q_proj) is not torch.nn.Linear
    # Quantising again replaces only what is still float and not skipped.
    assert quantize_module(layers, "int8", CPU, skip=skip) == 0


def test_module_itself_is_not_replaced() -> None:
    linear = torch.nn.Linear(64, 64)
    assert quantize_module(linear, "int8", CPU) == 0
    assert type(linear) is torch.nn.Linear


def test_nf4_odd_shapes_run_on_cpu() -> None:
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Linear(50, 96)).eval()
    quantized = copy.deepcopy(reference)
    assert quantize_module(quantized, "nf4", CPU) == 2
    x = torch.randn(1, 3, 100)
    with torch.no_grad():
        assert rel_err(quantized(x), reference(x)) < LINEAR_REL_ERR["nf4"]


def test_int8_forward_does_not_log_the_fp16_cast(caplog: pytest.LogCaptureFixture) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    quantize_module(module, "int8", CPU)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        module(torch.randn(1, 1, 64))
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")]


def test_default_quant_type() -> None:
    assert default_quant_type(torch.device("cuda")) == "nf4"
    assert default_quant_type(torch.device("cuda:1")) == "nf4"
    assert default_quant_type(CPU) == "none"
    assert default_quant_type(torch.device("mps")) == "none"


def test_check_quant_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    for quant_type in QUANT_TYPES:
        check_quant_supported(quant_type, CPU)
        check_quant_supported(quant_type, torch.device("cuda"))
    check_quant_supported("none", torch.device("mps"))
    with pytest.raises(ConfigError, match="mps") as info:
        check_quant_supported("nf4", torch.device("mps"))
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match="pip install bitsandbytes") as info:
        check_quant_supported("int8", CPU)
    assert "\n" not in str(info.value)
    check_quant_supported("none", CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_cuda_round_trip(quant_type: str) -> None:
    cuda = torch.device("cuda")
    err = linear_round_trip(quant_type, cuda)
    print(f"{quant_type}: CUDA Linear(576, 1536) relative error {err:.4f}")
    assert 0 < err < LINEAR_REL_ERR[quant_type]
    err = stack_round_trip(quant_type, cuda)
    print(f"{quant_type}: CUDA Llama layers relative error {err:.4f}")
    assert 0 < err < STACK_REL_ERR[quant_type]
    for dtype in (torch.bfloat16, torch.float16):
        err = linear_round_trip(quant_type, cuda, dtype)
        print(f"{quant_type}: CUDA {dtype} Linear relative error {err:.4f}")
        assert 0 < err < LINEAR_REL_ERR[quant_type] + 0.01
