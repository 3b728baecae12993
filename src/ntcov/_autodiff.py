"""Autodiff primitives over a property and a parameter dict: gradients, JVPs, Jacobian rows.

Shapes: a property's value has shape ``[*S]`` with ``K = prod(S)`` entries; ``P`` is the number of
weights. "Rows" are chunks of the Jacobian ``J`` (``[K, P]``) stored as a dict of per-parameter
blocks ``{name: [c, *param_shape]}``, never concatenated.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntcov.params import ParamDict, as_requires_grad
from ntcov.property import Property, _call

Rows = dict[str, Tensor]


class FallbackWarning(UserWarning):
    """A fast path was unavailable for this model; an exact slower path was used instead."""


def check_output(prop: Property, out: Tensor) -> None:
    """Refuse outputs that are not floating tensors or that do not depend on the parameters."""
    if not isinstance(out, Tensor):
        raise TypeError(f"property {prop.name!r} returned {type(out).__name__}, expected a Tensor.")
    if not out.is_floating_point():
        raise TypeError(
            f"property {prop.name!r} returned a {out.dtype} tensor of shape {list(out.shape)}; "
            "ntcov needs a floating-point output (gradients of integers are undefined)."
        )


def check_depends(prop: Property, out: Tensor) -> None:
    """``out`` was computed from parameters that require grad: it must have a graph."""
    if out.grad_fn is None:
        raise ValueError(
            f"property {prop.name!r} does not depend on the selected parameters: its gradient "
            "is identically zero. Check that fn uses the module passed to it (not a captured "
            "copy), and that params= selects parameters that the property uses."
        )


def evaluate(prop: Property, params: ParamDict) -> tuple[Tensor, ParamDict]:
    """The property with a graph to the leaves ``[*S]``, and those leaves."""
    leaves = as_requires_grad(params)
    with torch.enable_grad():
        out = prop(leaves)
    check_output(prop, out)
    check_depends(prop, out)
    return out, leaves


def gradient(prop: Property, params: ParamDict, *, caller: str) -> tuple[Tensor, ParamDict]:
    """The value and gradient ``∇_w x`` of a scalar property: one backward pass."""
    out, leaves = evaluate(prop, params)
    if out.numel() != 1:
        raise ValueError(
            f"{caller}: {prop.name!r} must be a scalar property, got shape {list(out.shape)}. "
            "Reduce it first (prop.mean() or prop.sum()), or use ntcov() for a matrix."
        )
    grads = torch.autograd.grad(out.reshape(()), list(leaves.values()), allow_unused=True)
    return out.detach(), _fill_unused(leaves, grads)


def _fill_unused(leaves: ParamDict, grads: tuple[Tensor | None, ...]) -> ParamDict:
    return {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(leaves.items(), grads, strict=True)
    }


def composite_attention() -> AbstractContextManager[None]:
    """Run ``scaled_dot_product_attention`` with its composite (math) kernel.

    The fused kernels (flash, memory-efficient) have no double backward, no forward-mode AD and
    no ``vmap`` batching rule; the math kernel is built from ordinary ops and supports all three,
    with the same numbers.
    """
    return sdpa_kernel(SDPBackend.MATH)


def _load_forward_ad() -> None:
    """Import torch's forward-mode decompositions once, silencing its internal deprecation warning.

    The first forward-mode call imports them, which uses ``torch.jit.script`` and warns; under
    ``-W error`` that would abort the import half-way and break every later JVP.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def directional(
    prop: Property, params: ParamDict, tangent: ParamDict, *, force_reverse: bool
) -> tuple[Tensor, Tensor]:
    """``(x(w), J_x v)`` for one tangent ``v``: one forward-mode JVP, shapes ``[*S]`` and ``[*S]``.

    Cost: about three forward passes (the network and its tangent run together). Ops without
    forward-mode AD (fused attention kernels) fall back to the exact double-VJP trick,
    ``J v = ∂/∂u (uᵀ J v)``, with a warning.
    """
    if not force_reverse:
        try:
            return _directional_forward(prop, params, tangent)
        except NotImplementedError as err:
            _warn_fallback(prop, err)
    return _directional_double_vjp(prop, params, tangent)


