"""Autodiff primitives over a property and a parameter dict: gradients, JVPs, Jacobian rows.

Shapes: a property's value has shape ``[*S]`` with ``K = prod(S)`` entries; ``P`` is the number of
weights. "Rows" are chunks of the Jacobian ``J`` (``[K, P]``) stored as a dict of per-parameter
blocks ``{name: [c, *param_shape]}``, never concatenated.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntcov.params import ParamDict, as_requires_grad
from ntcov.property import PerExample, Property, _call, check_is_tensor

Rows = dict[str, Tensor]


class FallbackWarning(UserWarning):
    """A fast path was unavailable for this model; an exact slower path was used instead."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_WARNED: ContextVar[set[tuple[str, str]] | None] = ContextVar("ntcov_warned", default=None)


@contextmanager
def one_warning_per_cause() -> Iterator[None]:
    """Inside the block, each fallback cause (kind, property) warns at most once.

    The public functions run in this block, so one ``ntcov`` call that falls back for each of
    its ``m`` JVP columns or row chunks emits one warning, not ``m``. Nested blocks share the
    outermost one's record.
    """
    if _WARNED.get() is not None:
        yield
        return
    token = _WARNED.set(set())
    try:
        yield
    finally:
        _WARNED.reset(token)


def _warn(kind: str, prop: Property, message: str) -> None:
    """Emit a :class:`FallbackWarning`, once per ``(kind, property)`` in a public call, pointing
    at the user's line (the first frame outside this package)."""
    warned, cause = _WARNED.get(), (kind, str(prop.name))
    if warned is not None:
        if cause in warned:
            return
        warned.add(cause)
    warnings.warn(message, FallbackWarning, stacklevel=_stacklevel_outside_package())


def _stacklevel_outside_package() -> int:
    level, frame = 2, sys._getframe(2)  # 1 is _warn itself
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    return level


def refuse_inference_mode(caller: str) -> None:
    """ntcov needs autograd; ``torch.inference_mode`` switches it off for good inside its block."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{caller}: torch.inference_mode() is active, and ntcov needs autograd, which "
            "inference mode switches off. Call it outside inference mode (inside "
            "torch.no_grad() is fine)."
        )


def check_output(prop: Property, out: Tensor) -> None:
    """Refuse outputs that are not floating tensors."""
    check_is_tensor(prop, out)
    if out.is_complex():
        raise TypeError(
            f"property {prop.name!r} returned a {out.dtype} tensor of shape {list(out.shape)}; "
            "ntcov needs a real output: return its real and imaginary parts, or .abs()."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"property {prop.name!r} returned a {out.dtype} tensor of shape {list(out.shape)}; "
            "ntcov needs a floating-point output (gradients of integers are undefined)."
        )


def not_dependent(prop: Property) -> ValueError:
    """The error for a property whose graph does not reach any selected parameter."""
    return ValueError(
        f"property {prop.name!r} does not depend on the selected parameters: its gradient "
        "is identically zero. Check that fn uses the module passed to it (not a captured "
        "copy or another model), and that params= selects parameters that the property uses."
    )


def check_depends(prop: Property, out: Tensor) -> None:
    """Quick check: ``out`` was computed from leaves that require grad, so it needs a graph.

    Not sufficient on its own (the graph may reach only other tensors that require grad, such
    as weights held fixed or inputs); :func:`check_grads` decides from the gradients.
    """
    if out.grad_fn is None:
        raise not_dependent(prop)


def check_grads(prop: Property, grads: Sequence[Tensor | None]) -> None:
    """Gradients w.r.t. the selected leaves (``allow_unused=True``) are all ``None`` exactly when
    the property's graph reaches none of them."""
    if all(g is None for g in grads):
        raise not_dependent(prop)


def evaluate(prop: Property, params: ParamDict) -> tuple[Tensor, ParamDict]:
    """The property with a graph to the leaves ``[*S]``, and those leaves."""
    refuse_inference_mode(f"property {prop.name!r}")
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
    with torch.enable_grad():
        scalar = out.reshape(())
    grads = torch.autograd.grad(scalar, list(leaves.values()), allow_unused=True)
    check_grads(prop, grads)
    return out.detach(), _fill_unused(leaves, grads)


