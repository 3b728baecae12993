"""The laws ntcov is built on: bilinearity, sums, product and chain rules, symmetry, Price's rate.

Each law is checked on a few models of the zoo, with the fast default strategy on one side and,
where it matters, every strategy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ntcov
from ntcov import Property, Strategy, properties
from tests.zoo import ZOO, Case, assert_close

MODELS = ["mlp", "cnn_bn", "tied", "gru"]


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=MODELS)
def case(request: pytest.FixtureRequest) -> Case:
    return ZOO[request.param]()


def test_bilinearity_with_constant_matrices(case: Case) -> None:
    a = properties.logits(case.model, case.x).reshape(-1)  # [15]
    b = properties.probs(case.model, case.x2, 1)  # [4]
    f, g = _random(2, a.shape.numel(), seed=1), _random(3, b.shape.numel(), seed=2)
    expected = f @ ntcov.ntcov(a, b) @ g.T
    assert_close(ntcov.ntcov(f @ a, g @ b), expected)
    assert_close(ntcov.ntcov(f @ a, g @ b, strategy="vjp"), expected)
    assert_close(ntcov.ntcov(2.5 * a - 3.0, b / 4.0), 2.5 * ntcov.ntcov(a, b) / 4.0)


def test_right_multiplication_by_a_constant_matrix(case: Case) -> None:
    a = properties.logits(case.model, case.x)  # [N, C]
    c = properties.loss(case.model, case.x, case.y)
    g = _random(a.shape[1], 2, seed=3)
    assert_close(ntcov.ntcov(a @ g, c), ntcov.ntcov(a, c) @ g)


def test_sums(case: Case) -> None:
    a = properties.probs(case.model, case.x2, 1)
    b = properties.probs(case.model, case.x2, 2)
    c = properties.logits(case.model, case.x)
    ac, bc = ntcov.ntcov(a, c), ntcov.ntcov(b, c)
    assert_close(ntcov.ntcov(a + b, c), ac + bc)
    assert_close(ntcov.ntcov(a - b, c), ac - bc)
    assert_close(ntcov.ntcov(c, a + b), (ac + bc).permute(1, 2, 0))


def test_product_rule(case: Case) -> None:
    a = properties.probs(case.model, case.x2, 0)  # [M]
    b = properties.log_probs(case.model, case.x2, 2)  # [M]
    c = properties.logits(case.model, case.x).reshape(-1)  # [K]
    av, bv = a.value()[:, None], b.value()[:, None]
    expected = av * ntcov.ntcov(b, c) + bv * ntcov.ntcov(a, c)
    assert_close(ntcov.ntcov(a * b, c), expected)
    assert_close(ntcov.ntcov(a * b, c, strategy="per_example"), expected)


def test_sigmoid_chain_rule(case: Case) -> None:
    z = properties.logits(case.model, case.x)[:, 0]
    s = z.map_rows(torch.sigmoid)
    p = s.value()
    assert_close(ntcov.ntvar(s), p**2 * (1 - p) ** 2 * ntcov.ntvar(z))
    # the seed's guess p(1−p) ntvar(z) is not the law
    assert not torch.allclose(ntcov.ntvar(s), p * (1 - p) * ntcov.ntvar(z))


def test_softmax_chain_rule(case: Case) -> None:
    z = properties.logits(case.model, case.x)  # [N, C]
    p = z.map_rows(lambda v: torch.softmax(v, dim=-1))
    c = properties.probs(case.model, case.x2, 1)  # [M]
    pv = p.value()[..., None]  # [N, C, 1]
    zc = ntcov.ntcov(z, c)  # [N, C, M]
    expected = pv * (zc - (pv * zc).sum(1, keepdim=True))
    assert_close(ntcov.ntcov(p, c), expected)


@pytest.mark.parametrize("strategy", [s.value for s in Strategy])
def test_symmetry(case: Case, strategy: str) -> None:
    a = properties.logits(case.model, case.x)  # [N, C]
    b = properties.probs(case.model, case.x2, 1)  # [M]
    ab = ntcov.ntcov(a, b, strategy=strategy)
    assert_close(ab, ntcov.ntcov(b, a, strategy=strategy).permute(1, 2, 0))
    aa = ntcov.ntcov(a, a, strategy=strategy).reshape(a.shape.numel(), -1)
    assert_close(aa, aa.T)
    assert_close(ntcov.ntvar(a, strategy=strategy), torch.diagonal(aa).reshape(a.shape))
    assert (torch.linalg.eigvalsh(aa) > -1e-10 * aa.abs().max()).all()


@pytest.mark.parametrize("strategy", [s.value for s in Strategy])
def test_rate_is_ntcov_with_minus_the_loss(case: Case, strategy: str) -> None:
    x = properties.logits(case.model, case.x)
    loss = properties.loss(case.model, case.x, case.y)
    expected = -ntcov.ntcov(x, loss, strategy="loop")
    assert_close(ntcov.rate(x, loss, strategy=strategy), expected)
    assert_close(ntcov.ntcov(x, -loss, strategy=strategy), expected)


def test_rate_decomposes_over_training_examples(case: Case) -> None:
    """``L = mean ℓ_i`` ⇒ ``dx/dt = −(1/N) Σ_i ntcov(x, ℓ_i)``."""
    x = properties.probs(case.model, case.x2, 2)
    losses = properties.per_example_loss(case.model, case.x, case.y)
    loss = properties.loss(case.model, case.x, case.y)
    assert_close(ntcov.rate(x, loss), -ntcov.ntcov(x, losses).mean(-1))


def _sgd_step(case: Case, lr: float, *, maximize: bool) -> torch.nn.Module:
    """A copy of the model after one step of torch.optim.SGD on the cross-entropy loss."""
    model = copy.deepcopy(case.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, maximize=maximize)
    optimizer.zero_grad()
    F.cross_entropy(model(case.x), case.y).backward()
    optimizer.step()
    return model


def test_rate_predicts_a_small_sgd_step(case: Case) -> None:
    """Central difference of a real SGD step (descent vs ascent) divided by lr equals the rate."""
    lr = 1e-5
    x = properties.logits(case.model, case.x2)
    loss = properties.loss(case.model, case.x, case.y)
    down_model = _sgd_step(case, lr, maximize=False)
    up_model = _sgd_step(case, lr, maximize=True)
    with torch.no_grad():
        down, up = down_model(case.x2), up_model(case.x2)
    measured = (down - up) / (2 * lr)
    predicted = ntcov.rate(x, loss)
    torch.testing.assert_close(predicted, measured, rtol=1e-5, atol=1e-7)
    # and not its sign-flipped or halved cousins
    assert not torch.allclose(predicted, -measured, rtol=1e-3)
    assert not torch.allclose(predicted / 2, measured, rtol=1e-3)


def test_rate_of_a_weight_norm_property() -> None:
    """A property that is no network output: ``‖W‖²`` of the last layer, against autograd."""
    case = ZOO["mlp"]()
    model = case.model
    norm = Property(model, lambda m: m[2].weight.pow(2).sum())
    loss = properties.loss(model, case.x, case.y)
    weight = model[2].weight.detach().clone().requires_grad_(True)
    grad_w = torch.autograd.grad(
        F.cross_entropy(F.linear(torch.tanh(model[0](case.x)), weight, model[2].bias), case.y),
        weight,
    )[0]
    assert_close(ntcov.rate(norm, loss), -(2 * model[2].weight * grad_w).sum().detach())
