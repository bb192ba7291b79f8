from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``COROLLA_*`` variable from the caller's shell may set a flag in these tests."""
    for name in list(os.environ):
        if name.startswith("COROLLA_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory whose architecture corolla does not serve (GPT-NeoX)."""
    from transformers import GPTNeoXConfig

    path = tmp_path_factory.mktemp("gpt_neox")
    GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=64,
        architectures=["GPTNeoXForCausalLM"],
    ).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not really weights")
    return path
