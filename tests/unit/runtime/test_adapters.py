from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from corolla.errors import BadRequest, ConfigError, ModelNotFound
from corolla.models.families import family_for
from corolla.models.span import SpanModel
from corolla.runtime.adapters import load_adapters, resolve_adapter, served_adapters, using_adapter
from corolla.runtime.loader import load_span
from corolla.runtime.quantize import quantize_module
from helpers.models import save_tiny_family

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]
TOL = 1e-5
SPANS = ((0, 2), (2, 4))


def base_model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def save_adapter(model_dir: Path, out: Path, seed: int, **lora: Any) -> PeftModel:
    """A random LoRA adapter (nonzero B) of the model in ``model_dir``, saved to ``out``."""
    torch.manual_seed(seed)
    config = LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **lora}
    )
    peft_model = get_peft_model(base_model(model_dir), config)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def block_outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The embeddings entering block 0 and the hidden states leaving every block of a full model."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    family = family_for(base.config)
    outputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: object, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in family.layers(base)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
            embeds = family.first_hidden(base, family.embeddings(base)(input_ids), 0)
    finally:
        for hook in hooks:
            hook.remove()
    return embeds, outputs


def run_spans(spans: list[SpanModel], hidden: torch.Tensor, adapter: str | None) -> list[torch.Tensor]:
    """Each span's output, chained, computed with ``adapter``."""
    outs = []
    with torch.no_grad():
        for span in spans:
            with using_adapter(span, adapter):
                hidden = span(hidden)
            outs.append(hidden)
    return outs


def max_diff(spans: list[SpanModel], outs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(
        (out - reference[span.end - 1]).abs().max().item() for span, out in zip(spans, outs, strict=True)
    )


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def config(llama_dir: Path) -> PretrainedConfig:
    return base_model(llama_dir).config


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PeftModel]]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": (root / "a", save_adapter(llama_dir, root / "a", seed=1)),
        "b": (
            root / "b",
            save_adapter(llama_dir, root / "b", seed=2, target_modules=["k_proj", "down_proj"]),
        ),
        "odd": (root / "odd", save_adapter(llama_dir, root / "odd", seed=3, layers_to_transform=[1, 3])),
    }


@pytest.fixture(scope="module")
def reference(
    llama_dir: Path, adapters: dict[str, tuple[Path, PeftModel]], input_ids: torch.Tensor
) -> dict[str | None, list[torch.Tensor]]:
    """Block outputs of the base model (key None) and of each peft model."""
    embeds, base = block_outputs(base_model(llama_dir), input_ids)
    refs: dict[str | None, list[torch.Tensor]] = {None: base}
    for key, (_, peft_model) in adapters.items():
        peft_embeds, refs[key] = block_outputs(peft_model, input_ids)
        assert torch.equal(peft_embeds, embeds)
    refs["embeds"] = [embeds]
    return refs


def load(llama_dir: Path, config: PretrainedConfig, start: int, end: int, **kw: Any) -> SpanModel:
    return load_span(llama_dir, config, start, end, dtype=torch.float32, device=CPU, **kw)


@pytest.fixture(scope="module")
def spans_ab(
    llama_dir: Path, config: PretrainedConfig, adapters: dict[str, tuple[Path, PeftModel]]
) -> tuple[list[SpanModel], dict[str, str]]:
    """Spans 0:2 and 2:4 with adapters a and b loaded together; maps keys to served names."""
    names = {key: str(adapters[key][0]) for key in ("a", "b")}
    spans = [load(llama_dir, config, start, end) for start, end in SPANS]
    for span in spans:
        loaded = load_adapters(
            span, [resolve_adapter(names[k], "unused") for k in names], dtype=torch.float32, device=CPU
        )
        assert loaded == list(names.values())
    return spans, names


def test_each_adapter_reproduces_its_peft_model(
    spans_ab: tuple[list[SpanModel], dict[str, str]], reference: dict[str | None, list[torch.Tensor]]
) -> None:
    spans, names = spans_ab
    embeds = reference["embeds"][0]
    for key, name in names.items():
        outs = run_spans(spans, embeds, name)
        assert max_diff(spans, outs, reference[key]) < TOL
        assert max_diff(spans, outs, reference[None]) > 1e-2  # the adapter really changes the blocks