def _fill_unused(leaves: ParamDict, grads: Sequence[Tensor | None]) -> ParamDict:
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


@functools.cache
def _load_forward_ad() -> None:
    """Import torch's forward-mode decompositions once, silencing its internal deprecation warning.

    The first forward-mode call imports them, which uses ``torch.jit.script`` and warns; under
    ``-W error`` that would abort the import half-way and break every later JVP. Cached: entering
    ``catch_warnings`` resets Python's once-per-location warning registry, so doing it on every
    call would repeat every warning.
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
    ``J v = ∂/∂u (uᵀ J v)``, with a warning; ops without double backward either
    (``nn.EmbeddingBag``) to ``J``'s rows by ``K`` backward passes, with a warning.
    ``force_reverse`` (the ``double_vjp`` strategy) uses the double-VJP trick or fails.
    """
    value, (column,) = _directional_values(prop, params, [tangent], force_reverse=force_reverse)
    return value, column


def directions(
    prop: Property, params: ParamDict, tangents: Iterable[ParamDict], *, force_reverse: bool
) -> list[Tensor]:
    """``J_x v`` for each tangent ``v`` (each ``[*S]``), as :func:`directional`.

    Once a method has failed for one tangent, the others go straight to the next fallback: one
    warning and one failed attempt, not one per tangent.
    """
    listed = list(tangents)
    if not listed:
        return []
    return _directional_values(prop, params, listed, force_reverse=force_reverse)[1]


def _directional_values(
    prop: Property, params: ParamDict, tangents: list[ParamDict], *, force_reverse: bool
) -> tuple[Tensor, list[Tensor]]:
    """``x(w)`` and ``J_x v`` per tangent (at least one), trying forward mode, then the
    double-VJP trick, then Jacobian rows (see :func:`directional`)."""
    refuse_inference_mode(f"property {prop.name!r}")
    value = torch.empty(0)  # set by the first tangent
    columns: list[Tensor] = []
    method = "double_vjp" if force_reverse else "forward"
    for index, tangent in enumerate(tangents):
        if method == "forward":
            try:
                value, column = _directional_forward(prop, params, tangent)
                columns.append(column)
                continue
            except NotImplementedError as err:
                _warn_fallback(prop, err)
                method = "double_vjp_fallback"
        if method != "rows":
            try:
                value, column = _directional_double_vjp(prop, params, tangent)
                columns.append(column)
                continue
            except NotTwiceDifferentiable as err:
                if method == "double_vjp":  # asked for explicitly
                    raise
                _warn_rows_fallback(prop, err)
                method = "rows"
        value, rest = _directional_rows(prop, params, tangents[index:])
        columns += rest
        break
    return value, columns


def _directional_rows(
    prop: Property, params: ParamDict, tangents: list[ParamDict]
) -> tuple[Tensor, list[Tensor]]:
    """``x(w)`` and ``J v`` per tangent from the rows of ``J`` (``K`` backward passes, chunked
    under the default row budget): ``(J v)_k = Σ_blocks J_k · v``."""
    out = evaluate(prop, params)[0].detach()
    chunk = max(1, ROWS_PER_CHUNK)
    columns = [torch.zeros(out.numel(), dtype=out.dtype, device=out.device) for _ in tangents]
    for start, rows in vjp_rows(prop, params, chunk):
        for column, tangent in zip(columns, tangents, strict=True):
            count = next(iter(rows.values())).shape[0]
            products = [(rows[n].reshape(count, -1) @ tangent[n].reshape(-1)) for n in rows]
            column[start : start + count] = torch.stack(products).sum(0)
    return out, [c.reshape(out.shape) for c in columns]


ROWS_PER_CHUNK = 64  # Jacobian rows held at once by the last-resort JVP (_directional_rows)


