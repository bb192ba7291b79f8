"""Load only a span's weights: open the safetensors shards that hold them, read just those tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from corolla.errors import ModelNotFound
from corolla.models.span import SpanModel, build_span_on_meta

logger = logging.getLogger(__name__)

LAYER_PREFIX = "model.layers."


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
    """Read ``names`` from their files, opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
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


def span_state_dict(files: dict[str, Path], start: int, end: int) -> dict[str, torch.Tensor]:
    """The span's tensors, keyed as in ``SpanModel`` (``layers.{i - start}.…``)."""
    wanted: dict[str, str] = {}
    for name in files:
        if not name.startswith(LAYER_PREFIX):
            continue
        index_str, _, rest = name[len(LAYER_PREFIX) :].partition(".")
        if index_str.isdigit() and start <= int(index_str) < end:
            wanted[name] = f"layers.{int(index_str) - start}.{rest}"
    tensors = read_tensors(files, list(wanted))
    return {wanted[name]: t for name, t in tensors.items()}


def load_span(
    model_dir: Path,
    config: PretrainedConfig,
    start: int,
    end: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> SpanModel:
    """Build blocks ``start..end-1`` on meta, then materialise them from the checkpoint."""
    span = build_span_on_meta(config, start, end)
    state = span_state_dict(weight_files(model_dir), start, end)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    missing, unexpected = span.layers.load_state_dict(
        {k.removeprefix("layers."): v for k, v in state.items()}, strict=False, assign=True
    )
    if missing or unexpected:
        raise ModelNotFound(
            f"checkpoint in {model_dir} does not match the model's blocks "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-convert or re-download it"
        )
    span.rotary_emb.to(device)
    return span.eval().requires_grad_(False)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
