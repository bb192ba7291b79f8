from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, PretrainedConfig

from corolla.errors import ModelNotFound
from corolla.models.families import family_for
from corolla.runtime import loader
from corolla.runtime.loader import load_span, parameter_bytes, read_tensors, span_tensor_names, weight_files

CPU = torch.device("cpu")
NUM_BLOCKS = 4  # tiny_llama_dir's depth


@pytest.fixture(scope="module")
def sharded_dir(full_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama_sharded")
    full_model.save_pretrained(path, max_shard_size="40KB")
    return path


def layer_outputs(model: LlamaForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states leaving each decoder layer of the full model."""
    outputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def test_weight_files_of_a_single_file_checkpoint(tiny_llama_dir: Path) -> None:
    files = weight_files(tiny_llama_dir)
    assert set(files.values()) == {tiny_llama_dir / "model.safetensors"}
    assert "model.layers.3.mlp.down_proj.weight" in files
    assert "model.embed_tokens.weight" in files


def test_weight_files_without_weights_raise_model_not_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match=r"has no model\.safetensors or index"):
        weight_files(tmp_path)


def test_span_tensor_names_are_only_the_span(tiny_llama_dir: Path, full_model: LlamaForCausalLM) -> None:
    files = weight_files(tiny_llama_dir)
    names = span_tensor_names(files, family_for(full_model.config), 1, 3)
    per_layer = set(full_model.model.layers[0].state_dict())
    expected = {f"model.layers.{i}.{name}" for i in (1, 2) for name in per_layer}
    assert set(names) == expected
    assert all(canonical == name for name, canonical in names.items())


def test_span_tensor_names_skip_non_layer_tensors(tiny_llama_dir: Path, config: PretrainedConfig) -> None:
    names = span_tensor_names(weight_files(tiny_llama_dir), family_for(config), 0, NUM_BLOCKS)
    assert all(name.startswith("model.layers.") for name in names)
    assert {name.split(".")[2] for name in names} == {"0", "1", "2", "3"}


def test_span_tensor_names_do_not_confuse_layer_1_with_layer_10(
    tmp_path: Path, config: PretrainedConfig
) -> None:
    tensors = {f"model.layers.{i}.w": torch.full((1,), float(i)) for i in (1, 10, 11)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert list(span_tensor_names(weight_files(tmp_path), family_for(config), 1, 2)) == ["model.layers.1.w"]


def test_span_tensor_names_accept_checkpoints_without_the_base_prefix(tmp_path: Path) -> None:
    from transformers import GPT2Config

    tensors = {"h.0.attn.c_attn.weight": torch.zeros(1), "transformer.h.1.ln_1.weight": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    names = span_tensor_names(weight_files(tmp_path), family_for(GPT2Config()), 0, 2)
    assert names == {
        "h.0.attn.c_attn.weight": "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.ln_1.weight": "transformer.h.1.ln_1.weight",
    }


def test_split_model_equals_full_model_exactly(
    tiny_llama_dir: Path, config: PretrainedConfig, full_model: LlamaForCausalLM
) -> None:
    torch.manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    expected = layer_outputs(full_model, input_ids)
    first = load_span(tiny_llama_dir, config, 0, 2, dtype=torch.float32, device=CPU)
    second = load_span(tiny_llama_dir, config, 2, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    with torch.no_grad():
        hidden = first(full_model.model.embed_tokens(input_ids))
        assert torch.equal(hidden, expected[1])
        hidden = second(hidden)
    assert torch.equal(hidden, expected[NUM_BLOCKS - 1])


def test_loaded_span_is_eval_frozen_and_materialised(tiny_llama_dir: Path, config: PretrainedConfig) -> None:
    span = load_span(tiny_llama_dir, config, 1, 3, dtype=torch.bfloat16, device=CPU)
    assert (span.start, span.end, len(span.layers)) == (1, 3, 2)
    assert not span.training
    params = list(span.parameters())
    assert params and all(p.device == CPU and p.dtype == torch.bfloat16 for p in params)
    assert not any(p.requires_grad for p in params)


def test_parameter_bytes_of_half_the_blocks_is_half(
    tiny_llama_dir: Path, config: PretrainedConfig, full_model: LlamaForCausalLM
) -> None:
    whole = parameter_bytes(full_model.model.layers)
    half = load_span(tiny_llama_dir, config, 0, NUM_BLOCKS // 2, dtype=torch.float32, device=CPU)
    assert parameter_bytes(half) == whole // 2
    half_bf16 = load_span(tiny_llama_dir, config, 2, NUM_BLOCKS, dtype=torch.bfloat16, device=CPU)
    assert parameter_bytes(half_bf16) == whole // 4


def test_parameter_bytes_counts_elements_times_size() -> None:
    module = torch.nn.Linear(3, 5, dtype=torch.float16)
    assert parameter_bytes(module) == (3 * 5 + 5) * 2


def test_sharded_checkpoint_is_read_through_the_index(
    sharded_dir: Path, config: PretrainedConfig, full_model: LlamaForCausalLM
) -> None:
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())["weight_map"]
    files = weight_files(sharded_dir)
    assert len(set(files.values())) > 2
    assert files == {name: sharded_dir / file for name, file in index.items()}
    torch.manual_seed(2)
    input_ids = torch.randint(0, config.vocab_size, (1, 6))
    expected = layer_outputs(full_model, input_ids)
    span = load_span(sharded_dir, config, 0, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    with torch.no_grad():
        out = span(full_model.model.embed_tokens(input_ids))
    # the same weights, exactly; the output up to the rounding of the CPU kernels (cpu_kernels)
    reference = full_model.model.layers.state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in span.layers.state_dict().items())
    torch.testing.assert_close(out, expected[-1], rtol=0, atol=1e-6)


def test_span_opens_only_the_shards_it_needs(
    sharded_dir: Path, tmp_path: Path, config: PretrainedConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = weight_files(sharded_dir)
    needed = {
        file.name for name, file in files.items() if name.startswith(("model.layers.2.", "model.layers.3."))
    }
    # a copy whose other shards are gone: loading blocks 2..3 must not notice
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in [*needed, "model.safetensors.index.json", "config.json"]:
        shutil.copy(sharded_dir / file, partial / file)
    opened: list[str] = []
    real_safe_open = loader.safe_open

    def recording_safe_open(path: Path, **kwargs: str) -> object:
        opened.append(Path(path).name)
        return real_safe_open(path, **kwargs)

    monkeypatch.setattr(loader, "safe_open", recording_safe_open)
    span = load_span(partial, config, 2, NUM_BLOCKS, dtype=torch.float32, device=CPU)
    assert len(span.layers) == 2
    assert sorted(opened) == sorted(needed)  # each needed shard once, nothing else


def test_checkpoint_missing_a_span_tensor_raises_model_not_found(
    tiny_llama_dir: Path, tmp_path: Path, config: PretrainedConfig
) -> None:
    files = weight_files(tiny_llama_dir)
    names = [n for n in span_tensor_names(files, family_for(config), 0, NUM_BLOCKS)]
    tensors = {
        name: t.contiguous()
        for name, t in read_tensors(files, names).items()
        if name != "model.layers.1.mlp.up_proj.weight"
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelNotFound, match=r"does not match the model's blocks") as info:
        load_span(tmp_path, config, 0, 2, dtype=torch.float32, device=CPU)
    assert "1.mlp.up_proj.weight" in str(info.value)
    # a span that does not need the missing tensor loads fine
    assert len(load_span(tmp_path, config, 2, NUM_BLOCKS, dtype=torch.float32, device=CPU).layers) == 2


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_damaged_shard_raises_model_not_found(
    sharded_dir: Path, tmp_path: Path, config: PretrainedConfig, damage: str
) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(sharded_dir, copy)
    shard = weight_files(copy)["model.layers.1.mlp.up_proj.weight"]
    if damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(b"not really weights")
    with pytest.raises(ModelNotFound, match=shard.name):
        load_span(copy, config, 0, 2, dtype=torch.float32, device=CPU)
