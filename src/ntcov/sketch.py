"""Random-projection sketches of ntcov matrices, for when ``K·P`` does not fit in memory.

For properties ``a`` (``K_a`` entries) and ``b`` (``K_b``) with Jacobians ``J_a``, ``J_b`` and a
diagonal metric ``M ≥ 0``, draw ``d`` Gaussian directions ``s_j = M^{1/2} z_j``,
``z_j ~ N(0, I_P)``, push each through both properties with one forward-mode JVP, and average:

    Ĝ = (1/d) Σ_j (J_a s_j)(J_b s_j)ᵀ = (1/d) A Bᵀ,      A = J_a S  [K_a, d],  B = J_b S  [K_b, d]

``J`` is never formed: memory is ``d·(K_a + K_b)`` numbers plus one chunk of directions, and the
cost is ``d`` JVPs of each property (batched with ``vmap``), whatever ``P``.

Error (Johnson–Lindenstrauss for inner products). With ``G = J_a M J_bᵀ``,
``Gᵃ = J_a M J_aᵀ`` and ``Gᵇ = J_b M J_bᵀ``:

- unbiased, ``E Ĝ = G``, with standard deviation ``σ_ij = √((Gᵃ_ii Gᵇ_jj + G_ij²) / d)``;
- for every entry and ``t > 0``, with probability at least ``1 − 4e^{−t}``,

      |Ĝ_ij − G_ij| ≤ 2 √(Gᵃ_ii Gᵇ_jj) · (√(t/d) + t/d)            (≈ 2√t · σ_ij for d ≫ t)

  Proof: ``(u·z)(v·z) = ¼[((u+v)·z)² − ((u−v)·z)²]`` with ``u``, ``v`` the rows of
  ``J M^{1/2}``; each sum over the ``d`` directions is a scaled ``χ²_d``, whose deviations are
  bounded by Laurent–Massart, ``P(|χ²_d − d| ≥ 2√(dt) + 2t) ≤ 2e^{−t}``; and ``Ĝ_ij`` does not
  change when ``u → αu``, ``v → v/α``, which turns ``|u|² + |v|²`` into ``2|u||v|``.

:meth:`Sketch.bound` states this bound from the sketch alone (the diagonals estimated, with
their own lower-tail bound ``Ĝᵃ_ii ≥ Gᵃ_ii (1 − 2√(t/d))``, so that all three events hold with
probability ``≥ 1 − 6e^{−t} = 1 − δ``); :func:`error_bound` states it from known diagonals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ntcov import _autodiff, _safeguards
from ntcov.covariance import DEFAULT_MEMORY_BUDGET
from ntcov.params import (
    ParamDict,
    ParamSelection,
    as_requires_grad,
    check_mode,
    num_params,
    select_params,
)
from ntcov.property import Property, different_modules

__all__ = ["Sketch", "batched_jvp", "error_bound", "sketch_ntcov", "tangents_per_chunk"]

Rows = dict[str, Tensor]


# ----- batched JVPs (shared with ntcov.attribution) -----------------------------------------


def batched_jvp(prop: Property, weights: ParamDict, tangents: Rows) -> Tensor:
    """``J v_j`` for a batch of tangents ``{name: [c, *p]}``: ``[c, *S]``, one vmapped JVP.

    Cost ≈ ``c`` JVPs (about three forward passes each) in one batched pass. Falls back to one
    JVP per tangent (:func:`ntcov._autodiff.directions`, itself falling back to double-VJPs where
    forward mode is missing) when ``vmap`` cannot batch the model, with one warning.
    """
    count = next(iter(tangents.values())).shape[0]
    if count == 1:  # a plain forward-mode JVP: no vmap overhead
        single = {n: t[0] for n, t in tangents.items()}
        return _autodiff.directional(prop, weights, single, force_reverse=False)[1][None]

    def one(tangent: Rows) -> Tensor:
        return jvp(prop, (weights,), (tangent,))[1]

    _autodiff._load_forward_ad()  # torch's first JVP would warn under -W error
    try:
        with _autodiff.composite_attention():
            return vmap(one)(tangents).detach()
    except (RuntimeError, NotImplementedError) as err:
        _autodiff._warn(
            "batched JVP",
            prop,
            f"vmap over JVPs failed for property {prop.name!r} "
            f"({_autodiff._first_line(err)}); computing one JVP per tangent instead (exact, "
            "slower).",
        )
    split = [{n: t[i] for n, t in tangents.items()} for i in range(count)]
    return torch.stack(_autodiff.directions(prop, weights, split, force_reverse=False))


def tangents_per_chunk(prop: Property, weights: ParamDict, memory_budget: int) -> int:
    """Tangents to push through ``prop`` at once so that a batched JVP fits ``memory_budget``
    bytes: each costs about twice the activations of one forward pass (measured once, as the
    bytes the forward pass saves for backward) plus two copies of the weights."""
    itemsize = next(iter(weights.values())).element_size()
    per_tangent = 2 * activation_bytes(prop, weights) + 2 * num_params(weights) * itemsize
    return max(1, memory_budget // max(per_tangent, 1))


def activation_bytes(prop: Property, weights: ParamDict) -> int:
    """Bytes of the tensors one forward pass of ``prop`` saves for backward."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.enable_grad(), _autodiff.composite_attention():
        prop(as_requires_grad(weights))
    return total


