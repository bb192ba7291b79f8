"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM, PretrainedConfig


@pytest.fixture(scope="module")
def full_model(tiny_llama_dir: Path) -> LlamaForCausalLM:
    """The whole ``tiny_llama_dir`` model in float32, loaded afresh for each test module."""
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def config(tiny_llama_dir: Path) -> PretrainedConfig:
    """The config of ``tiny_llama_dir``."""
    return AutoConfig.from_pretrained(tiny_llama_dir)