def test_no_adapter_is_the_base_model(
    spans_ab: tuple[list[SpanModel], dict[str, str]], reference: dict[str | None, list[torch.Tensor]]
) -> None:
    spans, names = spans_ab
    embeds = reference["embeds"][0]
    assert max_diff(spans, run_spans(spans, embeds, None), reference[None]) < TOL
    # Outside using_adapter, and after one, the span computes with its base weights.
    run_spans(spans, embeds, names["a"])
    with torch.no_grad():
        hidden = spans[1](spans[0](embeds))
    assert (hidden - reference[None][3]).abs().max().item() < TOL


def test_using_adapter_nests_and_restores(
    spans_ab: tuple[list[SpanModel], dict[str, str]], reference: dict[str | None, list[torch.Tensor]]
) -> None:
    spans, names = spans_ab
    span, embeds = spans[0], reference["embeds"][0]
    with torch.no_grad(), using_adapter(span, names["a"]):
        with using_adapter(span, names["b"]):
            assert (span(embeds) - reference["b"][1]).abs().max().item() < TOL
        with using_adapter(span, None):
            assert (span(embeds) - reference[None][1]).abs().max().item() < TOL
        assert (span(embeds) - reference["a"][1]).abs().max().item() < TOL


def test_unknown_adapter_is_a_bad_request(
    spans_ab: tuple[list[SpanModel], dict[str, str]], llama_dir: Path, config: PretrainedConfig
) -> None:
    spans, names = spans_ab
    with (
        pytest.raises(BadRequest, match=r"'nope' is not served here; served adapters: .*/a'") as info,
        using_adapter(spans[0], "nope"),
    ):
        pass
    assert "\n" not in str(info.value)
    bare = load(llama_dir, config, 0, 1)
    with pytest.raises(BadRequest, match="served adapters: none"), using_adapter(bare, names["a"]):
        pass
    with using_adapter(bare, None):  # no adapters at all: base weights, nothing to switch
        pass


def test_adapter_weights_are_frozen_and_in_eval_mode(
    spans_ab: tuple[list[SpanModel], dict[str, str]],
) -> None:
    spans, names = spans_ab
    for span in spans:
        assert not any(p.requires_grad for p in span.parameters())
        lora = [m for m in span.layers.modules() if isinstance(m, LoraLayer)]
        assert len(lora) == 2 * 6  # q, v, o, up (a) and k, down (b) in each of the 2 blocks
        assert not any(m.training for layer in lora for m in layer.modules())
        assert all(layer.lora_A[k].weight.dtype == torch.float32 for layer in lora for k in layer.lora_A)
        assert served_adapters(span) == tuple(names.values())


def test_gradients_flow_to_the_inputs_through_an_adapter(
    spans_ab: tuple[list[SpanModel], dict[str, str]], reference: dict[str | None, list[torch.Tensor]]
) -> None:
    spans, names = spans_ab
    grads = {}
    for name in (None, names["a"]):
        x = reference["embeds"][0].clone().requires_grad_(True)
        with torch.enable_grad(), using_adapter(spans[0], name):
            spans[0](x).sum().backward()
        grads[name] = x.grad
    assert (grads[None] - grads[names["a"]]).abs().max().item() > 1e-4


def test_layers_to_transform_counts_absolute_blocks(
    llama_dir: Path,
    config: PretrainedConfig,
    adapters: dict[str, tuple[Path, PeftModel]],
    reference: dict[str | None, list[torch.Tensor]],
) -> None:
    name = str(adapters["odd"][0])
    spans = [load(llama_dir, config, start, end) for start, end in SPANS]
    for span in spans:
        load_adapters(span, [resolve_adapter(name, "unused")], dtype=torch.float32, device=CPU)
        adapted = {n.split(".")[0] for n, m in span.layers.named_modules() if isinstance(m, LoraLayer)}
        assert adapted == {"1"}  # absolute blocks 1 and 3 are local block 1 of each span
    outs = run_spans(spans, reference["embeds"][0], name)
    assert max_diff(spans, outs, reference["odd"]) < TOL
    # A span without any of those blocks still serves the adapter: it changes nothing there.
    block2 = load(llama_dir, config, 2, 3)
    assert load_adapters(block2, [(name, adapters["odd"][0])], dtype=torch.float32, device=CPU) == [name]
    assert not any(isinstance(m, LoraLayer) for m in block2.modules())
    with torch.no_grad(), using_adapter(block2, name):
        assert (block2(reference[None][1]) - reference[None][2]).abs().max().item() < TOL


