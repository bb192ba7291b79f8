"""What ``corolla serve`` resolved before start-up: the model on disk and where/how to run it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from corolla.models.resolve import ResolvedModel


@dataclass(frozen=True)
class ServerPlan:
    model_path: Path
    model_name: str
    model_config: PretrainedConfig
    family: str  # the model family (transformers model_type), e.g. "llama"
    device: torch.device  # with tensor parallelism, the first of ``tp_devices``
    dtype: torch.dtype
    quant_type: str = "none"  # none, int8 or nf4
    tp_devices: tuple[torch.device, ...] = ()  # empty: no tensor parallelism
    adapters: tuple[tuple[str, Path], ...] = ()  # LoRA adapters to serve: (name clients use, directory)
    model: ResolvedModel | None = None  # what was resolved; fetches a hub model's tensors in part