class NotTwiceDifferentiable(RuntimeError):
    """The property's backward pass has no derivative of its own (no double backward)."""


def _warn_rows_fallback(prop: Property, err: Exception) -> None:
    _warn(
        "double-backward",
        prop,
        f"neither forward-mode AD nor double backward is available for property {prop.name!r} "
        f"({_first_line(err.__cause__ or err)}); computing J v from the Jacobian's rows instead "
        "(same numbers, one backward pass per entry of the property).",
    )


def _directional_forward(
    prop: Property, params: ParamDict, tangent: ParamDict
) -> tuple[Tensor, Tensor]:
    """Forward-mode AD with dual tensors: each weight carries its tangent through the network.

    The output has no tangent exactly when no selected weight reaches it: that is the
    dependence check, at no extra cost.
    """
    _load_forward_ad()
    with composite_attention(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, tangent[n]) for n, p in params.items()}
        out = prop(duals)
        check_output(prop, out)
        value, jv = fwAD.unpack_dual(out)
    if jv is None:
        raise not_dependent(prop)
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
        check_grads(prop, vjps)
        pairs = [(g, tangent[n]) for n, g in zip(leaves, vjps, strict=True) if g is not None]
        inner = torch.stack([(g * t).sum() for g, t in pairs]).sum()
    jv = None
    if inner.requires_grad:
        try:
            (jv,) = torch.autograd.grad(inner, probe, allow_unused=True)
        except (RuntimeError, NotImplementedError) as err:
            raise _not_twice_differentiable(prop, err) from err
    result = torch.zeros_like(out) if jv is None else jv.detach()
    scale = torch.stack([(g * t).abs().sum() for g, t in pairs]).sum() + result.abs().sum()
    _check_linear(prop, inner.detach(), result, scale.detach())
    return out.detach(), result


def _not_twice_differentiable(prop: Property, err: Exception) -> NotTwiceDifferentiable:
    return NotTwiceDifferentiable(
        f"double-VJP: the backward pass of property {prop.name!r} is not differentiable "
        f"({_first_line(err)}), so J v cannot be computed by reverse-over-reverse. Use "
        "strategy='vjp' (rows by backward passes), or the default strategy, which falls back "
        "to them."
    )


def _check_linear(prop: Property, inner: Tensor, jv: Tensor, scale: Tensor) -> None:
    """``(Jᵀu)·v = uᵀ(J v)`` for ``u = 1``. A backward pass that is not differentiable (an
    autograd.Function marked ``once_differentiable``) cuts the graph from ``Jᵀu`` to ``u``, so
    part of ``J v`` would be silently missing; that breaks this identity."""
    tolerance = torch.finfo(jv.dtype).eps ** 0.5 * scale
    if (inner - jv.sum()).abs() > tolerance:
        raise NotTwiceDifferentiable(
            f"double-VJP: the backward pass of property {prop.name!r} is not differentiable "
            "(an op without double backward, or an autograd.Function marked "
            "once_differentiable), so J v cannot be computed by reverse-over-reverse. Use "
            "strategy='vjp' (rows by backward passes) instead."
        )


def _warn_fallback(prop: Property, err: Exception) -> None:
    _warn(
        "forward-mode",
        prop,
        f"forward-mode AD is not available for property {prop.name!r} ("
        f"{_custom_function(err)}{_first_line(err)}); using the exact double-VJP fallback "
        "instead (same numbers, about one extra backward pass).",
    )


