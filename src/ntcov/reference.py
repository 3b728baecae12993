"""Brute-force references: loops of ``torch.autograd.grad``, one backward pass per entry.

Slow (``K`` backward passes for ``K`` entries) and obviously correct; every fast strategy in
:mod:`ntcov.covariance` is tested against these, in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntcov._autodiff import check_depends, check_grads, check_output, refuse_inference_mode
from ntcov.params import ParamDict, ParamSelection, as_requires_grad, select_params
from ntcov.property import Property

__all__ = ["jacobian_loop", "ntcov_loop"]


def jacobian_loop(prop: Property, params: ParamDict) -> Tensor:
    """The full Jacobian ``J = ∂x/∂w`` as ``[K, P]`` (parameters concatenated in dict order)."""
    refuse_inference_mode("jacobian_loop")
    leaves = as_requires_grad(params)
    with torch.enable_grad():
        out = prop(leaves)
        check_output(prop, out)
        check_depends(prop, out)
        flat = out.reshape(-1)
        return _rows(prop, flat, leaves)


def _rows(prop: Property, flat: Tensor, leaves: ParamDict) -> Tensor:
    rows = []
    for i in range(flat.numel()):
        grads = torch.autograd.grad(
            flat[i], list(leaves.values()), retain_graph=True, allow_unused=True
        )
        check_grads(prop, grads)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(leaves.values(), grads, strict=True)
                ]
            )
        )
    if not rows:
        return flat.new_zeros(0, sum(p.numel() for p in leaves.values()))
    return torch.stack(rows)


def ntcov_loop(
    a: Property, b: Property, *, params: ParamSelection = None, metric: ParamDict | None = None
) -> Tensor:
    """``J_a diag(M) J_bᵀ`` from two brute-force Jacobians (``M = 1`` without ``metric``),
    shape ``a.shape + b.shape``."""
    refuse_inference_mode("ntcov_loop")
    weights = select_params(a.module, params)
    jac_a = jacobian_loop(a, weights)
    jac_b = jac_a if b is a else jacobian_loop(b, weights)
    if metric is not None:
        jac_a = jac_a * torch.cat([metric[n].reshape(-1) for n in weights])
    return (jac_a @ jac_b.T).reshape(a.shape + b.shape)  # a tuple: both may be scalars
