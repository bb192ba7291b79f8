"""The CUDA paths: float16, int8 and nf4 on a GPU, tensor parallelism over GPUs, the
memory-based block count, and a real server on the GPU. Skipped without CUDA; on a GPU machine
``scripts/gpu_check.sh`` runs them with the other ``gpu`` tests and the quantisation benchmark."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.config import BUILTIN_MODEL
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from corolla.runtime.loader import load_span
from corolla.runtime.memory import available_memory, block_bytes, num_blocks_for
from corolla.runtime.quantize import default_quant_type
from helpers.models import save_tiny_family

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 128 keeps every linear layer a multiple of bitsandbytes' 64-wide blocks
    path = tmp_path_factory.mktemp("cuda-llama")
    return save_tiny_family(path, "llama", hidden_size=128, intermediate_size=256)


def run_span(path: Path, device: torch.device, dtype: torch.dtype, **kwargs: object) -> torch.Tensor:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    span = load_span(path, config, 0, config.num_hidden_layers, dtype=dtype, device=device, **kwargs)
    hidden = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return span(hidden.to(device=device, dtype=dtype)).float().cpu()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_nf4_is_the_default_on_cuda() -> None:
    assert default_quant_type(CUDA) == "nf4"


def test_float16_on_cuda_matches_float32(tiny_dir: Path) -> None:
    expected = run_span(tiny_dir, CPU, torch.float32)
    assert relative_error(run_span(tiny_dir, CUDA, torch.float16), expected) < 5e-3


@pytest.mark.parametrize(("quant_type", "bound"), [("int8", 0.05), ("nf4", 0.25)])
def test_quantised_span_on_cuda_stays_close(tiny_dir: Path, quant_type: str, bound: float) -> None:
    expected = run_span(tiny_dir, CPU, torch.float32)
    got = run_span(tiny_dir, CUDA, torch.float16, quant_type=quant_type)
    assert relative_error(got, expected) < bound


def test_tensor_parallel_over_gpus_matches_one_gpu(tiny_dir: Path) -> None:
    count = torch.cuda.device_count()
    devices = (torch.device("cuda:0"), torch.device(f"cuda:{1 if count > 1 else 0}"))
    expected = run_span(tiny_dir, CUDA, torch.float32)
    got = run_span(tiny_dir, CUDA, torch.float32, tp_devices=devices)
    assert (got - expected).abs().max().item() < 1e-4


def test_block_count_follows_the_card_memory() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=80,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    )  # fmt: skip  (Llama 3 70B's shape)
    fp16 = num_blocks_for(config, torch.float16, CUDA, 8192, 2048)
    nf4 = num_blocks_for(config, torch.float16, CUDA, 8192, 2048, quant_type="nf4")
    assert fp16.memory_bytes == available_memory(CUDA) == torch.cuda.get_device_properties(0).total_memory
    assert block_bytes(config, torch.float16, "nf4") * 3.5 < block_bytes(config, torch.float16)
    assert 1 <= fp16.num_blocks < nf4.num_blocks <= 80
    card = torch.cuda.get_device_name(0)
    print(f"\nLlama-3-70B-shaped blocks on {card}: fp16 {fp16.reason}; nf4 {nf4.reason}")


@pytest.fixture(scope="module")
def gpu_swarm(dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    servers = start_swarm(
        BUILTIN_MODEL, [(0, 15), (15, 30)], initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "gpu", "--device", "cuda"], log_dir=tmp_path_factory.mktemp("gpu"),
    )  # fmt: skip
    yield dht_peer.maddr or ""
    stop_all(servers)


def test_a_gpu_swarm_serves_the_builtin_model_in_nf4_by_default(gpu_swarm: str) -> None:
    from transformers import AutoTokenizer

    from corolla.cli.generate import encode_prompt
    from corolla.config import default_cache_dir
    from corolla.models.resolve import resolve_model

    model = AutoDistributedModelForCausalLM.from_pretrained(
        BUILTIN_MODEL, initial_peers=[gpu_swarm], dht_prefix="gpu"
    )
    try:
        manager = model.manager
        hops = manager.route(0, manager.num_blocks)
        replies = [manager.loop.run(call_info(manager.p2p, manager.peer(h)), timeout=30) for h in hops]
        assert {r.quant_type for r in replies} == {"nf4"}
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(BUILTIN_MODEL, default_cache_dir()).path)
        ids = encode_prompt(tokenizer, "What is the capital of France?", True)
        with torch.no_grad():
            answer = tokenizer.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0])
        assert "Paris" in answer
    finally:
        model.manager.shutdown()