def _custom_function(err: Exception) -> str:
    """``"in MyFunction: "`` when ``err`` was raised inside a custom ``autograd.Function`` (its
    ``apply`` frame holds the class), else ``""``: torch's message does not name it."""
    tb = err.__traceback__
    found = ""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("cls") if tb.tb_frame.f_code.co_name == "apply" else None
        if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
            found = f"in {owner.__name__}: "
        tb = tb.tb_next
    return found


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def vjp_rows(prop: Property, params: ParamDict, chunk_size: int) -> Iterator[tuple[int, Rows]]:
    """Jacobian rows of any property by batched VJPs: yields ``(start, {name: [c, *p]})``.

    Cost: one forward, then ``K / c`` backward passes each vectorised over ``c`` cotangents
    (``is_grads_batched``); a plain loop of backward passes where vectorising fails. The first
    chunk's gradients also decide whether the property depends on the selected weights.
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
            except (RuntimeError, NotImplementedError) as err:
                _warn_unbatched(prop, "vmap over VJPs", err)
                vectorised = False
            else:
                if start == 0:
                    check_grads(prop, grads)
                yield start, _fill_unused_batched(leaves, grads, basis.shape[0])
                continue
        yield start, _rows_by_loop(prop, out, leaves, start, basis.shape[0])


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


def _rows_by_loop(prop: Property, out: Tensor, leaves: ParamDict, start: int, count: int) -> Rows:
    with torch.enable_grad():
        flat = out.reshape(-1)
        entries = [flat[i] for i in range(start, start + count)]
    per_row = []
    for entry in entries:
        grads = torch.autograd.grad(
            entry, list(leaves.values()), retain_graph=True, allow_unused=True
        )
        check_grads(prop, grads)  # the same for every entry: all share out's graph
        per_row.append(_fill_unused(leaves, grads))
    return {n: torch.stack([r[n] for r in per_row]) for n in leaves}


def per_example_rows(
    prop: Property, params: ParamDict, chunk_size: int
) -> Iterator[tuple[int, Rows]]:
    """Jacobian rows of a per-example property by ``vmap(jacrev)`` over examples.

    Each example's row block ``[*item, P]`` costs one small backward pass per item entry, all
    examples of a chunk at once (about ``chunk_size`` rows per chunk). Every chunk's per-example
    values are checked against the batch evaluation (rows that depend on other examples, or an
    example axis that is not dim 0, would make these rows wrong): on the first chunk a mismatch
    falls back to :func:`vjp_rows` with a warning, on a later one it raises ``ValueError``.
    Falls back to :func:`vjp_rows` too when the model cannot be vmapped.
    """
    pe = prop.per_example
    if pe is None:
        raise ValueError(f"property {prop.name!r} has no per-example structure.")
    batch = _checked_batch_value(prop, params)
    agree = _agreement(batch, pe.num_examples)
    examples_per_chunk = max(1, chunk_size // max(1, batch.numel() // max(1, pe.num_examples)))
    jacobian_and_value = _per_example_jacobian(prop, pe)
    start_row = 0
    for first in range(0, pe.num_examples, examples_per_chunk):
        xs = tuple(x[first : first + examples_per_chunk] for x in pe.inputs)
        try:
            with composite_attention():
                blocks, values = jacobian_and_value(params, *xs)
        except (RuntimeError, NotImplementedError) as err:
            _warn_unbatched(prop, "per-example vmap", err)
            yield from _rows_from(vjp_rows(prop, params, chunk_size), start_row)
            return
        if not agree(values, first):
            if first > 0:
                raise _rows_disagree(prop, first, first + values.shape[0])
            _warn_rows_differ(prop)
            yield from vjp_rows(prop, params, chunk_size)
            return
        rows = {n: b.reshape(-1, *params[n].shape) for n, b in blocks.items()}
        yield start_row, rows
        start_row += next(iter(rows.values())).shape[0]


def _checked_batch_value(prop: Property, params: ParamDict) -> Tensor:
    """The property's batch value ``[N, *item]``, once its graph is known to reach the selected
    weights (one backward pass: per-example Jacobians cannot tell "unused" from "zero")."""
    out, leaves = evaluate(prop, params)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out), allow_unused=True)
    check_grads(prop, grads)
    return out.detach()


def _per_example_jacobian(prop: Property, pe: PerExample) -> Callable[..., tuple[Rows, Tensor]]:
    """``(params, *xs) -> ({name: [c, *item, *p]}, values [c, *item])`` by ``vmap(jacrev)``."""
    module = prop.module

    def single(p: ParamDict, *xs: Tensor) -> tuple[Tensor, Tensor]:
        out = _call(module, p, pe.fn, *(x.unsqueeze(0) for x in xs), name=str(prop.name)).squeeze(0)
        return out, out

    return vmap(jacrev(single, has_aux=True), in_dims=(None, *([0] * len(pe.inputs))))


def _agreement(batch: Tensor, num_examples: int) -> Callable[[Tensor, int], bool]:
    """``agree(values, first)``: whether per-example values ``[c, *item]`` equal rows
    ``first … first + c − 1`` of the batch value, up to ``√eps`` of the dtype (relative, and of
    the largest finite magnitude): reduction orders differ, mixing examples does far more."""
    if batch.dim() == 0 or batch.shape[0] != num_examples:
        return lambda values, first: False
    tolerance = torch.finfo(batch.dtype).eps ** 0.5
    finite = batch.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    scale = float(finite.amax()) if batch.numel() else 0.0

    def agree(values: Tensor, first: int) -> bool:
        expected = batch[first : first + values.shape[0]]
        return values.shape == expected.shape and torch.allclose(
            values.to(batch.dtype),
            expected,
            rtol=tolerance,
            atol=tolerance * scale,
            equal_nan=True,
        )

    return agree


def _warn_rows_differ(prop: Property) -> None:
    _warn(
        "per-example rows",
        prop,
        f"per-example rows of property {prop.name!r} differ from its batch evaluation: its rows "
        "depend on other examples of the batch (batch statistics, centring over the batch, "
        "broadcasting between examples), or dim 0 of its inputs is not the example axis. "
        "Computing its rows with batched VJPs instead (exact, slower; strategy='vjp' skips "
        "this attempt).",
    )


def _rows_disagree(prop: Property, first: int, stop: int) -> ValueError:
    return ValueError(
        f"per-example rows of property {prop.name!r} for examples {first}..{stop - 1} differ "
        "from its batch evaluation, although the first examples agreed. Row i of a per-example "
        "property must depend on example i only, with dim 0 of every input the example axis "
        "(see Property.from_per_example). Use strategy='vjp' for a property without this "
        "structure."
    )


def _rows_from(rows: Iterator[tuple[int, Rows]], first: int) -> Iterator[tuple[int, Rows]]:
    """The chunks of ``rows`` from row ``first`` on (a chunk straddling ``first`` is cut)."""
    for start, chunk in rows:
        count = next(iter(chunk.values())).shape[0]
        if start + count <= first:
            continue
        skip = max(0, first - start)
        yield start + skip, {n: block[skip:] for n, block in chunk.items()}


def _warn_unbatched(prop: Property, what: str, err: Exception) -> None:
    _warn(
        what,
        prop,
        f"{what} failed for property {prop.name!r} ({_first_line(err)}); computing the same "
        "rows with backward passes instead (exact, slower).",
    )


def accumulating(block: Tensor) -> Tensor:
    """``block`` in at least float32: sums of products of bf16/fp16 gradients lose too much."""
    if block.is_floating_point() and block.dtype.itemsize < 4:
        return block.float()
    return block


def contract(rows_a: Rows, rows_b: Rows) -> Tensor:
    """``J_a J_bᵀ`` for two row chunks: ``[c, d] = Σ_blocks A_l B_lᵀ`` (float32 or wider)."""
    total: Tensor | None = None
    for name, block_a in rows_a.items():
        part = (
            accumulating(block_a).reshape(block_a.shape[0], -1)
            @ accumulating(rows_b[name]).reshape(rows_b[name].shape[0], -1).T
        )
        total = part if total is None else total + part
    if total is None:
        raise ValueError("contract: no parameters selected.")
    return total


def contract_rowwise(rows_a: Rows, rows_b: Rows) -> Tensor:
    """``A_i · B_i`` for each row ``i`` of two chunks of equal length, ``[c]``."""
    dots = [
        (accumulating(block) * accumulating(rows_b[n])).reshape(block.shape[0], -1).sum(1)
        for n, block in rows_a.items()
    ]
    return torch.stack(dots).sum(0)
