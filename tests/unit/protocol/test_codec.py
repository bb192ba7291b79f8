from __future__ import annotations

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from corolla.errors import BadRequest
from corolla.protocol.codec import all_finite, pack, unpack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(2, 3, 8, generator=generator).to(dtype)
    restored = unpack(pack(tensor))
    assert restored.dtype == dtype
    assert restored.shape == (2, 3, 8)
    assert torch.equal(restored, tensor)


def test_round_trip_of_a_non_contiguous_tensor() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not tensor.is_contiguous()
    assert torch.equal(unpack(pack(tensor)), tensor)


def test_round_trip_of_an_empty_tensor() -> None:
    restored = unpack(pack(torch.empty(1, 0, 16)))
    assert restored.shape == (1, 0, 16)


def test_pack_detaches_a_tensor_that_requires_grad() -> None:
    tensor = torch.ones(3, requires_grad=True)
    restored = unpack(pack(tensor))
    assert torch.equal(restored, torch.ones(3))


def test_pack_gives_a_protobuf_tensor_that_survives_bytes() -> None:
    tensor = torch.linspace(-1, 1, 10, dtype=torch.bfloat16)
    wire = pack(tensor).SerializeToString()
    assert torch.equal(unpack(runtime_pb2.Tensor.FromString(wire)), tensor)


@pytest.mark.parametrize(
    "message",
    [
        runtime_pb2.Tensor(buffer=b"garbage", size=[2, 3], dtype="float32"),
        runtime_pb2.Tensor(buffer=b"\x00" * 24, size=[5, 5], dtype="float32"),
        runtime_pb2.Tensor(buffer=b"\x00" * 24, size=[6], dtype="complex-ish"),
        runtime_pb2.Tensor(buffer=b"\x00" * 5, size=[3], dtype="bfloat16"),
        runtime_pb2.Tensor(buffer=b"\x00" * 24, size=[6], dtype="float32", compression=99),
        runtime_pb2.Tensor(),
    ],
    ids=["odd-buffer", "shape-mismatch", "unknown-dtype", "odd-bfloat16", "unknown-compression", "empty"],
)
def test_garbage_raises_bad_request(message: runtime_pb2.Tensor) -> None:
    with pytest.raises(BadRequest, match=r"^cannot decode tensor: \w+: ") as info:
        unpack(message)
    assert "\n" not in str(info.value)


def test_non_protobuf_input_raises_bad_request() -> None:
    with pytest.raises(BadRequest, match="cannot decode tensor"):
        unpack(b"not a protobuf")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (runtime_pb2.Tensor(buffer=b"", size=[2**32 - 1] * 3, dtype="float32"), "shape: .* more than"),
        (runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2**31, 2], dtype="float32"), "shape: .* more than"),
        (
            runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1] * 9 + [2], dtype="float32"),
            "shape: .* not a valid",
        ),
        (runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2], dtype="object"), "dtype: 'object' is not one of"),
        (runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2], dtype=">f4"), "dtype: '>f4'"),
        (
            runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[3], dtype="float32"),
            r"buffer: .* needs 12 bytes, got 8",
        ),
        (
            runtime_pb2.Tensor(
                buffer=b"\x00" * 64, size=[8], dtype="float32", compression=runtime_pb2.BLOCKWISE_8BIT
            ),
            "compression: only uncompressed",
        ),
        (
            runtime_pb2.Tensor(
                buffer=b"\x00" * 64, size=[8], dtype="float32", compression=runtime_pb2.FLOAT16
            ),
            "compression: only uncompressed",
        ),
    ],
    ids=[
        "huge",
        "huge-2d",
        "too-many-dims",
        "object-dtype",
        "big-endian",
        "short-buffer",
        "blockwise",
        "float16",
    ],
)
def test_declared_shape_dtype_and_compression_are_checked_before_decoding(
    message: runtime_pb2.Tensor, why: str
) -> None:
    with pytest.raises(BadRequest, match=rf"^cannot decode tensor: {why}") as info:
        unpack(message)
    assert "\n" not in str(info.value)


def test_a_tensor_sent_with_requires_grad_arrives_without_it() -> None:
    message = pack(torch.ones(2, 3))
    message.requires_grad = True
    restored = unpack(message)
    assert not restored.requires_grad and torch.equal(restored, torch.ones(2, 3))
    assert message.requires_grad  # the peer's message is left as it was


def test_legacy_bfloat16_sent_as_float32_still_decodes() -> None:
    tensor = torch.linspace(-1, 1, 6, dtype=torch.bfloat16).reshape(2, 3)
    legacy = runtime_pb2.Tensor(buffer=tensor.float().numpy().tobytes(), size=[2, 3], dtype="bfloat16")
    assert torch.equal(unpack(legacy), tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_nan_and_infinity_in_every_wire_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(4, 5, dtype=dtype) * 100
    extremes = torch.tensor(
        [torch.finfo(dtype).max, torch.finfo(dtype).min, torch.finfo(dtype).tiny], dtype=dtype
    )
    assert all_finite(x) and all_finite(extremes) and all_finite(x.t())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not all_finite(y) and not all_finite(y.t())


def test_bfloat16_travels_in_two_bytes_per_element_and_round_trips() -> None:
    tensor = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    message = pack(tensor)
    assert len(message.buffer) == 2 * tensor.numel() and message.dtype == "bfloat16"
    assert torch.equal(unpack(message), tensor)
    assert torch.equal(deserialize_torch_tensor(message), tensor)  # as any hivemind peer reads it