def _directional_forward(
    prop: Property, params: ParamDict, tangent: ParamDict
) -> tuple[Tensor, Tensor]:
    """Forward-mode AD with dual tensors: each weight carries its tangent through the network."""
    _load_forward_ad()
    with composite_attention(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, tangent[n]) for n, p in params.items()}
        out = prop(duals)
        check_output(prop, out)
        value, jv = fwAD.unpack_dual(out)
    if jv is None:  # no path from the weights to the output
        evaluate(prop, params)  # raises the "does not depend" error
        jv = torch.zeros_like(value)
    return value.detach(), jv.detach()


def _directional_double_vjp(
    prop: Property, params: ParamDict, tangent: ParamDict
) -> tuple[Tensor, Tensor]:
    """``J v`` by reverse-over-reverse: ``g(u) = Jᵀu`` is linear in ``u``; ``∂(g·v)/∂u = J v``."""
    with composite_attention():
        out, leaves = evaluate(prop, params)
    probe = torch.ones_like(out, requires_grad=True)  # any u gives the same J v
    with torch.enable_grad():
        vjps = torch.autograd.grad(
            out, list(leaves.values()), probe, create_graph=True, allow_unused=True
        )
        pairs = [(g, tangent[n]) for n, g in zip(leaves, vjps, strict=True) if g is not None]
        if not pairs:  # depends only on parameters held fixed
            return out.detach(), torch.zeros_like(out).detach()
        inner = torch.stack([(g * t).sum() for g, t in pairs]).sum()
    jv = None
    if inner.requires_grad:
        (jv,) = torch.autograd.grad(inner, probe, allow_unused=True)
    result = torch.zeros_like(out) if jv is None else jv.detach()
    scale = torch.stack([(g * t).abs().sum() for g, t in pairs]).sum() + result.abs().sum()
    _check_linear(prop, inner.detach(), result, scale.detach())
    return out.detach(), result


def _check_linear(prop: Property, inner: Tensor, jv: Tensor, scale: Tensor) -> None:
    """``(Jᵀu)·v = uᵀ(J v)`` for ``u = 1``. A backward pass that is not differentiable (an
    autograd.Function marked ``once_differentiable``) cuts the graph from ``Jᵀu`` to ``u``, so
    part of ``J v`` would be silently missing; that breaks this identity."""
    tolerance = torch.finfo(jv.dtype).eps ** 0.5 * scale
    if (inner - jv.sum()).abs() > tolerance:
        raise RuntimeError(
            f"double-VJP: the backward pass of property {prop.name!r} is not differentiable "
            "(an op without double backward, or an autograd.Function marked "
            "once_differentiable), so J v cannot be computed by reverse-over-reverse. Use "
            "strategy='vjp' (rows by backward passes) instead."
        )


def _warn_fallback(prop: Property, err: Exception) -> None:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    warnings.warn(
        f"forward-mode AD is not available for property {prop.name!r} ({first_line}); using the "
        "exact double-VJP fallback instead (same numbers, about one extra backward pass).",
        FallbackWarning,
        stacklevel=4,
    )


