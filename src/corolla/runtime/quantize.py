"""Weight-only quantisation of a server's blocks with bitsandbytes: LLM.int8 (``int8``) and NF4 (``nf4``).

A server loads its span of decoder blocks in a float dtype, then :func:`quantize_module` swaps every
``torch.nn.Linear`` inside it for a bitsandbytes layer holding the same weights, quantised on the target
device (CPU or CUDA). Embeddings, norms and biases stay in their float dtype. :func:`quantized_bytes` is
what the server then reports as its weight bytes.

Constraints and behaviour seen with bitsandbytes 0.50.2 (torch 2.13 CPU build):

- Quantisation happens when the bitsandbytes parameter is moved to a device (``.to(device)``, also on
  CPU): ``Int8Params`` quantises only if its data still lies on the CPU and is not int8 yet, so weights
  are taken to the CPU first; ``Params4bit`` quantises on the first move. After conversion an int8 layer's
  weight is ``int8`` ``[out, in]`` with a per-row ``SCB`` scale vector; an nf4 layer's weight is packed
  ``uint8`` (two values per byte, ``[out * in / 2, 1]``) with one absmax per block of 64 values
  (itself 8-bit quantised, ``compress_statistics=True``).
- int8 computes with float16 activations (inputs are cast to float16 inside bitsandbytes, float32 and
  bfloat16 come back in their own dtype); weights must fit float16's range. bitsandbytes logs a warning
  about that cast on every forward of a non-float16 input; this module drops that one message.
- nf4 on CPUs with AVX512-BF16 (in eval mode, without grad) repacks the weight on the first forward into a
  ``[out, in / 2]`` layout and runs a bfloat16 kernel. That layout needs ``in_features % 64 == 0``
  (the NF4 block size) and ``out_features % 32 == 0``; layers that do not fit are left on bitsandbytes'
  generic dequantise-then-matmul path, which takes any shape. The repack also turns the nested absmax
  into plain bfloat16 (a few % more bytes than before the first forward).
- Without the optional ``kernels`` package bitsandbytes logs "Failed to load CPU gemm_4bit_forward from
  kernels-community" when imported; it then uses its own CPU kernels, so this module drops that message.

bitsandbytes is imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from corolla.errors import ConfigError

QUANT_TYPES: tuple[str, ...] = ("none", "int8", "nf4")
SUPPORTED_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda")
NF4_BLOCKSIZE = 64
_CPU_NF4_BLOCK_N = 32  # bitsandbytes' AVX512-BF16 repack groups output rows by 32

# (logger name, message prefix) of bitsandbytes log lines that are noise for a server.
_NOISY_LOGS: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from"),
)
_filters_installed = False


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _import_bnb() -> ModuleType:
    """Import bitsandbytes with its known noise filtered out (ImportError if it is not installed)."""
    global _filters_installed
    if not _filters_installed:
        for logger_name, prefix in _NOISY_LOGS:
            logging.getLogger(logger_name).addFilter(_DropMessages(prefix))
        _filters_installed = True
    with warnings.catch_warnings():
        # torch.utils.mkldnn, pulled in by bitsandbytes' import chain, uses a deprecated torch.jit API.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
        )
        import bitsandbytes

    return bitsandbytes


def default_quant_type(device: torch.device) -> str:
    """``nf4`` on CUDA, ``none`` elsewhere (Petals' default)."""
    return "nf4" if device.type == "cuda" else "none"


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"--quant_type {quant_type!r} is unknown; use one of {', '.join(QUANT_TYPES)}")


def check_quant_supported(quant_type: str, device: torch.device) -> None:
    """Raise ``ConfigError`` unless ``quant_type`` can run on ``device`` here (``none`` always can)."""
    _check_quant_type(quant_type)
    if quant_type == "none":
        return
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise ConfigError(
            f"--quant_type {quant_type} has no bitsandbytes kernels for device {device.type!r}; "
            f"use --device {' or '.join(SUPPORTED_DEVICE_TYPES)}, or --quant_type none"
        )
    try:
        _import_bnb()
    except ImportError as exc:
        raise ConfigError(
            f"--quant_type {quant_type} needs bitsandbytes, which cannot be imported ({exc}); "
            "install it (pip install bitsandbytes==0.50.2) or use --quant_type none"
        ) from exc


