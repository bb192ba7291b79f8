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
from corolla.runtime.adapters import resolve_adapter
from corolla.runtime.device import resolve_device, resolve_dtype
from corolla.runtime.quantize import check_quant_supported, default_quant_type
from corolla.runtime.tensor_parallel import check_tensor_parallel
from corolla.server.plan import ServerPlan

logger = logging.getLogger(__name__)


def check_server_config(config: ServerConfig) -> ServerPlan:
    """Refuse what cannot work here (``CorollaError``), cheapest check first."""
    tp_devices = tuple(resolve_device(d) for d in config.tensor_parallel_devices)
    device = tp_devices[0] if tp_devices else resolve_device(config.device)
    if config.torch_dtype != "auto":
        resolve_dtype(config.torch_dtype, device, None)  # float16 on CPU: refuse before touching the model
    model = resolve_model(config.model, config.cache_dir, revision=config.revision, token=config.token)
    model_config = load_config(model.path)
    family = check_supported(model_config)
    if tp_devices:
        check_tensor_parallel(model_config, tp_devices)
    check_blocks(config, model.name, model_config.num_hidden_layers)
    dtype, warning = resolve_dtype(config.torch_dtype, device, checkpoint_dtype(model_config))
    quant_type = resolve_quant_type(config.quant_type, device)
    adapters = tuple(resolve_adapter(a, config.cache_dir) for a in config.adapters)
    if adapters and tp_devices:
        raise ConfigError(
            "--adapters cannot be combined with --tensor_parallel_devices yet; drop one of them"
        )
    if warning:
        logger.warning(warning)
    return ServerPlan(
        model.path, model.name, model_config, family, device, dtype, quant_type, tp_devices, adapters,
        model,
    )  # fmt: skip


def resolve_quant_type(requested: str, device: torch.device) -> str:
    """``--quant_type``, with ``auto`` made concrete (nf4 on CUDA, none elsewhere, as Petals does);
    refused when bitsandbytes cannot quantise on ``device``. The choice is logged."""
    quant_type = default_quant_type(device) if requested == "auto" else requested
    check_quant_supported(quant_type, device)
    if requested == "auto":
        logger.info(
            "weight quantisation: %s (the default on %s; choose with --quant_type none|int8|nf4)",
            quant_type, device.type,
        )  # fmt: skip
    else:
        logger.info("weight quantisation: %s (--quant_type)", quant_type)
    return quant_type


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