# ----- the sketch ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sketch:
    """A sketch ``Ĝ ≈ J_a M J_bᵀ`` from ``dims`` random directions (see the module docstring).

    ``matrix`` is ``[*S_a, *S_b]``; ``projections_a`` (``[K_a, d]``) and ``projections_b``
    (``[K_b, d]``) are ``J S`` for the directions ``S``, from which the diagonals are estimated.
    """

    matrix: Tensor
    projections_a: Tensor
    projections_b: Tensor
    dims: int

    def variances(self) -> tuple[Tensor, Tensor]:
        """Estimated ``Gᵃ_ii`` (``[K_a]``) and ``Gᵇ_jj`` (``[K_b]``), unbiased (``χ²_d/d``)."""
        return self.projections_a.square().mean(1), self.projections_b.square().mean(1)

    def std(self) -> Tensor:
        """Estimated standard deviation ``√((Ĝᵃ_ii Ĝᵇ_jj + Ĝ_ij²)/d)`` of each entry."""
        var_a, var_b = self.variances()
        flat = self.matrix.reshape(var_a.numel(), var_b.numel())
        return (
            ((var_a[:, None] * var_b[None] + flat.square()) / self.dims)
            .sqrt()
            .reshape(self.matrix.shape)
        )

    def bound(self, delta: float = 0.01) -> Tensor:
        """A per-entry error bound that holds for each entry with probability ``≥ 1 − delta``,
        from the sketch alone: ``2√(Ĝᵃ_ii Ĝᵇ_jj)(√(t/d) + t/d) / (1 − 2√(t/d))`` with
        ``t = log(6/delta)``; infinite when ``d ≤ 4t`` (too few directions to say)."""
        t = _tail(delta, 6.0)
        shrink = 1.0 - 2.0 * math.sqrt(t / self.dims)
        var_a, var_b = self.variances()
        scale = (var_a[:, None] * var_b[None]).sqrt().reshape(self.matrix.shape)
        if shrink <= 0:
            return torch.full_like(scale, math.inf)
        return 2.0 * scale * (math.sqrt(t / self.dims) + t / self.dims) / shrink


def error_bound(variance_a: Tensor, variance_b: Tensor, dims: int, delta: float = 0.01) -> Tensor:
    """``2√(Gᵃ_ii Gᵇ_jj)(√(t/d) + t/d)``, ``t = log(4/delta)``: ``|Ĝ_ij − G_ij|`` stays below
    it with probability ``≥ 1 − delta`` for each entry, given the exact diagonals ``[K_a]``,
    ``[K_b]`` (``ntvar`` under the same metric). Returns ``[K_a, K_b]``."""
    t = _tail(delta, 4.0)
    scale = (variance_a.reshape(-1, 1) * variance_b.reshape(1, -1)).clamp_min(0).sqrt()
    return 2.0 * scale * (math.sqrt(t / dims) + t / dims)


def _tail(delta: float, events: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"Sketch.bound: delta must be in (0, 1), got {delta!r}.")
    return math.log(events / delta)


