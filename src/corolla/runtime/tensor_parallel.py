"""Tensor parallelism for a span of transformers decoder blocks.

One server splits every decoder layer of its span across several devices: shard ``i`` of a
layer's attention keeps the query heads ``i*H/N .. (i+1)*H/N - 1`` and the matching key/value
heads (rows of the q/k/v projections) plus the matching input columns of ``o_proj``; shard ``i``
of the MLP keeps rows ``i*I/N .. (i+1)*I/N - 1`` of the gate/up projections and the matching
input columns of ``down_proj``. Every shard computes a partial output on its own device and the
partial outputs are summed on ``devices[0]``, which is exact up to float rounding because
attention heads are independent and the MLP's activation is elementwise. Norms and residuals
stay in the layer, on ``devices[0]``.

Each attention shard writes its keys and values into its own slot of the one ``DynamicCache``:
shard ``i`` of local layer ``j`` uses ``layer_idx = j + i * L`` (``L`` layers in the span), so
the cache must be built from :func:`tp_cache_config` instead of the span config. The causal
mask is still built from the span config with the span's ``layer_idx``: slots ``0..L-1`` of the
tensor-parallel cache are shard 0's and have exactly the span's layer types.

Usage (after the span's weights are loaded, cast to their dtype and renumbered from 0)::

    check_tensor_parallel(config, devices)
    shard_layers(layers, config, devices)
    cache = DynamicCache(config=tp_cache_config(span_config, len(devices)))

Independent of the rest of corolla except :class:`corolla.errors.ConfigError`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from corolla.errors import ConfigError

__all__ = [
    "TP_MODEL_TYPES",
    "ShardedAttention",
    "ShardedMLP",
    "check_tensor_parallel",
    "shard_layers",
    "tp_cache_config",
]

TP_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
"""``config.model_type`` values whose decoder layers :func:`shard_layers` can split exactly."""

_MEMORY_TOLERANCE = 0.10  # CUDA devices may differ by at most 10% of the largest total memory


def _kv_heads(config: Any) -> int:
    kv = getattr(config, "num_key_value_heads", None)
    return int(kv) if kv is not None else int(config.num_attention_heads)


def check_tensor_parallel(config: Any, devices: Sequence[torch.device]) -> None:
    """Raise :class:`ConfigError` if the span of ``config``'s model cannot be split over ``devices``."""
    devices = [torch.device(d) for d in devices]
    n = len(devices)
    names = ", ".join(str(d) for d in devices) or "none"
    if n < 2:
        raise ConfigError(
            f"tensor parallelism needs at least 2 devices, got {n} ({names}); "
            "list two or more devices, or run without tensor parallelism"
        )
    types = sorted({d.type for d in devices})
    if len(types) > 1:
        raise ConfigError(
            f"tensor parallelism needs devices of one type, got {'/'.join(types)} ({names}); "
            "use only cuda devices or only cpu devices"
        )
    if devices[0].type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"CUDA devices requested ({names}) but CUDA is not available; use cpu devices")
        count = torch.cuda.device_count()
        for d in devices:
            if d.index is not None and not 0 <= d.index < count:
                raise ConfigError(
                    f"device {d} does not exist: this machine has {count} CUDA device(s) "
                    f"(cuda:0..cuda:{count - 1}); pick existing devices"
                )
    model_type = getattr(config, "model_type", None)
    if model_type not in TP_MODEL_TYPES:
        raise ConfigError(
            f"tensor parallelism does not support model type {model_type!r}; supported: "
            f"{', '.join(TP_MODEL_TYPES)}; run this model without tensor parallelism"
        )
    if getattr(config, "is_heterogeneous", False):
        raise ConfigError(
            "tensor parallelism does not support configs with per-layer overrides (per_layer_config); "
            "run this model without tensor parallelism"
        )
    sizes = {
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": _kv_heads(config),
        "intermediate_size": int(config.intermediate_size),
    }
    for name, value in sizes.items():
        if value % n:
            raise ConfigError(
                f"{name}={value} is not divisible by the {n} tensor-parallel devices; "
                f"use a number of devices that divides {value}"
            )
    if devices[0].type == "cuda":
        totals = {}
        for d in devices:
            index = d.index if d.index is not None else torch.cuda.current_device()
            totals[f"cuda:{index}"] = torch.cuda.get_device_properties(index).total_memory
        largest, smallest = max(totals.values()), min(totals.values())
        if largest - smallest > _MEMORY_TOLERANCE * largest:
            listing = ", ".join(f"{k}={v / 2**30:.1f} GiB" for k, v in totals.items())
            raise ConfigError(
                f"tensor-parallel devices have uneven memory ({listing}); every device holds an equal "
                "share, so use devices whose total memory differs by at most 10%"
            )


