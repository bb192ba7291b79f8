"""Checks that need the machine or the model, done before anything heavy is loaded.

``check_server_config`` resolves the "auto" values and the model once; the server reuses
what it returns instead of resolving them again.
"""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig

from corolla.config import ServerConfig
from corolla.errors import ConfigError
from corolla.models.families import check_supported
from corolla.models.resolve import load_config, resolve_model
from corolla.runtime.device import resolve_device, resolve_dtype
from corolla.server.plan import ServerPlan

logger = logging.getLogger(__name__)


def check_server_config(config: ServerConfig) -> ServerPlan:
    """Refuse what cannot work here (``CorollaError``), cheapest check first."""
    device = resolve_device(config.device)
    if config.torch_dtype != "auto":
        resolve_dtype(config.torch_dtype, device, None)  # float16 on CPU: refuse before touching the model
    model = resolve_model(config.model, config.cache_dir)
    model_config = load_config(model.path)
    family = check_supported(model_config)
    check_blocks(config, model.name, model_config.num_hidden_layers)
    dtype, warning = resolve_dtype(config.torch_dtype, device, checkpoint_dtype(model_config))
    if warning:
        logger.warning(warning)
    return ServerPlan(model.path, model.name, model_config, family, device, dtype)


def check_blocks(config: ServerConfig, model_name: str, num_layers: int) -> None:
    """``--block_indices`` / ``--num_blocks`` must fit inside the model's ``num_layers`` blocks."""
    if config.block_indices is not None:
        start, end = config.block_indices
        if end > num_layers:
            raise ConfigError(
                f"--block_indices {start}:{end} is outside the model: {model_name} has {num_layers} blocks, "
                f"so use START:END with 0 <= START < END <= {num_layers}"
            )
    if config.num_blocks is not None and config.num_blocks > num_layers:
        raise ConfigError(
            f"--num_blocks {config.num_blocks} is more than the {num_layers} blocks of {model_name}"
        )


def checkpoint_dtype(model_config: PretrainedConfig) -> torch.dtype | None:
    """The dtype the checkpoint was saved in, if its config says."""
    value = getattr(model_config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None
