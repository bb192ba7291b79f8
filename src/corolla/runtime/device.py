"""Turn ``--device`` / ``--torch_dtype`` requests into what this machine can actually run."""

from __future__ import annotations

import re

import torch

from corolla.errors import ConfigError, DeviceUnavailable

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> cuda > mps > cpu; an explicit device must exist here or ``DeviceUnavailable``."""
    if requested == "auto":
        return _auto_device()
    match = _DEVICE_RE.match(requested.strip().lower())
    if match is None:
        raise ConfigError(f"--device {requested!r} is unknown; use auto, cpu, mps, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        _check_cuda(requested, None if index is None else int(index))
    elif kind == "mps":
        _check_mps(requested)
    return torch.device(requested.strip().lower())


def resolve_dtype(
    requested: str, device: torch.device, checkpoint_dtype: torch.dtype | None
) -> tuple[torch.dtype, str | None]:
    """The dtype to run in, and a warning when ``auto`` had to change the checkpoint's dtype."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ConfigError(f"--torch_dtype {requested!r} is unknown; use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[requested]
        if dtype == torch.float16 and device.type == "cpu":
            raise DeviceUnavailable("float16 is not supported on CPU; use --torch_dtype float32 or bfloat16")
        return dtype, None
    dtype = checkpoint_dtype or torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        return (
            torch.float32,
            "the checkpoint is float16, which CPUs run slowly or not at all; using float32 on CPU",
        )
    return dtype, None


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_cuda(requested: str, index: int | None) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise DeviceUnavailable(f"--device {requested}: torch {torch.__version__} was built without CUDA")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"--device {requested}: torch {torch.__version__} sees no working CUDA device "
            f"({torch.cuda.device_count()} CUDA devices visible; check the driver and CUDA_VISIBLE_DEVICES)"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceUnavailable(
            f"--device {requested}: only {count} CUDA device{'s' if count != 1 else ''} visible "
            f"(cuda:0..cuda:{count - 1})"
        )


def _check_mps(requested: str) -> None:
    if torch.backends.mps.is_available():
        return
    built = "is" if torch.backends.mps.is_built() else "is not"
    raise DeviceUnavailable(
        f"--device {requested}: MPS is not available (torch {torch.__version__} {built} built with MPS)"
    )