def sketch_ntcov(
    a: Property,
    b: Property | None = None,
    *,
    dims: int = 256,
    metric: ParamDict | None = None,
    params: ParamSelection = None,
    seed: int = 0,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Sketch:
    """Sketch ``ntcov_M(a, b)`` (``b = a`` by default) from ``dims`` Gaussian directions.

    Directions are drawn one after another from a ``torch.Generator`` seeded with ``seed``, so
    the result does not depend on ``chunk_size`` (directions per batched JVP; default from
    ``memory_budget``). ``metric`` must be non-negative (an optimizer's ``M``). Errors: see
    :class:`Sketch` (``std``, ``bound``) and :func:`error_bound`.
    """
    _autodiff.refuse_inference_mode("sketch_ntcov")
    with torch.enable_grad(), _autodiff.one_warning_per_cause():
        weights = _prepare(a, b, params, dims, metric)
        root = _metric_root(metric, weights)
        step = _chunk(chunk_size, a, b, weights, memory_budget)
        generator = torch.Generator().manual_seed(seed)
        shape_a, shape_b = a.value().shape, (a if b is None else b).value().shape
        parts_a, parts_b = [], []
        for first in range(0, dims, step):
            count = min(step, dims - first)
            directions = _directions(weights, root, count, generator)
            parts_a.append(batched_jvp(a, weights, directions).reshape(count, shape_a.numel()))
            if b is not None:
                parts_b.append(batched_jvp(b, weights, directions).reshape(count, shape_b.numel()))
    proj_a = torch.cat(parts_a).T  # [K_a, d]
    proj_b = proj_a if b is None else torch.cat(parts_b).T
    matrix = (proj_a @ proj_b.T / dims).reshape(shape_a + shape_b)
    _safeguards.check_finite_outcome("sketch_ntcov", matrix, (a,) if b is None else (a, b), weights)
    return Sketch(matrix, proj_a, proj_b, dims)


def _prepare(
    a: Property, b: Property | None, params: ParamSelection, dims: int, metric: ParamDict | None
) -> ParamDict:
    for prop in (a, b):
        if prop is not None and not isinstance(prop, Property):
            raise TypeError(
                f"sketch_ntcov: expected ntcov.Property arguments, got {type(prop).__name__}."
            )
    if b is not None and b.module is not a.module:
        raise ValueError(
            "sketch_ntcov: a and b must be properties of the same module; got "
            f"{different_modules(a.module, b.module)}."
        )
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f"sketch_ntcov: dims must be an int >= 1, got {dims!r}.")
    for prop in (a, b):
        if prop is not None:
            check_mode(prop.module, allow_train_mode=prop.allow_train_mode)
    weights = select_params(a.module, params)
    if metric is not None and not isinstance(metric, Mapping):
        raise TypeError(
            "sketch_ntcov: metric must be a dict {parameter name: tensor of its shape} (e.g. "
            f"ntcov.optimizer_step(...).metric), got {type(metric).__name__}."
        )
    for name, weight in weights.items():
        if metric is not None and (name not in metric or metric[name].shape != weight.shape):
            raise ValueError(
                f"sketch_ntcov: metric[{name!r}] must be a tensor of the parameter's shape "
                f"{list(weight.shape)}."
            )
    return weights


def _metric_root(metric: ParamDict | None, weights: ParamDict) -> ParamDict | None:
    """``M^{1/2}`` per block; a negative entry (``maximize=True``) has no real square root."""
    if metric is None:
        return None
    for name in weights:
        if (metric[name] < 0).any():
            raise ValueError(
                f"sketch_ntcov: metric[{name!r}] has negative entries; the sketch needs M >= 0 "
                "(negate the metric and the result for an optimizer with maximize=True)."
            )
    return {n: metric[n].sqrt() for n in weights}


def _chunk(
    chunk_size: int | None, a: Property, b: Property | None, weights: ParamDict, budget: int
) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"sketch_ntcov: chunk_size must be an int >= 1, got {chunk_size!r}.")
        return chunk_size
    sizes = [tangents_per_chunk(p, weights, budget) for p in (a, b) if p is not None]
    return min(sizes)


def _directions(
    weights: ParamDict, root: ParamDict | None, count: int, generator: torch.Generator
) -> Rows:
    """``count`` directions ``M^{1/2} z``, ``z ~ N(0, I_P)``, drawn one after another (so the
    stream does not depend on how directions are chunked): ``{name: [count, *p]}``."""
    first = next(iter(weights.values()))
    size = num_params(weights)
    flat = torch.stack(
        [torch.randn(size, generator=generator, dtype=first.dtype) for _ in range(count)]
    )
    flat = flat.to(first.device)
    out, start = {}, 0
    for name, weight in weights.items():
        block = flat[:, start : start + weight.numel()].reshape(count, *weight.shape)
        out[name] = block if root is None else block * root[name]
        start += weight.numel()
    return out