def quantize_module(
    module: torch.nn.Module,
    quant_type: str,
    device: torch.device,
    *,
    skip: Callable[[str], bool] | None = None,
) -> int:
    """Replace, in place, every ``nn.Linear`` inside ``module`` (not ``module`` itself) by a bitsandbytes
    layer with the same weights quantised on ``device``; return how many layers were replaced.

    ``skip(name)`` gets each layer's qualified name relative to ``module`` (e.g. ``"0.mlp.down_proj"``)
    and keeps the layer in float when it returns True. ``none`` does nothing and returns 0.
    """
    _check_quant_type(quant_type)
    if quant_type == "none":
        return 0
    check_quant_supported(quant_type, device)
    bnb = _import_bnb()
    already = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)

    targets: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
    for parent_name, parent in module.named_modules():
        for child_name, child in parent.named_children():
            if not isinstance(child, torch.nn.Linear) or isinstance(child, already):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if skip is not None and skip(name):
                continue
            targets.append((parent, child_name, child))

    replaced: dict[int, torch.nn.Module] = {}  # a Linear shared by several parents is quantised once
    for parent, child_name, linear in targets:
        if id(linear) not in replaced:
            replaced[id(linear)] = _quantize_linear(bnb, linear, quant_type, device)
        setattr(parent, child_name, replaced[id(linear)])
    return len(replaced)


def _quantize_linear(
    bnb: ModuleType, linear: torch.nn.Linear, quant_type: str, device: torch.device
) -> torch.nn.Module:
    weight = linear.weight.detach()
    if weight.device.type != "cpu":
        weight = weight.cpu()  # Int8Params only quantises when it moves off the CPU (or stays on it)
    has_bias = linear.bias is not None
    in_features, out_features = linear.in_features, linear.out_features
    layer: torch.nn.Module
    if quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer.weight = param.to(device)
    else:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=weight.dtype,
            quant_type="nf4",
            device="meta",
        )
        param = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=NF4_BLOCKSIZE, quant_type="nf4", module=layer
        )
        layer.weight = param.to(device)
        if in_features % NF4_BLOCKSIZE or out_features % _CPU_NF4_BLOCK_N:
            layer.support_avx512bf16_for_cpu = False  # the CPU repack cannot hold this shape
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    layer.train(linear.training)
    return layer


def linear_weight_bytes(out_features: int, in_features: int, quant_type: str, element_size: int) -> int:
    """Bytes a linear layer's weight takes once quantised (the planning estimate, without bias):
    int8 keeps one byte per weight plus a float32 scale per output row; nf4 half a byte per weight
    plus one byte of (double-quantised) scale per block of 64."""
    numel = out_features * in_features
    if quant_type == "int8":
        return numel + 4 * out_features
    if quant_type == "nf4":
        return numel // 2 + numel // NF4_BLOCKSIZE
    return numel * element_size


def quantized_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored, quantised storage included.

    A bitsandbytes int8 weight counts its int8 data plus its ``SCB`` scales; an nf4 weight counts its
    packed data plus the quant state's absmax, code and offset tensors (nested ones too). Tensors shared
    between modules are counted once."""
    seen: set[tuple[str, int] | int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor):
            return
        ptr = tensor.data_ptr()
        key: tuple[str, int] | int = (str(tensor.device), ptr) if ptr else id(tensor)
        if key in seen:
            return
        seen.add(key)
        total += tensor.numel() * tensor.element_size()

    for sub in module.modules():
        for tensor in sub.parameters(recurse=False):
            add(tensor)
            add(getattr(tensor, "SCB", None))
            _add_quant_state(getattr(tensor, "quant_state", None), add)
        for tensor in sub.buffers(recurse=False):
            add(tensor)
        state = getattr(sub, "state", None)  # Linear8bitLt moves CB/SCB here on its first forward
        if state is not None:
            add(getattr(state, "CB", None))
            add(getattr(state, "SCB", None))
    return total


def _add_quant_state(state: object, add: Callable[[torch.Tensor | None], None]) -> None:
    if state is None:
        return
    for attr in ("absmax", "code", "offset"):
        add(getattr(state, attr, None))
    nested = getattr(state, "state2", None)
    if nested is not None:
        _add_quant_state(nested, add)
