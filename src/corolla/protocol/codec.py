"""Tensor (de)serialisation for the wire (hivemind's format, no compression)."""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from corolla.errors import BadRequest


def pack(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """``tensor`` for the wire. bfloat16 goes as its 2 bytes per element: hivemind's default
    (``USE_LEGACY_BFLOAT16``) widens it to float32, doubling the bytes; every hivemind reads both."""
    tensor = tensor.detach()
    if tensor.dtype != torch.bfloat16:
        return serialize_torch_tensor(tensor)
    bits = tensor.cpu().contiguous().view(torch.int16).numpy()
    none = runtime_pb2.CompressionType.NONE
    return runtime_pb2.Tensor(compression=none, buffer=bits.tobytes(), size=tensor.shape, dtype="bfloat16")


# dtypes a peer may send, with their bytes per element (hivemind's legacy bfloat16 travels as float32)
ELEMENT_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip
MAX_DIMS = 8
MAX_ELEMENTS = 2**31  # far above any limit a server enforces; the buffer must match the shape anyway


def unpack(message: runtime_pb2.Tensor) -> torch.Tensor:
    """The tensor a peer sent; anything but a well-formed uncompressed tensor raises ``BadRequest``
    before a byte is copied (unknown dtype, compression, negative or huge shape, wrong buffer size)."""
    try:
        _check_declared(message)
        if message.requires_grad:  # a peer's tensor never carries autograd state here
            clean = runtime_pb2.Tensor()
            clean.CopyFrom(message)
            clean.requires_grad = False
            message = clean
        return deserialize_torch_tensor(message)
    except BadRequest:
        raise
    except Exception as e:  # any other garbage a peer sends
        raise BadRequest(f"cannot decode tensor: {type(e).__name__}: {e}") from None


def _check_declared(message: runtime_pb2.Tensor) -> None:
    if message.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequest(
            "cannot decode tensor: compression: only uncompressed tensors are accepted, "
            f"got {message.compression}"
        )
    if message.dtype not in ELEMENT_BYTES:
        raise BadRequest(
            f"cannot decode tensor: dtype: {message.dtype[:32]!r} is not one of {', '.join(ELEMENT_BYTES)}"
        )
    shape = list(message.size)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise BadRequest(f"cannot decode tensor: shape: {shape[: MAX_DIMS + 1]} is not a valid shape")
    elements = 1
    for d in shape:
        elements = min(elements * d, MAX_ELEMENTS + 1)
    if elements > MAX_ELEMENTS:
        raise BadRequest(f"cannot decode tensor: shape: {shape} has more than {MAX_ELEMENTS} elements")
    sizes = {elements * ELEMENT_BYTES[message.dtype]}
    if message.dtype == "bfloat16":
        sizes.add(elements * 4)  # hivemind's legacy bfloat16 (sent as float32)
    if len(message.buffer) not in sizes:
        raise BadRequest(
            f"cannot decode tensor: buffer: shape {shape} of {message.dtype} needs "
            f"{min(sizes)} bytes, got {len(message.buffer)}"
        )


# the exponent bits of 16-bit floats: all ones means infinity or NaN
_EXPONENT_16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in a CPU float tensor, checked with numpy: the event loop's thread must
    not start a PyTorch OpenMP team of its own (see ``runtime.compute_thread``)."""
    if tensor.dtype in _EXPONENT_16:
        exponent = _EXPONENT_16[tensor.dtype]
        bits = tensor.detach().contiguous().view(torch.int16).numpy()
        return not bool(np.any((bits & exponent) == exponent))
    if tensor.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())
