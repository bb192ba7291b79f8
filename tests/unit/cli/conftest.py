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
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory whose architecture corolla does not serve."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"]
    ).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not really weights")
    return path
