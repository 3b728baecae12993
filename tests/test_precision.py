"""Low-precision models: contractions over the parameters accumulate in float32 (or wider)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ntcov


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)).double().eval()


def _first_logit(model: nn.Module, x: torch.Tensor) -> ntcov.Property:
    return ntcov.Property.from_per_example(model, lambda m, xs: m(xs)[:, 0], x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["vjp", "per_example"])
def test_row_strategies_accumulate_in_float32(dtype: torch.dtype, strategy: str) -> None:
    reference_model = _model()
    low = copy.deepcopy(reference_model).to(dtype)
    # the float64 reference uses exactly the rounded weights and inputs of the low-precision run
    reference_model.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = ntcov.ntcov(*[_first_logit(reference_model, x.double())] * 2, strategy="loop")
    result = ntcov.ntcov(*[_first_logit(low, x)] * 2, strategy=strategy)
    assert result.dtype == torch.float32
    error = (result.double() - expected).abs().max() / expected.abs().max()
    assert error < 2e-2, float(error)


def test_accumulating_widens_only_narrow_floats() -> None:
    from ntcov._autodiff import accumulating

    assert accumulating(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert accumulating(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
    assert accumulating(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64
    assert accumulating(torch.zeros(2, dtype=torch.int8)).dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_result_dtype_does_not_depend_on_the_strategy(dtype: torch.dtype) -> None:
    low = _model().to(dtype)
    prop = _first_logit(low, torch.randn(6, 8).to(dtype))
    for strategy in ntcov.Strategy:
        assert ntcov.ntcov(prop, prop, strategy=strategy).dtype == torch.float32, strategy
        assert ntcov.ntvar(prop, strategy=strategy).dtype == torch.float32, strategy
    assert ntcov.ntcov(prop[:0], prop).dtype == torch.float32  # an empty side
