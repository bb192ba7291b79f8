"""oneDNN linear layers: the same results as nn.Linear up to rounding, the same parameters,
autograd unchanged, and only plain float32 CPU layers converted."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corolla.runtime.cpu_kernels import OneDnnLinear, onednn_linear_works, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_linear_works(), reason="this torch build lacks the oneDNN kernel")


class _Wrapped(nn.Linear):  # stands in for bitsandbytes' and peft's subclasses of nn.Linear
    pass


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.Sequential(nn.ReLU(), nn.Linear(32, 8, bias=False)),
        _Wrapped(8, 8),
        nn.Linear(8, 8).to(torch.bfloat16),
    )


@pytest.mark.parametrize("shape", [(1, 1, 16), (8, 1, 16), (1, 300, 16), (3, 7, 16)])
def test_converted_layers_compute_what_nn_linear_computes(shape: tuple[int, ...]) -> None:
    plain, fast = model(), model()
    assert use_onednn_linears(fast) == 2
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(fast[1](fast[0](x)), plain[1](plain[0](x)), rtol=1e-5, atol=1e-6)


def test_only_plain_float32_layers_are_converted_and_parameters_are_shared() -> None:
    m = model()
    weights = [m[0].weight, m[1][1].weight]
    use_onednn_linears(m)
    assert type(m[0]) is OneDnnLinear and type(m[1][1]) is OneDnnLinear
    assert type(m[2]) is _Wrapped and type(m[3]) is nn.Linear  # subclass and bfloat16: as they were
    assert m[0].weight is weights[0] and m[1][1].weight is weights[1]  # no copy
    assert list(m.state_dict()) == list(model().state_dict())


def test_autograd_goes_through_f_linear() -> None:
    m = model()
    use_onednn_linears(m)
    x = torch.randn(2, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning
        m[0](x).sum().backward()
    assert x.grad is not None
    expected = torch.autograd.grad(F.linear(x, m[0].weight, m[0].bias).sum(), x)[0]
    assert torch.equal(x.grad, expected)


def test_a_converted_layer_cast_later_falls_back_to_nn_linear() -> None:
    m = model()
    use_onednn_linears(m)
    m[0].to(torch.bfloat16)  # e.g. a client model cast (or moved to a GPU) after loading
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(m[0](x), F.linear(x, m[0].weight, m[0].bias))