def test_adapter_in_bfloat16_on_a_bfloat16_span(
    llama_dir: Path, config: PretrainedConfig, adapters: dict[str, tuple[Path, PeftModel]]
) -> None:
    span = load_span(llama_dir, config, 0, 2, dtype=torch.bfloat16, device=CPU)
    name = str(adapters["a"][0])
    load_adapters(span, [(name, adapters["a"][0])], dtype=torch.bfloat16, device=CPU)
    dtypes = {p.dtype for p in span.parameters()}
    assert dtypes == {torch.bfloat16}
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    with torch.no_grad(), using_adapter(span, name):
        assert span(x).dtype == torch.bfloat16


def test_duplicate_adapters_are_refused(
    llama_dir: Path, config: PretrainedConfig, adapters: dict[str, tuple[Path, PeftModel]]
) -> None:
    span = load(llama_dir, config, 0, 1)
    pair = (str(adapters["a"][0]), adapters["a"][0])
    with pytest.raises(ConfigError, match="given twice"):
        load_adapters(span, [pair, pair], dtype=torch.float32, device=CPU)


def test_adapters_outside_the_blocks_are_refused(
    llama_dir: Path, config: PretrainedConfig, tmp_path: Path
) -> None:
    save_adapter(llama_dir, tmp_path / "head", seed=4, target_modules=["q_proj", "lm_head"])
    span = load(llama_dir, config, 0, 2)
    with pytest.raises(ConfigError, match=r"weights outside the decoder blocks \(lm_head\."):
        load_adapters(
            span, [resolve_adapter(str(tmp_path / "head"), "unused")], dtype=torch.float32, device=CPU
        )
    save_adapter(
        llama_dir, tmp_path / "saved", seed=5, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    with pytest.raises(ConfigError, match=r"modules_to_save=\['lm_head'\]"):
        load_adapters(span, [(str(tmp_path / "saved"), tmp_path / "saved")], dtype=torch.float32, device=CPU)
    save_adapter(llama_dir, tmp_path / "bias", seed=6, target_modules=["q_proj"], bias="lora_only")
    with pytest.raises(ConfigError, match="uses bias='lora_only'"):
        load_adapters(span, [(str(tmp_path / "bias"), tmp_path / "bias")], dtype=torch.float32, device=CPU)


def test_adapter_missing_weights_of_hosted_blocks_is_refused(
    llama_dir: Path, config: PretrainedConfig, adapters: dict[str, tuple[Path, PeftModel]], tmp_path: Path
) -> None:
    shutil.copy(adapters["a"][0] / "adapter_config.json", tmp_path / "adapter_config.json")
    tensors = load_file(adapters["a"][0] / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    pair = (str(tmp_path), tmp_path)
    # Blocks 0-1 have all their weights; blocks 2-3 do not.
    assert load_adapters(load(llama_dir, config, 0, 2), [pair], dtype=torch.float32, device=CPU) == [
        str(tmp_path)
    ]
    with pytest.raises(ConfigError, match=r"\(missing model\.layers\.3\.self_attn\.q_proj\.lora_B\.weight\)"):
        load_adapters(load(llama_dir, config, 2, 4), [pair], dtype=torch.float32, device=CPU)


def test_adapter_of_another_model_is_refused(
    config: PretrainedConfig, adapters: dict[str, tuple[Path, PeftModel]], tmp_path: Path
) -> None:
    from helpers.models import save_tiny_llama

    wide = save_tiny_llama(tmp_path / "wide", hidden_size=32, intermediate_size=64)
    span = load_span(wide, base_model(wide).config, 0, 2, dtype=torch.float32, device=CPU)
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_adapters(span, [(str(adapters["a"][0]), adapters["a"][0])], dtype=torch.float32, device=CPU)


def test_resolve_adapter_local_directory(adapters: dict[str, tuple[Path, PeftModel]], tmp_path: Path) -> None:
    path = adapters["a"][0]
    assert resolve_adapter(str(path), "unused") == (str(path), path.resolve())
    with pytest.raises(
        ModelNotFound, match="neither a local directory nor in the Hugging Face hub cache"
    ) as info:
        resolve_adapter(str(tmp_path / "missing"), "unused")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelNotFound, match=r"has no adapter_config\.json"):
        resolve_adapter(str(tmp_path), "unused")
    shutil.copy(path / "adapter_config.json", tmp_path / "adapter_config.json")
    with pytest.raises(ModelNotFound, match=r"has no adapter_model\.safetensors"):
        resolve_adapter(str(tmp_path), "unused")
    config = json.loads((path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ModelNotFound, match="is a PEFT IA3 adapter"):
        resolve_adapter(str(tmp_path), "unused")


def test_resolve_adapter_from_the_hub_cache_only(
    adapters: dict[str, tuple[Path, PeftModel]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--someone--tiny-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(adapters["a"][0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_adapter("someone/tiny-lora", "unused") == (
        "someone/tiny-lora",
        repo / "snapshots" / commit,
    )
    with pytest.raises(ModelNotFound, match="hf download someone/other-lora"):
        resolve_adapter("someone/other-lora", "unused")


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_adapter_on_quantised_blocks(
    quant_type: str,
    llama_dir: Path,
    config: PretrainedConfig,
    adapters: dict[str, tuple[Path, PeftModel]],
    input_ids: torch.Tensor,
) -> None:
    # The reference: peft's own LoRA on the full model whose blocks are quantised the same way.
    path, name = adapters["a"][0], str(adapters["a"][0])
    full = base_model(llama_dir)
    quantize_module(full.model.layers, quant_type, CPU)
    full.is_loaded_in_8bit, full.is_loaded_in_4bit = quant_type == "int8", quant_type == "nf4"
    peft_model = PeftModel.from_pretrained(full, path).eval()
    embeds, expected = block_outputs(peft_model, input_ids)
    with peft_model.disable_adapter():
        _, base = block_outputs(peft_model, input_ids)
    spans = [load(llama_dir, config, start, end, quant_type=quant_type) for start, end in SPANS]
    # A forward before the adapters are loaded (NF4 on CPU then repacks its weights) changes nothing.
    assert max_diff(spans, run_spans(spans, embeds, None), base) < TOL
    for span in spans:
        load_adapters(span, [(name, path)], dtype=torch.float32, device=CPU)
        assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in span.modules())
    assert max_diff(spans, run_spans(spans, embeds, name), expected) < TOL
    assert max_diff(spans, run_spans(spans, embeds, None), base) < TOL
    assert max_diff(spans, run_spans(spans, embeds, name), base) > 1e-2


def test_gpt2_layout_with_conv1d_layers(tmp_path: Path) -> None:
    model_dir = save_tiny_family(tmp_path / "gpt2", "gpt2")
    peft_model = save_adapter(
        model_dir, tmp_path / "lora", seed=6, target_modules=["c_attn"], fan_in_fan_out=True
    )
    input_ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    embeds, expected = block_outputs(peft_model, input_ids)
    config = peft_model.get_base_model().config
    spans = [load_span(model_dir, config, s, e, dtype=torch.float32, device=CPU) for s, e in SPANS]
    for span in spans:
        load_adapters(
            span, [resolve_adapter(str(tmp_path / "lora"), "unused")], dtype=torch.float32, device=CPU
        )
    outs = run_spans(spans, embeds, str(tmp_path / "lora"))
    assert max_diff(spans, outs, expected) < TOL
    _, base = block_outputs(base_model(model_dir), input_ids)
    assert max_diff(spans, run_spans(spans, embeds, None), base) < TOL
