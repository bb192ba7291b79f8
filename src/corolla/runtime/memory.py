"""How many blocks fit on a device: parameter bytes, available memory, and the planning maths.

The plan is ``floor((memory - reserve) / (block bytes + the block's attention-cache share))``,
capped at the model's number of blocks. ``plan_num_blocks`` is pure; the other functions
gather its inputs from the model config and the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import PretrainedConfig

from corolla.errors import AllocationFailed
from corolla.models.span import build_span_on_meta, span_config
from corolla.runtime.kv_cache import cache_bytes_per_token_block
from corolla.runtime.quantize import linear_weight_bytes

GiB = 1 << 30
MiB = 1 << 20
# Overhead of the process itself outside the blocks: on CPU/MPS the interpreter, torch, transformers
# and hivemind's p2pd daemon (a tiny-model server and its daemon hold ~0.5 GiB resident; doubled for
# growth); on CUDA the CUDA context and cuBLAS workspaces that live in the card's memory.
PROCESS_OVERHEAD = {"cpu": 1 * GiB, "mps": 1 * GiB, "cuda": 512 * MiB}
# Slack for allocator fragmentation and memory that the estimate does not see (other processes on
# a shared card, page cache that cannot be dropped).
MEMORY_SLACK_FRACTION = 0.05
_NO_CGROUP_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number (2**63 rounded to a page)


@dataclass(frozen=True)
class BlockCountPlan:
    """How many blocks to host, and the numbers behind the choice."""

    num_blocks: int
    memory_bytes: int
    reserve_bytes: int
    block_bytes: int
    cache_bytes_per_block: int
    model_blocks: int
    reason: str


def block_bytes(model_config: PretrainedConfig, dtype: torch.dtype, quant_type: str = "none") -> int:
    """Parameter bytes of one block in ``dtype``, its linear layers' weights quantised to
    ``quant_type`` (counted on the meta device; no memory used). Assumes all blocks have the same
    parameters, as every supported family does."""
    one_block = build_span_on_meta(span_config(model_config, 0, 1), 0, 1)
    element_size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for module in one_block.layers.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear) and name == "weight":
                out_features, in_features = module.out_features, module.in_features
                total += linear_weight_bytes(out_features, in_features, quant_type, element_size)
            else:
                total += param.numel() * element_size
    return total


def available_memory(device: torch.device) -> int:
    """Bytes the blocks may use: a CUDA card's total memory; on CPU and MPS the memory available
    to this process (free RAM, capped by the cgroup's limit minus its usage when one applies)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    available = psutil.virtual_memory().available
    cgroup = cgroup_available()
    return available if cgroup is None else min(available, cgroup)


def cgroup_available(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The tightest ``limit - usage`` over this process's memory cgroup and its parents (v2
    ``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``);
    None when no limit applies or cgroups cannot be read."""
    headroom = [
        limit - usage
        for directory, limit_name, usage_name in _cgroup_dirs(root, proc_cgroup)
        if (limit := _read_int(directory / limit_name)) is not None
        and (usage := _read_int(directory / usage_name)) is not None
    ]
    return max(0, min(headroom)) if headroom else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[Path, str, str]]:
    """Memory cgroup directories from this process's own group up to the mount's root."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[Path, str, str]] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        controllers, path = fields[1], fields[2]
        if controllers == "":  # v2 unified hierarchy: "0::/path"
            out += [(d, "memory.max", "memory.current") for d in _ancestors(root, path)]
        elif "memory" in controllers.split(","):  # v1: "4:memory:/path"
            v1 = _ancestors(root / "memory", path)
            out += [(d, "memory.limit_in_bytes", "memory.usage_in_bytes") for d in v1]
    return out


def _ancestors(mount: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_int(path: Path) -> int | None:
    """An integer cgroup value; None for "max", a "no limit" sentinel, or a file that is not there."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _NO_CGROUP_LIMIT:
        return None
    return int(text)


def default_reserve(
    memory_bytes: int,
    device: torch.device,
    model_config: PretrainedConfig,
    dtype: torch.dtype,
    max_batch_size: int,
) -> int:
    """Memory kept out of the block budget, the sum of three parts:

    - activations: ``max_batch_size`` tokens through one block in float32 (at most one request
      runs at a time, and blocks run one after another, so one block's activations are live):
      per token, four hidden-size vectors (input, residual, attention output, norm) and three
      intermediate-size vectors (gate, up, their product). ``dtype`` is accepted for callers
      but the estimate stays in float32 on purpose: it also covers upcasts inside the block.
      Attention scores are not counted: SDPA's fused kernels do not materialise them.
    - the process itself (``PROCESS_OVERHEAD``): 1 GiB on CPU/MPS, 512 MiB of a CUDA card;
    - ``MEMORY_SLACK_FRACTION`` (5 %) of ``memory_bytes`` for fragmentation.
    """
    del dtype  # see the docstring
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    activations = max_batch_size * (4 * hidden + 3 * intermediate) * 4
    overhead = PROCESS_OVERHEAD.get(device.type, PROCESS_OVERHEAD["cpu"])
    return activations + overhead + int(MEMORY_SLACK_FRACTION * memory_bytes)


def plan_num_blocks(
    memory_bytes: int,
    block_bytes: int,
    cache_bytes_per_block: int,
    model_blocks: int,
    *,
    reserve_bytes: int,
) -> BlockCountPlan:
    """``floor((memory - reserve) / (block + cache share))`` blocks, at most ``model_blocks``;
    ``AllocationFailed`` when not even one block fits."""
    usable = memory_bytes - reserve_bytes
    per_block = block_bytes + cache_bytes_per_block
    fit = max(0, usable) // per_block if per_block > 0 else model_blocks
    if fit < 1:
        raise AllocationFailed(
            f"not even one block fits: {_size(memory_bytes)} of memory minus a {_size(reserve_bytes)} "
            f"reserve leaves {_size(max(0, usable))}, and one block needs {_size(per_block)} "
            f"({_size(block_bytes)} weights + {_size(cache_bytes_per_block)} attention cache); "
            "lower --attn_cache_tokens, use a smaller --torch_dtype or another --device"
        )
    num_blocks = min(fit, model_blocks)
    capped = f", capped at the model's {model_blocks} blocks" if fit > model_blocks else ""
    reason = (
        f"{num_blocks} of {model_blocks} blocks fit: {_size(memory_bytes)} of memory minus a "
        f"{_size(reserve_bytes)} reserve leaves {_size(usable)} for blocks of {_size(per_block)} each "
        f"({_size(block_bytes)} weights + {_size(cache_bytes_per_block)} attention cache){capped}"
    )
    return BlockCountPlan(
        num_blocks=num_blocks,
        memory_bytes=memory_bytes,
        reserve_bytes=reserve_bytes,
        block_bytes=block_bytes,
        cache_bytes_per_block=cache_bytes_per_block,
        model_blocks=model_blocks,
        reason=reason,
    )


def num_blocks_for(
    model_config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    attn_cache_tokens: int,
    max_batch_size: int,
    *,
    quant_type: str = "none",
    tp_devices: tuple[torch.device, ...] = (),
) -> BlockCountPlan:
    """The block count for this model, dtype, quantisation and device (with tensor parallelism:
    the memory of every distinct device together), with the default reserve."""
    devices = list(dict.fromkeys(tp_devices)) or [device]
    memory = sum(available_memory(d) for d in devices)
    return plan_num_blocks(
        memory,
        block_bytes(model_config, dtype, quant_type),
        attn_cache_tokens * cache_bytes_per_token_block(model_config, dtype),
        model_config.num_hidden_layers,
        reserve_bytes=default_reserve(memory, device, model_config, dtype, max_batch_size),
    )


def _size(num_bytes: int) -> str:
    """``1.50 GiB`` from one GiB up, else ``12.3 MiB``."""
    if abs(num_bytes) >= GiB:
        return f"{num_bytes / GiB:.2f} GiB"
    return f"{num_bytes / MiB:.1f} MiB"


__all__ = [
    "BlockCountPlan",
    "available_memory",
    "block_bytes",
    "cgroup_available",
    "default_reserve",
    "num_blocks_for",
    "plan_num_blocks",
]
