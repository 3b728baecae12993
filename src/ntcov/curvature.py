"""Curvature of a scalar property: Hessian-vector products and the sharpness λ_max.

Gradient descent with learning rate η on a loss with top Hessian eigenvalue λ_max is stable
only while η·λ_max < 2 (the edge of stability); first-order predictions of a step are accurate
when η·λ_max is well below 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ntcov._autodiff import gradient
from ntcov.params import ParamDict, ParamSelection, as_requires_grad, select_params
from ntcov.property import Property

__all__ = ["hessian_vector_product", "sharpness"]


def hessian_vector_product(
    loss: Property, vector: ParamDict, params: ParamSelection = None
) -> ParamDict:
    """``H v`` for the Hessian ``H = ∇²L`` of a scalar property (double backward), like ``v``."""
    weights = select_params(loss.module, params)
    leaves = as_requires_grad(weights)
    with torch.enable_grad():
        value = loss(leaves)
        if value.numel() != 1:
            raise ValueError(
                f"hessian_vector_product: {loss.name!r} must be scalar, got {list(value.shape)}."
            )
        grads = torch.autograd.grad(value.reshape(()), list(leaves.values()), create_graph=True)
        inner = torch.stack([(g * vector[n]).sum() for n, g in zip(leaves, grads, strict=True)])
        hv = torch.autograd.grad(inner.sum(), list(leaves.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if h is None else h.detach()
        for (n, p), h in zip(leaves.items(), hv, strict=True)
    }


def sharpness(
    loss: Property,
    *,
    params: ParamSelection = None,
    iterations: int = 30,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> float:
    """The largest Hessian eigenvalue ``λ_max`` of a scalar property, by power iteration on ``H v``.

    Plain power iteration finds the eigenvalue of largest *magnitude*. When that one is negative,
    or the iteration does not settle (eigenvalues ``±λ`` of equal size), a second power
    iteration on the shifted ``H + σI`` (``σ = ‖H v‖``, so its spectrum is ``≥ 0``) finds
    ``λ_max + σ``. Each phase stops when the residual ``‖Hv − λv‖ ≤ √tolerance · |λ|`` (the
    eigenvalue is then off by at most ``tolerance · λ² / gap``, ``gap`` the distance to the next
    eigenvalue), after at most ``iterations`` steps; an unsettled estimate (a lower bound on
    ``λ_max``) warns. Cost: one double-backward pass per step.
    """
    if iterations < 1:
        raise ValueError(f"sharpness: iterations must be at least 1, got {iterations}.")
    if not tolerance > 0:
        raise ValueError(f"sharpness: tolerance must be positive, got {tolerance!r}.")
    weights = select_params(loss.module, params)
    gradient(loss, weights, caller="sharpness")  # the scalar and dependence checks
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = {
        n: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        for n, p in weights.items()
    }

    def hvp(vector: ParamDict) -> ParamDict:
        return hessian_vector_product(loss, vector, params)

    top = _power(hvp, start, iterations, tolerance)
    if top.converged and top.value > 0:
        return top.value  # the largest-magnitude eigenvalue is positive: it is λ_max
    result = _shifted_power(hvp, start, iterations, tolerance, top.norm)
    if not result.converged and top.value > result.value:
        result = top  # both are lower bounds on λ_max: keep the larger
    if not result.converged:
        _warn_unsettled(result, iterations)
    return result.value


def _shifted_power(
    hvp: Callable[[ParamDict], ParamDict],
    start: ParamDict,
    iterations: int,
    tolerance: float,
    shift: float,
) -> _Power:
    """``λ_max`` by power iteration on ``H + σI``. ``σ = ‖Hv‖`` of an unsettled ``v`` may fall
    short of ``|λ_min|``; then the shifted iteration lands on ``λ_min + σ < 0`` and ``σ`` is
    raised to ``|λ_min|`` (read off that result) once."""
    for _ in range(2):
        sigma = shift

        def shifted(vector: ParamDict, sigma: float = sigma) -> ParamDict:
            return {n: h + sigma * vector[n] for n, h in hvp(vector).items()}

        moved = _power(shifted, start, iterations, tolerance)
        if moved.value >= 0:
            break
        shift = sigma - moved.value  # |λ_min| ≤ σ − (λ_min + σ)
    return _Power(moved.value - sigma, moved.norm, moved.residual, moved.converged)


@dataclass(frozen=True)
class _Power:
    """One power iteration's outcome: Rayleigh quotient, ``‖A v‖``, residual, settled or not."""

    value: float
    norm: float
    residual: float
    converged: bool


def _power(
    apply: Callable[[ParamDict], ParamDict], start: ParamDict, iterations: int, tolerance: float
) -> _Power:
    """Power iteration of the symmetric operator ``apply`` from ``start``."""
    vector = _normalised(start)
    outcome = _Power(0.0, 0.0, math.inf, False)
    for _ in range(iterations):
        av = apply(vector)
        value = float(_dot(vector, av))
        residual, norm = _norm(_axpy(av, vector, -value)), _norm(av)
        outcome = _Power(value, norm, residual, residual <= math.sqrt(tolerance) * abs(value))
        if outcome.converged:
            break
        vector = _normalised(av)
    return outcome


def _warn_unsettled(outcome: _Power, iterations: int) -> None:
    warnings.warn(
        f"sharpness: the power iteration did not settle in {iterations} steps (residual "
        f"‖Hv − λv‖ = {outcome.residual:.3g} against λ = {outcome.value:.6g}); the estimate is "
        "a lower bound on λ_max. Pass more iterations for a tighter value.",
        RuntimeWarning,
        stacklevel=3,
    )


def _axpy(a: ParamDict, b: ParamDict, scale: float) -> ParamDict:
    """``a + scale · b``, entry by entry."""
    return {n: a[n] + scale * b[n] for n in a}


def _dot(a: ParamDict, b: ParamDict) -> Tensor:
    return torch.stack([(a[n] * b[n]).sum() for n in a]).sum()


def _norm(vector: ParamDict) -> float:
    return float(_dot(vector, vector).sqrt())


def _normalised(vector: ParamDict) -> ParamDict:
    norm = _dot(vector, vector).sqrt()
    if norm == 0:
        raise ValueError("sharpness: the Hessian-vector product vanished; the loss is flat here.")
    return {n: v / norm for n, v in vector.items()}
