"""Load only a span's weights: open the safetensors shards that hold them, read just those tensors."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig

from corolla.errors import ModelNotFound
from corolla.hub.store import ModelStore, is_partial
from corolla.models.families import Family, family_for
from corolla.models.span import SpanModel, build_model_on_meta, span_from_model
from corolla.runtime.cpu_kernels import use_onednn_linears
from corolla.runtime.quantize import quantize_module
from corolla.runtime.tensor_parallel import ShardedAttention, ShardedMLP, shard_layers, tp_cache_config

logger = logging.getLogger(__name__)

def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    try:
        return _weight_files(model_dir)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelNotFound(
            f"cannot read the weights in {model_dir} ({type(e).__name__}: {e}); "
            "re-download or re-convert the model"
        ) from None


def _weight_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise ModelNotFound(
            f"{model_dir} has no model.safetensors or index; convert the model to safetensors"
        )
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Read ``names`` from their files, opening each file once. The files of a hub model held in
    part must hold these tensors' bytes already (``ResolvedModel.fetch``)."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        _check_fetched(path, file_names)
        try:
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        except (OSError, ValueError, SafetensorError) as e:
            raise ModelNotFound(
                f"cannot read weights from {path} ({type(e).__name__}: {e}); "
                "re-download or re-convert the model"
            ) from None
    return out


def _check_fetched(path: Path, names: list[str]) -> None:
    """Unfetched bytes of a hub model's weight file read as zeros: refuse them."""
    if not is_partial(path.parent):
        return
    missing = ModelStore(path.parent).missing({path.name: names})
    if missing:
        raise ModelNotFound(
            f"{path} lacks the bytes of {len(names)} tensor(s) asked for (not fetched from the hub yet); "
            "load the model by its hub repo id so that they are fetched"
        )


def span_checkpoint_names(model_dir: Path, config: PretrainedConfig, start: int, end: int) -> list[str]:
    """The checkpoint tensors of blocks ``start..end-1`` (what a server fetches from the hub)."""
    return list(span_tensor_names(weight_files(model_dir), family_for(config), start, end))


def layer_pattern(family: Family) -> re.Pattern[str]:
    """Matches a checkpoint tensor of one decoder layer, with or without the base-model prefix
    (``model.layers.3.…``, ``transformer.h.3.…`` or ``h.3.…``); group 1 is the layer index."""
    body, _, layers = family.layers_path.partition(".")
    return re.compile(rf"^(?:{re.escape(body)}\.)?{re.escape(layers)}\.(\d+)\.(.+)$")


def span_tensor_names(files: dict[str, Path], family: Family, start: int, end: int) -> dict[str, str]:
    """The checkpoint names of the span's tensors, mapped to their canonical names in the model
    (``{layers_path}.{index}.…``, absolute indices)."""
    pattern = layer_pattern(family)
    wanted: dict[str, str] = {}
    for name in files:
        match = pattern.match(name)
        if match and start <= int(match.group(1)) < end:
            wanted[name] = f"{family.layers_path}.{match.group(1)}.{match.group(2)}"
    return wanted


def load_into(
    model: PreTrainedModel, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device
) -> set[str]:
    """Load checkpoint ``tensors`` into ``model`` (built on meta) through transformers' own weight
    conversions (fused experts, renamed modules), cast to ``dtype`` on ``device``; returns the
    names of the model's tensors that are still missing. Raises ``ModelNotFound`` on tensors the
    model does not have or whose shapes differ."""
    mapping = get_model_conversion_mapping(model)
    config = LoadStateDictConfig(weight_mapping=mapping, dtype=dtype, device_map={"": str(device)})
    with _quiet_transformers_progress():
        info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = [k for k in info.unexpected_keys if not any(p.search(k) for p in ignored)]
    problems = sorted(unexpected) + sorted(str(k) for k in info.mismatched_keys)
    problems += [str(e) for e in info.conversion_errors]
    if problems:
        raise ModelNotFound(
            f"checkpoint tensors do not match the model ({', '.join(problems[:3])}); "
            "re-convert or re-download it"
        )
    return set(info.missing_keys)


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """transformers draws a progress bar per load; a span loads in well under a second per block."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_span(
    model_dir: Path,
    config: PretrainedConfig,
    start: int,
    end: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quant_type: str = "none",
    tp_devices: tuple[torch.device, ...] = (),
) -> SpanModel:
    """Build the model on meta, materialise blocks ``start..end-1`` from the checkpoint, then shard
    them over ``tp_devices`` and/or quantise them (see ``place_span``)."""
    family = family_for(config)
    model = build_model_on_meta(config)
    files = weight_files(model_dir)
    names = span_tensor_names(files, family, start, end)
    raw = read_tensors(files, list(names))
    # Quantised or sharded blocks are loaded in float on CPU first: the device only ever holds
    # the final (quantised, sliced) weights.
    staging = torch.device("cpu") if quant_type != "none" or tp_devices else device
    missing = load_into(model, {names[k]: v for k, v in raw.items()}, dtype=dtype, device=staging)
    prefixes = tuple(f"{family.layers_path}.{i}." for i in range(start, end))
    missing_here = sorted(k.removeprefix(f"{family.layers_path}.") for k in missing if k.startswith(prefixes))
    if missing_here:
        raise ModelNotFound(
            f"checkpoint in {model_dir} does not match the model's blocks "
            f"(missing {missing_here[:3]}); re-convert or re-download it"
        )
    span = span_from_model(model, config, start, end)
    span.layers.to(dtype=dtype)
    return place_span(span, device=device, quant_type=quant_type, tp_devices=tp_devices)


def place_span(
    span: SpanModel,
    *,
    device: torch.device,
    quant_type: str = "none",
    tp_devices: tuple[torch.device, ...] = (),
) -> SpanModel:
    """Move a span's float blocks to where they run: sharded over ``tp_devices`` (each shard's
    projections on its device, the rest on the first) or on ``device``; then their linear layers
    quantised to ``quant_type`` with bitsandbytes (float32 ones on CPU run oneDNN kernels,
    ``runtime.cpu_kernels``). Returns the span, frozen in eval mode."""
    if tp_devices:
        shard_layers(span.layers, span.config, tp_devices)
        span.cache_config = tp_cache_config(span.config, len(tp_devices))
        for module in list(span.layers.modules()):
            if isinstance(module, (ShardedAttention, ShardedMLP)):
                for shard, shard_device in zip(module.shards, module.devices, strict=True):
                    quantize_module(shard, quant_type, shard_device)
        device = tp_devices[0]
    else:
        quantize_module(span.layers, quant_type, device)
        span.layers.to(device)
        if device.type == "cpu":
            use_onednn_linears(span.layers)  # float32 ones only; quantised layers stay bitsandbytes'
    if span.rotary_emb is not None:
        span.rotary_emb.to(device)
    return span.eval().requires_grad_(False)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