def tp_cache_config(span_config: Any, n_shards: int) -> Any:
    """A deep copy of ``span_config`` describing ``n_shards`` cache slots per span layer.

    Use it for ``DynamicCache(config=...)`` of a sharded span: slot ``j + i*L`` holds shard
    ``i``'s keys and values of local layer ``j`` and has the same type (full or sliding) as
    layer ``j``. Keep building masks and rotary embeddings from ``span_config``."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    cfg = copy.deepcopy(span_config)
    n_layers = int(span_config.num_hidden_layers)
    cfg.num_hidden_layers = n_layers * n_shards
    layer_types = getattr(span_config, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) != n_layers:
            raise ValueError(
                f"span config has {len(layer_types)} layer_types for {n_layers} layers; slice it to the span"
            )
        cfg.layer_types = list(layer_types) * n_shards
    return cfg


def _to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples and lists) to ``device``; leave anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        moved = tuple(_to_device(v, device) for v in value)
        return type(value)(*moved) if hasattr(value, "_fields") else moved
    return value


class _Sharded(nn.Module):
    """Shards of one module, shard ``i`` on ``devices[i]``; their outputs are summed on ``devices[0]``."""

    def __init__(self, shards: Sequence[nn.Module], devices: Sequence[torch.device]) -> None:
        super().__init__()
        if len(shards) != len(devices):
            raise ValueError(f"{len(shards)} shards for {len(devices)} devices")
        self.shards = nn.ModuleList(shards)
        self.devices = [torch.device(d) for d in devices]

    def _sum(self, outputs: Iterator[torch.Tensor]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for out in outputs:
            out = out.to(self.devices[0])
            total = out if total is None else total + out
        assert total is not None
        return total


class ShardedAttention(_Sharded):
    """Attention heads split over devices; returns ``(sum of the shards' outputs, None)``."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        outputs = (
            shard(
                _to_device(hidden_states, device),
                *_to_device(args, device),
                **{k: _to_device(v, device) for k, v in kwargs.items()},
            )[0]
            for shard, device in zip(self.shards, self.devices, strict=True)
        )
        return self._sum(outputs), None


class ShardedMLP(_Sharded):
    """MLP columns split over devices; returns the sum of the shards' outputs on ``devices[0]``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._sum(
            shard(hidden_states.to(device)) for shard, device in zip(self.shards, self.devices, strict=True)
        )


def _linear(module: nn.Module, name: str) -> nn.Linear:
    linear = module._modules.get(name)
    if type(linear) is not nn.Linear:
        raise ConfigError(
            f"tensor parallelism needs a plain nn.Linear for {type(module).__name__}.{name}, got "
            f"{type(linear).__name__}; load the model unquantized or run without tensor parallelism"
        )
    return linear


def _sliced_linear(
    linear: nn.Linear,
    ranges: Sequence[tuple[int, int]],
    *,
    by_rows: bool,
    keep_bias: bool,
    device: torch.device,
) -> nn.Linear:
    """A new Linear on ``device`` holding only ``ranges`` of the output rows (``by_rows``) or input
    columns of ``linear``; the weights are fresh copies, so the original can be freed."""
    weight = linear.weight.detach()
    if weight.is_meta:
        raise ValueError("shard_layers needs loaded weights, got meta tensors; load the span's weights first")
    if by_rows:
        new_weight = torch.cat([weight[a:b].to(device) for a, b in ranges], dim=0)
    else:
        new_weight = torch.cat([weight[:, a:b].to(device) for a, b in ranges], dim=1).contiguous()
    new_bias = None
    if linear.bias is not None and keep_bias:
        bias = linear.bias.detach()
        new_bias = (
            torch.cat([bias[a:b].to(device) for a, b in ranges]) if by_rows else bias.to(device, copy=True)
        )
    out_features, in_features = new_weight.shape
    new = nn.Linear(
        in_features, out_features, bias=new_bias is not None, device="meta", dtype=new_weight.dtype
    )
    new.weight = nn.Parameter(new_weight, requires_grad=linear.weight.requires_grad)
    if new_bias is not None:
        new.bias = nn.Parameter(new_bias, requires_grad=linear.bias.requires_grad)  # type: ignore[union-attr]
    return new


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new instance of ``module``'s class sharing its plain attributes, with its own (copied)
    parameter, buffer, submodule and hook dicts."""
    clone = object.__new__(type(module))
    clone.__dict__.update(
        {k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in module.__dict__.items()}
    )
    return clone


