"""ntcov under a diagonal metric, J_a diag(M) J_bᵀ, for every strategy against brute force."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ntcov
from ntcov import Strategy, properties
from ntcov.params import select_params
from tests.zoo import ZOO, assert_close, plain_jacobian

STRATEGIES = [s.value for s in Strategy]
MODELS = ["mlp", "cnn_bn", "sdpa", "tied", "frozen"]


@functools.cache
def setup(name: str) -> tuple:
    case = ZOO[name]()
    model, x, x2, y = case.model, case.x, case.x2, case.y
    weights = select_params(model)
    generator = torch.Generator().manual_seed(1)
    metric = {
        n: torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.1 for n, p in weights.items()
    }
    diag = torch.cat([metric[n].reshape(-1) for n in weights])
    j_logits = plain_jacobian(model, lambda m: m(x))
    j_probs = plain_jacobian(model, lambda m: torch.softmax(m(x2), -1)[:, 1])
    j_loss = plain_jacobian(model, lambda m: F.cross_entropy(m(x), y))
    n, m = x.shape[0], x2.shape[0]
    expected = {
        "matrix": ((j_logits * diag) @ j_probs.T).reshape(n, -1, m),
        "ntvar": ((j_logits * diag) * j_logits).sum(1).reshape(n, -1),
        "rate": -((j_logits * diag) @ j_loss.T).reshape(n, -1),
    }
    props = (properties.logits(model, x), properties.probs(model, x2, 1))
    return props, properties.loss(model, x, y), metric, expected


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_metric_ntcov_matches_brute_force(name: str, strategy: str) -> None:
    (logits, probs), _, metric, expected = setup(name)
    assert_close(ntcov.ntcov(logits, probs, strategy=strategy, metric=metric), expected["matrix"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_metric_ntvar_matches_brute_force(name: str, strategy: str) -> None:
    (logits, _), _, metric, expected = setup(name)
    assert_close(ntcov.ntvar(logits, strategy=strategy, metric=metric), expected["ntvar"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_metric_rate_matches_brute_force(name: str, strategy: str) -> None:
    (logits, _), loss, metric, expected = setup(name)
    assert_close(ntcov.rate(logits, loss, strategy=strategy, metric=metric), expected["rate"])


def test_metric_of_ones_is_plain_ntcov() -> None:
    (logits, probs), _, metric, _ = setup("mlp")
    ones = {n: torch.ones_like(t) for n, t in metric.items()}
    assert_close(ntcov.ntcov(logits, probs, metric=ones), ntcov.ntcov(logits, probs))


def test_metric_with_wrong_shape_or_missing_entry_is_refused() -> None:
    (logits, probs), _, metric, _ = setup("mlp")
    name = next(iter(metric))
    wrong: dict[str, Tensor] = {**metric, name: metric[name].reshape(-1)}
    with pytest.raises(ValueError, match="expected the parameter's shape"):
        ntcov.ntcov(logits, probs, metric=wrong)
    missing = {n: t for n, t in metric.items() if n != name}
    with pytest.raises(ValueError, match=f"no entry for parameter '{name}'"):
        ntcov.ntvar(logits, metric=missing)
