"""Curvature of a scalar property: Hessian-vector products and the sharpness λ_max.

Gradient descent with learning rate η on a loss with top Hessian eigenvalue λ_max is stable
only while η·λ_max < 2 (the edge of stability); first-order predictions of a step are accurate
when η·λ_max is well below 1.
"""

from __future__ import annotations

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
    """The largest-magnitude Hessian eigenvalue ``λ_max`` by power iteration on ``H v``.

    Cost: one double-backward pass per iteration; stops when the Rayleigh quotient changes by
    less than ``tolerance`` (relative) between iterations.
    """
    if iterations < 1:
        raise ValueError(f"sharpness: iterations must be at least 1, got {iterations}.")
    weights = select_params(loss.module, params)
    gradient(loss, weights, caller="sharpness")  # the scalar and dependence checks
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vector = {
        n: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        for n, p in weights.items()
    }
    estimate = 0.0
    for _ in range(iterations):
        vector = _normalised(vector)
        hv = hessian_vector_product(loss, vector, params)
        previous, estimate = estimate, float(_dot(vector, hv))
        vector = hv
        if abs(estimate - previous) <= tolerance * abs(estimate):
            break
    return estimate


def _dot(a: ParamDict, b: ParamDict) -> Tensor:
    return torch.stack([(a[n] * b[n]).sum() for n in a]).sum()


def _normalised(vector: ParamDict) -> ParamDict:
    norm = _dot(vector, vector).sqrt()
    if norm == 0:
        raise ValueError("sharpness: the Hessian-vector product vanished; the loss is flat here.")
    return {n: v / norm for n, v in vector.items()}
