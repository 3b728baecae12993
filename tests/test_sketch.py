"""ntcov.sketch: the random-projection sketch stays within its stated error bound."""

from __future__ import annotations

import pytest
import torch

import ntcov
from ntcov import properties as P
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_mlp
from ntcov.sketch import error_bound, sketch_ntcov
from tests.zoo import ZOO, assert_close

DELTA = 1e-3  # per-entry failure probability of the bounds tested


def _digits_probs(count: int = 12) -> ntcov.Property:
    split = load_digits_split()
    return P.probs(digits_mlp(), split.x_test[:count], split.y_test[:count])


def _zoo_logits(name: str) -> ntcov.Property:
    case = ZOO[name]()
    return P.logits(case.model, case.x2)  # [4, 3]: K = 12


PROPERTIES = {
    "digits_mlp": _digits_probs,
    "mlp": lambda: _zoo_logits("mlp"),
    "cnn_bn": lambda: _zoo_logits("cnn_bn"),
    "tied": lambda: _zoo_logits("tied"),
}


@pytest.mark.parametrize("name", list(PROPERTIES))
@pytest.mark.parametrize("dims", [64, 512])
def test_error_within_stated_bounds(name: str, dims: int) -> None:
    x = PROPERTIES[name]()
    k = x.shape.numel()
    exact = ntcov.ntcov(x, x).reshape(k, k)
    variances = torch.diagonal(exact)
    for seed in range(3):
        result = sketch_ntcov(x, dims=dims, seed=seed)
        error = (result.matrix.reshape(k, k) - exact).abs()
        assert (error <= error_bound(variances, variances, dims, DELTA)).all()
        assert (error <= result.bound(DELTA).reshape(k, k)).all()


def test_cross_sketch_of_examples_against_properties_within_bound() -> None:
    split = load_digits_split()
    model = digits_mlp()
    x = P.probs(model, split.x_test[:5], split.y_test[:5])
    loss = P.per_example_loss(model, split.x_train[:40], split.y_train[:40])
    metric = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    exact = ntcov.ntcov(x, loss, metric=metric)
    var_x, var_l = ntcov.ntvar(x, metric=metric), ntcov.ntvar(loss, metric=metric)
    result = sketch_ntcov(x, loss, dims=256, metric=metric, seed=4)
    assert result.matrix.shape == (5, 40)
    assert ((result.matrix - exact).abs() <= error_bound(var_x, var_l, 256, DELTA)).all()
    assert ((result.matrix - exact).abs() <= result.bound(DELTA)).all()


def test_standard_deviation_formula_holds() -> None:
    """Over 200 independent sketches, ``E[(Ĝ − G)² / σ²] = 1`` with
    ``σ² = (G_ii G_jj + G_ij²)/d``, and ``E Ĝ = G`` (within sampling error)."""
    x = _zoo_logits("mlp")
    exact = ntcov.ntcov(x, x).reshape(12, 12)
    v = torch.diagonal(exact)
    dims, runs = 4, 200
    sigma2 = (v[:, None] * v[None] + exact.square()) / dims
    draws = torch.stack(
        [sketch_ntcov(x, dims=dims, seed=s).matrix.reshape(12, 12) for s in range(runs)]
    )
    z2 = ((draws - exact).square() / sigma2).mean()
    assert 0.85 < float(z2) < 1.15
    mean_error = (draws.mean(0) - exact) / (sigma2 / runs).sqrt()
    assert mean_error.abs().mean() < 1.2  # |N(0, 1)| has mean 0.8


def test_deterministic_and_independent_of_chunk_size() -> None:
    x = _zoo_logits("cnn_bn")
    base = sketch_ntcov(x, dims=50, seed=7)
    assert_close(sketch_ntcov(x, dims=50, seed=7, chunk_size=3).matrix, base.matrix)
    assert_close(sketch_ntcov(x, dims=50, seed=7, chunk_size=1).matrix, base.matrix)
    assert not torch.equal(sketch_ntcov(x, dims=50, seed=8).matrix, base.matrix)
    assert base.matrix.shape == (4, 3, 4, 3)


def test_few_directions_give_an_infinite_data_bound_and_bad_input_is_refused() -> None:
    x = _zoo_logits("mlp")
    assert torch.isinf(sketch_ntcov(x, dims=8).bound(0.01)).all()
    with pytest.raises(ValueError, match="dims"):
        sketch_ntcov(x, dims=0)
    negative = {n: -torch.ones_like(p) for n, p in x.module.named_parameters()}
    with pytest.raises(ValueError, match="negative"):
        sketch_ntcov(x, metric=negative)
    with pytest.raises(ValueError, match="delta"):
        sketch_ntcov(x, dims=16).bound(1.5)
