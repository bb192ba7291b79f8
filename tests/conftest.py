"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.models import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint (4 blocks, hidden 64, vocab 128, float32, seeded) in a tmp dir."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), dtype="float32")
