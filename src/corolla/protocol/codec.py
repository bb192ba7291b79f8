"""Tensor (de)serialisation for the wire (hivemind's format, no compression)."""

from __future__ import annotations

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from corolla.errors import BadRequest


def pack(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(tensor.detach())


def unpack(message: runtime_pb2.Tensor) -> torch.Tensor:
    try:
        return deserialize_torch_tensor(message)
    except Exception as e:  # any garbage a peer sends
        raise BadRequest(f"cannot decode tensor: {type(e).__name__}: {e}") from None
