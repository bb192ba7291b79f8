"""Real server processes on loopback, real hivemind, a real client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla.lab.local_swarm import LocalServer, start_dht_peer
from helpers.models import save_tiny_llama

NUM_BLOCKS = 6


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (6 blocks, grouped-query attention, fp32, seeded)."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_gqa"),
        vocab_size=256,
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        max_position_embeddings=512,
    )


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
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny30"),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=30,
        num_key_value_heads=1,
    )