def vjp_rows(prop: Property, params: ParamDict, chunk_size: int) -> Iterator[tuple[int, Rows]]:
    """Jacobian rows of any property by batched VJPs: yields ``(start, {name: [c, *p]})``.

    Cost: one forward, then ``K / c`` backward passes each vectorised over ``c`` cotangents
    (``is_grads_batched``); a plain loop of backward passes where vectorising fails.
    """
    out, leaves = evaluate(prop, params)
    k = out.numel()
    vectorised = True
    for start in range(0, k, chunk_size):
        basis = _basis_rows(out, start, min(chunk_size, k - start))
        if vectorised:
            try:
                grads = torch.autograd.grad(
                    out,
                    list(leaves.values()),
                    basis,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
                yield start, _fill_unused_batched(leaves, grads, basis.shape[0])
                continue
            except (RuntimeError, NotImplementedError) as err:
                _warn_unbatched(prop, "vmap over VJPs", err)
                vectorised = False
        yield start, _rows_by_loop(out, leaves, start, basis.shape[0])


def _basis_rows(out: Tensor, start: int, count: int) -> Tensor:
    """Rows ``start … start + count − 1`` of the ``K×K`` identity, shaped ``[count, *S]``."""
    basis = out.new_zeros(count, out.numel())
    rows = torch.arange(count, device=out.device)
    basis[rows, rows + start] = 1
    return basis.reshape(count, *out.shape)


def _fill_unused_batched(leaves: ParamDict, grads: tuple[Tensor | None, ...], count: int) -> Rows:
    return {
        n: p.new_zeros((count, *p.shape)) if g is None else g
        for (n, p), g in zip(leaves.items(), grads, strict=True)
    }


def _rows_by_loop(out: Tensor, leaves: ParamDict, start: int, count: int) -> Rows:
    flat = out.reshape(-1)
    per_row = [
        _fill_unused(
            leaves,
            torch.autograd.grad(
                flat[i], list(leaves.values()), retain_graph=True, allow_unused=True
            ),
        )
        for i in range(start, start + count)
    ]
    return {n: torch.stack([r[n] for r in per_row]) for n in leaves}


def per_example_rows(
    prop: Property, params: ParamDict, chunk_size: int
) -> Iterator[tuple[int, Rows]]:
    """Jacobian rows of a per-example property by ``vmap(jacrev)`` over examples.

    Each example's row block ``[*item, P]`` costs one small backward pass per item entry, all
    examples of a chunk at once. Falls back to :func:`vjp_rows` when the model cannot be vmapped.
    """
    pe = prop.per_example
    if pe is None:
        raise ValueError(f"property {prop.name!r} has no per-example structure.")
    module = prop.module

    def single(p: ParamDict, *xs: Tensor) -> Tensor:
        return _call(module, p, pe.fn, *(x.unsqueeze(0) for x in xs)).squeeze(0)

    batched = vmap(jacrev(single), in_dims=(None, *([0] * len(pe.inputs))))
    examples_per_chunk = max(1, chunk_size)
    start_row = 0
    for first in range(0, pe.num_examples, examples_per_chunk):
        xs = tuple(x[first : first + examples_per_chunk] for x in pe.inputs)
        try:
            with composite_attention():
                blocks = batched(params, *xs)
        except (RuntimeError, NotImplementedError) as err:
            _warn_unbatched(prop, "per-example vmap", err)
            yield from _rows_from(vjp_rows(prop, params, chunk_size), start_row)
            return
        rows = {n: b.reshape(-1, *params[n].shape) for n, b in blocks.items()}
        yield start_row, rows
        start_row += next(iter(rows.values())).shape[0]


def _rows_from(rows: Iterator[tuple[int, Rows]], first: int) -> Iterator[tuple[int, Rows]]:
    """The chunks of ``rows`` from row ``first`` on (a chunk straddling ``first`` is cut)."""
    for start, chunk in rows:
        count = next(iter(chunk.values())).shape[0]
        if start + count <= first:
            continue
        skip = max(0, first - start)
        yield start + skip, {n: block[skip:] for n, block in chunk.items()}


def _warn_unbatched(prop: Property, what: str, err: Exception) -> None:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    warnings.warn(
        f"{what} failed for property {prop.name!r} ({first_line}); computing the same rows "
        "with a loop of backward passes instead (exact, slower).",
        FallbackWarning,
        stacklevel=4,
    )


def contract(rows_a: Rows, rows_b: Rows) -> Tensor:
    """``J_a J_bᵀ`` for two row chunks: ``[c, d] = Σ_blocks A_l B_lᵀ``."""
    total: Tensor | None = None
    for name, block_a in rows_a.items():
        part = (
            block_a.reshape(block_a.shape[0], -1)
            @ rows_b[name].reshape(rows_b[name].shape[0], -1).T
        )
        total = part if total is None else total + part
    if total is None:
        raise ValueError("contract: no parameters selected.")
    return total


def contract_rowwise(rows_a: Rows, rows_b: Rows) -> Tensor:
    """``A_i · B_i`` for each row ``i`` of two chunks of equal length, ``[c]``."""
    dots = [(block * rows_b[n]).reshape(block.shape[0], -1).sum(1) for n, block in rows_a.items()]
    return torch.stack(dots).sum(0)
