from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from corolla.errors import AllocationFailed
from corolla.runtime.kv_cache import cache_bytes_per_token_block
from corolla.runtime.memory import (
    PROCESS_OVERHEAD,
    GiB,
    MiB,
    available_memory,
    block_bytes,
    cgroup_available,
    default_reserve,
    num_blocks_for,
    plan_num_blocks,
)
from helpers.models import tiny_llama_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_config() -> LlamaConfig:
    return tiny_llama_config()


def test_plan_is_the_floor_of_usable_memory_over_block_plus_cache() -> None:
    plan = plan_num_blocks(10 * GiB, GiB, GiB // 2, 80, reserve_bytes=GiB)
    assert plan.num_blocks == 6  # floor(9 / 1.5)
    assert (plan.memory_bytes, plan.reserve_bytes, plan.model_blocks) == (10 * GiB, GiB, 80)
    assert (plan.block_bytes, plan.cache_bytes_per_block) == (GiB, GiB // 2)
    assert "6 of 80 blocks" in plan.reason and "10.00 GiB" in plan.reason and "capped" not in plan.reason


def test_plan_is_capped_at_the_model_size() -> None:
    plan = plan_num_blocks(100 * GiB, 10 * MiB, 10 * MiB, 30, reserve_bytes=2 * GiB)
    assert plan.num_blocks == 30
    assert "capped at the model's 30 blocks" in plan.reason


def test_exactly_one_block_fits() -> None:
    plan = plan_num_blocks(3 * GiB, GiB, GiB, 30, reserve_bytes=GiB)
    assert plan.num_blocks == 1


def test_plan_refuses_when_not_one_block_fits() -> None:
    with pytest.raises(AllocationFailed) as info:
        plan_num_blocks(4 * GiB, 2 * GiB, GiB, 30, reserve_bytes=2 * GiB)
    message = str(info.value)
    assert "\n" not in message
    assert "not even one block fits" in message
    assert "4.00 GiB" in message and "3.00 GiB" in message  # memory, and what one block needs
    assert "--attn_cache_tokens" in message and "--torch_dtype" in message and "--device" in message


def test_plan_refuses_when_the_reserve_exceeds_memory() -> None:
    with pytest.raises(AllocationFailed, match="leaves 0.0 MiB"):
        plan_num_blocks(GiB, MiB, MiB, 30, reserve_bytes=2 * GiB)


def test_default_reserve_adds_activations_overhead_and_a_fraction(tiny_config: LlamaConfig) -> None:
    small = default_reserve(10 * GiB, CPU, tiny_config, torch.float32, max_batch_size=8192)
    activations = 8192 * (4 * 64 + 3 * 128) * 4
    assert small == activations + PROCESS_OVERHEAD["cpu"] + int(0.05 * 10 * GiB)
    large = default_reserve(20 * GiB, CPU, tiny_config, torch.float32, max_batch_size=8192)
    assert large - small == int(0.05 * 20 * GiB) - int(0.05 * 10 * GiB)
    more_tokens = default_reserve(10 * GiB, CPU, tiny_config, torch.float32, max_batch_size=16384)
    assert more_tokens - small == activations


def test_default_reserve_is_a_sane_share_of_a_real_card() -> None:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)  # Llama-2-7B
    reserve = default_reserve(80 * GiB, torch.device("cuda"), config, torch.float16, max_batch_size=8192)
    assert 4 * GiB < reserve < 12 * GiB  # ~1.3 GiB activations + 0.5 GiB context + 4 GiB slack


def test_block_bytes_equals_a_real_blocks_parameter_bytes(tiny_config: LlamaConfig) -> None:
    real = LlamaForCausalLM(tiny_config).model.layers[0]
    expected = sum(p.numel() * p.element_size() for p in real.parameters())
    assert block_bytes(tiny_config, torch.float32) == expected
    assert block_bytes(tiny_config, torch.bfloat16) == expected // 2


def test_available_memory_on_cpu_is_positive_and_below_total() -> None:
    memory = available_memory(CPU)
    assert 0 < memory <= psutil.virtual_memory().total


def test_num_blocks_for_a_tiny_model_hosts_all_of_it(tiny_config: LlamaConfig) -> None:
    plan = num_blocks_for(tiny_config, torch.float32, CPU, attn_cache_tokens=1024, max_batch_size=256)
    assert plan.num_blocks == plan.model_blocks == 4
    assert plan.cache_bytes_per_block == 1024 * cache_bytes_per_token_block(tiny_config, torch.float32)
    assert plan.block_bytes == block_bytes(tiny_config, torch.float32)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_limit_up_the_tree(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/box/server\n")
    root = tmp_path / "cgroup"
    _write(root / "box" / "server" / "memory.max", "max\n")
    _write(root / "box" / "server" / "memory.current", "100\n")
    _write(root / "box" / "memory.max", f"{4 * GiB}\n")
    _write(root / "box" / "memory.current", f"{GiB}\n")
    assert cgroup_available(root, proc) == 3 * GiB


def test_cgroup_v1_limit_minus_usage(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:devices:/\n4:memory:/job\n1:cpu,cpuacct:/\n")
    root = tmp_path / "cgroup"
    _write(root / "memory" / "job" / "memory.limit_in_bytes", f"{2 * GiB}\n")
    _write(root / "memory" / "job" / "memory.usage_in_bytes", f"{GiB // 2}\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # "no limit"
    _write(root / "memory" / "memory.usage_in_bytes", f"{GiB}\n")
    assert cgroup_available(root, proc) == GiB + GiB // 2


def test_no_cgroup_limit_gives_none(tmp_path: Path) -> None:
    assert cgroup_available(tmp_path, tmp_path / "missing") is None
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    _write(tmp_path / "memory.max", "max\n")
    _write(tmp_path / "memory.current", "123\n")
    assert cgroup_available(tmp_path, proc) is None
