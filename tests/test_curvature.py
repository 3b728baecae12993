"""Hessian-vector products and the sharpness against an explicit Hessian in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ntcov import Property, properties
from ntcov.curvature import hessian_vector_product, sharpness
from ntcov.params import select_params


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    return model, torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))


def _explicit_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weights = select_params(model)
    flat = torch.cat([p.reshape(-1) for p in weights.values()])
    loss = properties.loss(model, x, y)

    def of_flat(vector: torch.Tensor) -> torch.Tensor:
        parts, start = {}, 0
        for name, p in weights.items():
            parts[name] = vector[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return loss(parts)

    return torch.autograd.functional.hessian(of_flat, flat)


def test_hessian_vector_product_matches_explicit_hessian() -> None:
    model, x, y = _problem()
    hessian = _explicit_hessian(model, x, y)
    weights = select_params(model)
    vector = {n: torch.randn_like(p) for n, p in weights.items()}
    flat_v = torch.cat([v.reshape(-1) for v in vector.values()])
    hv = hessian_vector_product(properties.loss(model, x, y), vector)
    flat_hv = torch.cat([h.reshape(-1) for h in hv.values()])
    torch.testing.assert_close(flat_hv, hessian @ flat_v, rtol=1e-10, atol=1e-12)


def test_sharpness_is_the_top_eigenvalue() -> None:
    model, x, y = _problem(1)
    eigenvalues = torch.linalg.eigvalsh(_explicit_hessian(model, x, y))
    top = eigenvalues[-1].item()
    estimate = sharpness(properties.loss(model, x, y), iterations=500, tolerance=1e-12)
    assert estimate == pytest.approx(top, rel=1e-6)


def test_sharpness_refuses_non_scalar_and_bad_iterations() -> None:
    model, x, y = _problem()
    with pytest.raises(ValueError, match="must be a scalar"):
        sharpness(properties.logits(model, x))
    with pytest.raises(ValueError, match="iterations must be at least 1"):
        sharpness(properties.loss(model, x, y), iterations=0)


def _quadratic(coefficients: tuple[float, float]) -> Property:
    """``a·w₀² + b·w₁²`` of a bias-free ``Linear(2, 1)``: Hessian ``diag(2a, 2b)``."""
    layer = nn.Linear(2, 1, bias=False).double()
    a, b = coefficients
    return Property(layer, lambda m: a * m.weight[0, 0] ** 2 + b * m.weight[0, 1] ** 2)


@pytest.mark.parametrize(
    ("coefficients", "top"),
    [((1.0, -3.0), 2.0), ((1.0, -1.0), 2.0), ((-2.0, -0.5), -1.0), ((0.5, 3.0), 6.0)],
    ids=["negative_dominates", "plus_minus_equal", "all_negative", "positive"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharpness_is_the_largest_eigenvalue_not_the_largest_magnitude(
    coefficients: tuple[float, float], top: float, seed: int
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate = sharpness(_quadratic(coefficients), seed=seed, tolerance=1e-12, iterations=500)
    assert estimate == pytest.approx(top, rel=1e-9)


def test_an_unsettled_estimate_warns_and_is_a_lower_bound() -> None:
    model, x, y = _problem(1)
    top = torch.linalg.eigvalsh(_explicit_hessian(model, x, y))[-1].item()
    with pytest.warns(RuntimeWarning, match="did not settle in 2 steps"):
        estimate = sharpness(properties.loss(model, x, y), iterations=2, tolerance=1e-14)
    assert estimate <= top * (1 + 1e-12)
    with pytest.raises(ValueError, match="tolerance must be positive"):
        sharpness(properties.loss(model, x, y), tolerance=0.0)


def _quadratic_form(hessian: torch.Tensor) -> Property:
    """``½ wᵀ H w`` of a vector parameter ``w``: its Hessian is ``H``."""
    holder = nn.Module()
    holder.w = nn.Parameter(torch.ones(hessian.shape[0], dtype=torch.float64))
    return Property(holder, lambda m: 0.5 * m.w @ hessian @ m.w)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "spectrum",
    [
        [-100.0, 1.0] + [0.0] * 48,  # a large negative, λ_max small, many zeros
        [-50.0, 10.0, *torch.linspace(0.0, 0.29, 48).tolist()],
        [-100.0, 1.0, 0.5, *torch.linspace(0.0, 0.1, 47).tolist()],
        [-10.0, -5.0, -2.0, -1.0],  # negative definite: λ_max = −1
    ],
    ids=["zeros", "clustered", "near_top", "negative_definite"],
)
def test_sharpness_of_rotated_indefinite_spectra(spectrum: list[float], seed: int) -> None:
    eigenvalues = torch.tensor(spectrum, dtype=torch.float64)
    generator = torch.Generator().manual_seed(100 + seed)
    rotation, _ = torch.linalg.qr(
        torch.randn(len(spectrum), len(spectrum), generator=generator, dtype=torch.float64)
    )
    hessian = rotation @ torch.diag(eigenvalues) @ rotation.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate = sharpness(_quadratic_form(hessian), seed=seed, iterations=200, tolerance=1e-12)
    assert estimate == pytest.approx(eigenvalues.max().item(), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("seed", [0, 2])
def test_sharpness_of_a_maximised_loss_is_its_largest_eigenvalue(seed: int) -> None:
    """``−L`` of a tanh MLP: an indefinite Hessian whose negative side is the larger."""
    model, x, y = _problem(seed)
    eigenvalues = torch.linalg.eigvalsh(-_explicit_hessian(model, x, y))
    estimate = sharpness(-properties.loss(model, x, y), iterations=100, tolerance=1e-12)
    assert estimate == pytest.approx(eigenvalues[-1].item(), rel=1e-8)
