from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from corolla.cli.validate import check_server_config
from corolla.config import ServerConfig
from corolla.errors import ConfigError, DeviceUnavailable, ModelNotFound, UnsupportedModel
from corolla.models.families import SUPPORTED_FAMILIES

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def serve(model: Path | str, **overrides: object) -> ServerConfig:
    return ServerConfig(model=str(model), device="cpu", **overrides)  # type: ignore[arg-type]


def test_a_valid_model_resolves_once(tiny_llama_dir: Path) -> None:
    resolved = check_server_config(serve(tiny_llama_dir, block_indices=(1, 4)))
    assert resolved.model_path.resolve() == tiny_llama_dir.resolve()
    assert resolved.model_config.num_hidden_layers == 4
    assert resolved.family == "llama"
    assert (resolved.device, resolved.dtype) == (torch.device("cpu"), torch.float32)


def test_explicit_dtype_wins(tiny_llama_dir: Path) -> None:
    assert check_server_config(serve(tiny_llama_dir, torch_dtype="bfloat16")).dtype == torch.bfloat16


@no_cuda
def test_cuda_without_cuda_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="--device cuda: torch"):
        check_server_config(ServerConfig(model=str(tiny_llama_dir), device="cuda"))


def test_float16_on_cpu_is_refused_before_the_model(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="float16 is not supported on CPU"):
        check_server_config(serve(tmp_path / "missing", torch_dtype="float16"))


def test_float16_checkpoint_runs_in_float32_on_cpu(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fp16"
    shutil.copytree(tiny_llama_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    with caplog.at_level(logging.WARNING):
        assert check_server_config(serve(path)).dtype == torch.float32
    assert "using float32" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_indices": (0, 999)}, "--block_indices 0:999 is outside the model: .* has 4 blocks"),
        ({"block_indices": (4, 5)}, "--block_indices 4:5 is outside the model"),
        ({"num_blocks": 5}, "--num_blocks 5 is more than the 4 blocks"),
    ],
)
def test_blocks_outside_the_model_are_refused(tiny_llama_dir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_server_config(serve(tiny_llama_dir, **overrides))


def test_missing_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no-such-model"):
        check_server_config(serve(tmp_path / "no-such-model"))


def test_unsupported_architecture_lists_the_supported_ones(unsupported_dir: Path) -> None:
    with pytest.raises(UnsupportedModel) as info:
        check_server_config(serve(unsupported_dir))
    message = str(info.value)
    assert "'gpt_neox' (architecture GPTNeoXForCausalLM) is not supported" in message
    assert message.endswith(f"supported families: {', '.join(SUPPORTED_FAMILIES)}")


def test_quantisation_defaults_to_none_on_cpu_and_says_so(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="corolla.cli.validate"):
        assert check_server_config(serve(tiny_llama_dir)).quant_type == "none"
    assert "weight quantisation: none (the default on cpu" in caplog.text


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_explicit_quantisation_is_kept(tiny_llama_dir: Path, quant_type: str) -> None:
    assert check_server_config(serve(tiny_llama_dir, quant_type=quant_type)).quant_type == quant_type


def test_unknown_quantisation_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--quant_type 'int4' is unknown; use one of auto, none, int8, nf"):
        serve("m", quant_type="int4")


def test_tensor_parallel_devices_become_the_plan(tiny_llama_dir: Path) -> None:
    config = ServerConfig(model=str(tiny_llama_dir), tensor_parallel_devices=("cpu", "cpu"))
    plan = check_server_config(config)
    assert plan.tp_devices == (torch.device("cpu"), torch.device("cpu"))
    assert plan.device == torch.device("cpu")


def test_device_and_tensor_parallel_devices_conflict() -> None:
    with pytest.raises(ConfigError, match="--device and --tensor_parallel_devices conflict"):
        serve("m", tensor_parallel_devices=("cpu", "cpu"))


def test_one_tensor_parallel_device_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        check_server_config(ServerConfig(model=str(tiny_llama_dir), tensor_parallel_devices=("cpu",)))


def test_tensor_parallel_of_an_unsharded_family_is_refused(tmp_path: Path) -> None:
    from transformers import BloomConfig

    BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"never read: refused before loading")
    with pytest.raises(ConfigError, match="bloom") as info:
        check_server_config(ServerConfig(model=str(tmp_path), tensor_parallel_devices=("cpu", "cpu")))
    assert "llama" in str(info.value)


@no_cuda
def test_tensor_parallel_over_missing_gpus_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="cuda:0"):
        check_server_config(
            ServerConfig(model=str(tiny_llama_dir), tensor_parallel_devices=("cuda:0", "cuda:1"))
        )
