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
    """The largest Hessian eigenvalue ``λ_max`` of a scalar property, by the Lanczos method.

    Lanczos builds the tridiagonal matrix ``T_k`` of ``H`` on the Krylov space of a random
    start vector (one ``H v`` per step, the three-term recurrence: memory of three vectors).
    The largest eigenvalue ``θ`` of ``T_k`` is a lower bound on ``λ_max`` that converges
    quickly, also when negative eigenvalues are larger in size (plain power iteration would
    find those). It stops when the residual ``‖Hy − θy‖ = |β_{k+1} s_k|`` of its Ritz vector
    ``y`` is at most ``√tolerance · |θ|`` (``θ`` is then off by at most ``tolerance · θ² /
    gap``, ``gap`` the distance to the next eigenvalue), or when the Krylov space is exhausted
    (exact); after ``iterations`` steps without either it warns. Cost: one double-backward
    pass per step.
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
    result = _lanczos(
        lambda v: hessian_vector_product(loss, v, params), start, iterations, tolerance
    )
    if not result.converged:
        _warn_unsettled(result, iterations)
    return result.value


@dataclass(frozen=True)
class _Ritz:
    """The top Ritz value of a Lanczos run, its residual, and whether it settled."""

    value: float
    residual: float
    converged: bool


def _lanczos(
    apply: Callable[[ParamDict], ParamDict], start: ParamDict, iterations: int, tolerance: float
) -> _Ritz:
    """Largest eigenvalue of the symmetric operator ``apply`` by ``iterations`` Lanczos steps."""
    alphas: list[float] = []
    betas: list[float] = []
    q, previous, beta = _normalised(start), None, 0.0
    result = _Ritz(math.nan, math.inf, False)
    for _ in range(iterations):
        w = apply(q)
        alpha = float(_dot(q, w))
        w = _axpy(w, q, -alpha)
        if previous is not None:
            w = _axpy(w, previous, -beta)
        alphas.append(alpha)
        beta = _norm(w)
        values, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        theta, last = float(values[-1]), float(vectors[-1, -1])
        residual = abs(beta * last)
        exhausted = beta <= 1e-12 * max(abs(a) for a in alphas)
        settled = residual <= math.sqrt(tolerance) * abs(theta)
        result = _Ritz(theta, residual, exhausted or settled)
        if result.converged:
            break
        betas.append(beta)
        previous, q = q, {n: v / beta for n, v in w.items()}
    return result


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """``T_k``: ``alphas`` on the diagonal, ``betas`` beside it (float64)."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


def _warn_unsettled(result: _Ritz, iterations: int) -> None:
    warnings.warn(
        f"sharpness: the Lanczos iteration did not settle in {iterations} steps (residual "
        f"‖Hy − θy‖ = {result.residual:.3g} against θ = {result.value:.6g}); the estimate is "
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
