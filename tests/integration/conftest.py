"""Real server processes on loopback, real hivemind, a real client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla.cli.local_swarm import LocalServer, start_dht_peer

NUM_BLOCKS = 6


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (6 blocks, grouped-query attention, fp32, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gqa")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dht_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A bootstrap-only DHT peer that outlives the servers of a test module."""
    peer = start_dht_peer(log_dir=tmp_path_factory.mktemp("dht"))
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def local_model(tiny_gqa_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gqa_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny30_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with 30 blocks (like the built-in model), for block-placement tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny30")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path