def _finish_shard(shard: nn.Module, replaced: set[str], device: torch.device) -> None:
    """Deep-copy onto ``device`` every child/parameter/buffer of ``shard`` not in ``replaced``."""
    for name, child in list(shard._modules.items()):
        if name not in replaced and child is not None:
            shard._modules[name] = copy.deepcopy(child).to(device)
    for name, param in list(shard._parameters.items()):
        if param is not None:
            shard._parameters[name] = nn.Parameter(
                param.detach().to(device, copy=True), requires_grad=param.requires_grad
            )
    for name, buf in list(shard._buffers.items()):
        if buf is not None:
            shard._buffers[name] = buf.to(device, copy=True)


def _ranges(total_units: int, unit: int, n: int, i: int, offset: int = 0) -> tuple[int, int]:
    per = total_units // n
    return offset + i * per * unit, offset + (i + 1) * per * unit


def _shard_attention(
    attn: nn.Module, config: Any, devices: Sequence[torch.device], n_layers: int
) -> ShardedAttention:
    n = len(devices)
    heads, kv_heads = int(config.num_attention_heads), _kv_heads(config)
    head_dim = int(attn.head_dim)
    base_idx = int(attn.layer_idx)
    fused = "qkv_proj" in attn._modules
    o_proj = _linear(attn, "o_proj")
    if o_proj.in_features != heads * head_dim:
        raise ValueError(f"o_proj has {o_proj.in_features} inputs, expected {heads} heads x {head_dim}")
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    shards = []
    for i, device in enumerate(devices):
        shard = _shallow_module_copy(attn)
        q_range = _ranges(heads, head_dim, n, i)
        kv_range = _ranges(kv_heads, head_dim, n, i)
        if fused:
            qkv = _linear(attn, "qkv_proj")
            if qkv.out_features != q_size + 2 * kv_size:
                raise ValueError(f"qkv_proj has {qkv.out_features} outputs, expected {q_size + 2 * kv_size}")
            ranges = [
                q_range,
                _ranges(kv_heads, head_dim, n, i, q_size),
                _ranges(kv_heads, head_dim, n, i, q_size + kv_size),
            ]
            shard._modules["qkv_proj"] = _sliced_linear(
                qkv, ranges, by_rows=True, keep_bias=True, device=device
            )
            replaced = {"qkv_proj", "o_proj"}
        else:
            for name, rng, size in (
                ("q_proj", q_range, q_size),
                ("k_proj", kv_range, kv_size),
                ("v_proj", kv_range, kv_size),
            ):
                proj = _linear(attn, name)
                if proj.out_features != size:
                    raise ValueError(f"{name} has {proj.out_features} outputs, expected {size}")
                shard._modules[name] = _sliced_linear(
                    proj, [rng], by_rows=True, keep_bias=True, device=device
                )
            replaced = {"q_proj", "k_proj", "v_proj", "o_proj"}
        shard._modules["o_proj"] = _sliced_linear(
            o_proj, [q_range], by_rows=False, keep_bias=i == 0, device=device
        )
        _finish_shard(shard, replaced, device)
        # Per-shard head counts, for code that reads them from the module or its config (phi3's
        # forward slices its fused qkv output with config.num_attention_heads * head_dim).
        shard_config = copy.copy(attn.config)
        shard_config.num_attention_heads = heads // n
        shard_config.num_key_value_heads = kv_heads // n
        shard_config.head_dim = head_dim
        shard.config = shard_config
        for attr, value in (
            ("num_heads", heads // n),
            ("num_attention_heads", heads // n),
            ("num_key_value_heads", kv_heads // n),
        ):
            if attr in shard.__dict__:
                setattr(shard, attr, value)
        shard.layer_idx = base_idx + i * n_layers
        shards.append(shard)
    return ShardedAttention(shards, devices)


def _shard_mlp(mlp: nn.Module, config: Any, devices: Sequence[torch.device]) -> ShardedMLP:
    n = len(devices)
    inter = int(config.intermediate_size)
    down = _linear(mlp, "down_proj")
    if down.in_features != inter:
        raise ValueError(f"down_proj has {down.in_features} inputs, expected intermediate_size={inter}")
    fused = "gate_up_proj" in mlp._modules
    shards = []
    for i, device in enumerate(devices):
        shard = _shallow_module_copy(mlp)
        rng = _ranges(inter, 1, n, i)
        if fused:
            gate_up = _linear(mlp, "gate_up_proj")
            if gate_up.out_features != 2 * inter:
                raise ValueError(f"gate_up_proj has {gate_up.out_features} outputs, expected {2 * inter}")
            ranges = [rng, _ranges(inter, 1, n, i, inter)]
            shard._modules["gate_up_proj"] = _sliced_linear(
                gate_up, ranges, by_rows=True, keep_bias=True, device=device
            )
            replaced = {"gate_up_proj", "down_proj"}
        else:
            for name in ("gate_proj", "up_proj"):
                proj = _linear(mlp, name)
                if proj.out_features != inter:
                    raise ValueError(f"{name} has {proj.out_features} outputs, expected {inter}")
                shard._modules[name] = _sliced_linear(
                    proj, [rng], by_rows=True, keep_bias=True, device=device
                )
            replaced = {"gate_proj", "up_proj", "down_proj"}
        shard._modules["down_proj"] = _sliced_linear(
            down, [rng], by_rows=False, keep_bias=i == 0, device=device
        )
        _finish_shard(shard, replaced, device)
        if "intermediate_size" in shard.__dict__:
            shard.intermediate_size = inter // n
        shards.append(shard)
    return ShardedMLP(shards, devices)


def shard_layers(layers: nn.ModuleList, config: Any, devices: Sequence[torch.device]) -> None:
    """Split every decoder layer of ``layers`` over ``devices``, in place.

    ``layers`` must hold real (loaded) weights in their final dtype, with attention ``layer_idx``
    renumbered to the local index ``0..len(layers)-1``. Each ``layer.self_attn`` becomes a
    :class:`ShardedAttention` and each ``layer.mlp`` a :class:`ShardedMLP`; the rest of the layer
    (norms) moves to ``devices[0]``. Afterwards never call ``layers.to(device)`` (it would gather all
    shards on one device); ``layers.to(dtype)`` is fine. Use a cache built from
    :func:`tp_cache_config`."""
    devices = [torch.device(d) for d in devices]
    check_tensor_parallel(config, devices)
    n_layers = len(layers)
    for layer in layers:  # validate everything before changing anything
        idx = getattr(layer.self_attn, "layer_idx", None)
        if isinstance(layer.self_attn, ShardedAttention):
            raise ValueError("these layers are already sharded")
        if not isinstance(idx, int) or not 0 <= idx < n_layers:
            raise ValueError(
                f"attention layer_idx={idx!r} is not a local index in 0..{n_layers - 1}; "
                "renumber the span's layers from 0 before calling shard_layers"
            )
    for layer in layers:
        attn = layer.self_attn
        layer.self_attn = _shard_attention(attn, config, devices, n_layers)
        del attn
        mlp = layer.mlp
        layer.mlp = _shard_mlp(mlp, config, devices)
        del mlp
        for name, child in layer.named_children():
            if name not in ("self_attn", "mlp"):
                child.to(devices[0])
        for name, param in list(layer._parameters.items()):
            if param is not None:
                layer._parameters[name] = nn.Parameter(
                    param.detach().to(devices[0]), requires_grad=param.requires_grad
                )
        for name, buf in list(layer._buffers.items()):
            if buf is not None:
                layer._buffers[name] = buf.to(devices[0])
