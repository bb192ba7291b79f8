from __future__ import annotations

import pytest
import torch

from corolla.errors import ConfigError, DeviceUnavailable
from corolla.runtime.device import resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_cpu_without_accelerators(no_accelerator: None) -> None:
    assert resolve_device("auto") == CPU


def test_auto_prefers_cuda_then_mps(no_accelerator: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cpu_always_works(no_accelerator: None) -> None:
    assert resolve_device("cpu") == CPU


def test_cuda_on_a_cpu_build_says_so(no_accelerator: None) -> None:
    with pytest.raises(DeviceUnavailable, match=r"torch \S+ was built without CUDA"):
        resolve_device("cuda")


def test_cuda_build_without_a_working_device(no_accelerator: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(DeviceUnavailable, match="0 CUDA devices visible"):
        resolve_device("cuda:0")


def test_cuda_index_in_and_out_of_range(two_gpus: None) -> None:
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailable, match=r"only 2 CUDA devices visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_mps_unavailable(no_accelerator: None) -> None:
    with pytest.raises(DeviceUnavailable, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cuda:", "auto:0", ""])
def test_unknown_device(bad: str) -> None:
    with pytest.raises(ConfigError, match="is unknown"):
        resolve_device(bad)


@pytest.mark.parametrize(
    ("requested", "device", "checkpoint", "expected", "warns"),
    [
        ("auto", CPU, None, torch.float32, False),
        ("auto", CPU, torch.bfloat16, torch.bfloat16, False),
        ("auto", CPU, torch.float16, torch.float32, True),
        ("auto", torch.device("cuda"), torch.float16, torch.float16, False),
        ("float32", CPU, torch.float16, torch.float32, False),
        ("bfloat16", CPU, None, torch.bfloat16, False),
        ("float16", torch.device("cuda", 0), torch.float32, torch.float16, False),
    ],
)
def test_resolve_dtype(
    requested: str, device: torch.device, checkpoint: torch.dtype | None, expected: torch.dtype, warns: bool
) -> None:
    dtype, warning = resolve_dtype(requested, device, checkpoint)
    assert dtype == expected
    assert (warning is not None) == warns


def test_float16_requested_on_cpu_is_refused() -> None:
    with pytest.raises(DeviceUnavailable, match="float16 is not supported on CPU; use --torch_dtype float32"):
        resolve_dtype("float16", CPU, None)


def test_unknown_dtype() -> None:
    with pytest.raises(ConfigError, match="float64"):
        resolve_dtype("float64", CPU, None)
