"""The covariance engine: ntcov, ntvar and Price's rate, with exact strategies behind an enum.

For properties ``a`` (``[*S_a]``, ``A`` entries) and ``b`` (``[*S_b]``, ``B`` entries) of the same
module, with Jacobians ``J_a`` (``[A, P]``) and ``J_b`` (``[B, P]``) with respect to the weights:

    ntcov(a, b) = J_a J_bᵀ          shape [*S_a, *S_b]
    ntcov_M(a, b) = J_a M J_bᵀ      with a diagonal metric M (``metric=``, e.g. an optimizer's)
    ntvar(a)    = diag J_a J_aᵀ      shape [*S_a]
    rate(x, L)  = ntcov(x, −L)      shape [*S_x]    (Price's equation under gradient flow)

Strategies (all exact; ``LOOP`` is the brute-force reference):

- ``JVP``: when one side is small (``m`` entries): ``m`` backward passes for its gradients, then
  ``m`` forward-mode JVPs of the other side. ``rate`` is one backward + one JVP, whatever ``K``.
- ``DOUBLE_VJP``: the same with each JVP computed by reverse-over-reverse (the automatic fallback
  when an op has no forward-mode AD).
- ``PER_EXAMPLE``: rows of a property built with per-example structure come from ``vmap(jacrev)``
  over examples; best for K×K matrices of per-example properties.
- ``STRUCTURED``: for two per-example properties, per-layer rules that never form per-example
  gradients of ``nn.Linear``/``Conv1d``/``Conv2d``/``nn.Embedding`` weights (for ``y = W h``:
  ``∇p_i·∇q_j = Σ_{t,s} (δ_it·δ'_js)(h_it·h'_js)``), per-example gradients for the other
  parameters; a per-layer cost model picks the cheaper rule (see :mod:`ntcov.structured`).
  Falls back to ``PER_EXAMPLE`` with a warning when it cannot be used; ``ntvar`` uses
  ``PER_EXAMPLE`` rows.
- ``VJP``: Jacobian rows by batched VJPs in chunks under ``memory_budget``, contracted per block.
- ``AUTO``: JVP if the smaller side has at most 16 entries, else STRUCTURED when both sides have
  per-example structure and its cost model (found from one example's forward pass) predicts it
  cheaper than PER_EXAMPLE, else PER_EXAMPLE when either side has, else VJP.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterator
from enum import Enum
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from ntcov import _autodiff, _safeguards
from ntcov._choice import as_choice
from ntcov.params import (
    ParamDict,
    ParamSelection,
    check_mode,
    mixes_examples,
    num_params,
    select_params,
)
from ntcov.property import Property, different_modules
from ntcov.reference import ntcov_loop
from ntcov.structured import (
    StructuredUnavailable,
    cheaper_than_per_example,
    discovery_cache,
    structured_ntcov,
)

__all__ = ["Strategy", "ntcov", "ntvar", "rate"]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for Jacobian rows held at once
JVP_MAX_SMALL_SIDE = 16


class Strategy(str, Enum):
    """How ntcov is computed; see the module docstring for when each is fast.

    Strings are matched without regard to case: ``Strategy("AUTO") is Strategy.AUTO``.
    """

    AUTO = "auto"
    JVP = "jvp"
    DOUBLE_VJP = "double_vjp"
    PER_EXAMPLE = "per_example"
    STRUCTURED = "structured"
    VJP = "vjp"
    LOOP = "loop"

    @classmethod
    def _missing_(cls, value: object) -> Strategy | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None


Result = TypeVar("Result")
Params = ParamSpec("Params")


def _with_autograd(fn: Callable[Params, Result]) -> Callable[Params, Result]:
    """Run a public function with autograd on (it works inside ``torch.no_grad()``), refusing
    ``torch.inference_mode()``, with at most one fallback warning per cause."""

    @functools.wraps(fn)
    def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        _autodiff.refuse_inference_mode(fn.__name__)
        with torch.enable_grad(), _autodiff.one_warning_per_cause(), discovery_cache():
            return fn(*args, **kwargs)

    return wrapper


@_with_autograd
def ntcov(
    a: Property,
    b: Property,
    *,
    params: ParamSelection = None,
    strategy: Strategy | str = Strategy.AUTO,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    metric: ParamDict | None = None,
) -> Tensor:
    """Neural tangent covariance ``J_a J_bᵀ`` of two properties, shape ``a.shape + b.shape``.

    ``params`` selects the weights to differentiate (parameter or submodule names, or
    submodules); the others are held fixed. ``memory_budget`` (bytes) bounds the Jacobian rows
    held at once by the row-based strategies. ``metric`` (a dict of tensors shaped like the
    selected parameters) gives ``J_a diag(M) J_bᵀ``, the covariance under an optimizer's metric.
    Works inside ``torch.no_grad()``; an empty property gives an empty result. For bf16/fp16
    models the result is float32 whatever the strategy (the row strategies also accumulate in
    float32).
    """
    chosen, weights = _prepare("ntcov", a, b, params, strategy)
    _check_metric("ntcov", metric, weights)
    budget = _check_memory_budget("ntcov", memory_budget)
    value_a = _checked_value(a, "ntcov", weights)
    values = (value_a, value_a if b is a else _checked_value(b, "ntcov", weights))
    shapes = (values[0].shape, values[1].shape)
    if shapes[0].numel() == 0 or shapes[1].numel() == 0:
        return _empty(shapes[0] + shapes[1], *values)
    _check_result_fits("ntcov", shapes[0] + shapes[1], values[0])
    if chosen is Strategy.LOOP:
        _check_loop_fits((a, b), shapes, weights)
        loop = _autodiff.accumulating(ntcov_loop(a, b, params=params, metric=metric))
        return _safeguards.check_finite_result("ntcov", loop, (a, b), weights)
    if chosen is Strategy.AUTO:
        chosen = _auto(a, b, shapes, weights, metric)
    if chosen in (Strategy.JVP, Strategy.DOUBLE_VJP):
        reverse = chosen is Strategy.DOUBLE_VJP
        out = _ntcov_jvp(a, b, weights, shapes, metric, force_reverse=reverse)
    elif chosen is Strategy.STRUCTURED:
        out = _ntcov_structured(a, b, weights, budget, metric, values)
    else:
        chunk = _rows_per_chunk(weights, budget)
        out = _ntcov_rows(a, b, weights, chosen, chunk, metric)
    out = out.reshape(shapes[0] + shapes[1])  # a tuple: both may be scalars
    out = _autodiff.accumulating(out)  # the same dtype whichever strategy ran
    return _safeguards.check_finite_result("ntcov", out, (a, b), weights)


@_with_autograd
def ntvar(
    a: Property,
    *,
    params: ParamSelection = None,
    strategy: Strategy | str = Strategy.AUTO,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    metric: ParamDict | None = None,
) -> Tensor:
    """Neural tangent variance ``‖∇_w a_k‖²`` (``∇a_k · M ∇a_k`` with ``metric``), ``a.shape``.

    Only the diagonal is computed: rows of ``J_a`` in chunks, never the ``K×K`` matrix
    (except for the ``JVP``/``LOOP`` strategies, which take the diagonal of ``ntcov(a, a)``).
    """
    chosen, weights = _prepare("ntvar", a, a, params, strategy)
    _check_metric("ntvar", metric, weights)
    budget = _check_memory_budget("ntvar", memory_budget)
    value = _checked_value(a, "ntvar", weights)
    shape = value.shape
    if shape.numel() == 0:
        return _empty(shape, value, value)
    if chosen in (Strategy.LOOP, Strategy.JVP, Strategy.DOUBLE_VJP):
        full = ntcov(a, a, params=params, strategy=chosen, metric=metric)
        return torch.diagonal(full.reshape(shape.numel(), shape.numel())).reshape(shape)
    if chosen is Strategy.AUTO:
        chosen = Strategy.PER_EXAMPLE if a.per_example is not None else Strategy.VJP
    rows = _row_source(a, chosen)
    chunk = _rows_per_chunk(weights, budget)
    parts = [_autodiff.contract_rowwise(r, _scaled(r, metric)) for _, r in rows(a, weights, chunk)]
    result = torch.cat(parts).reshape(shape).detach()
    return _safeguards.check_finite_result("ntvar", result, (a,), weights)


@_with_autograd
def rate(
    x: Property,
    loss: Property,
    *,
    params: ParamSelection = None,
    strategy: Strategy | str = Strategy.AUTO,
    metric: ParamDict | None = None,
) -> Tensor:
    """Price's equation under gradient flow: ``dx/dt = ntcov(x, U)`` with ``U = −loss``.

    ``loss`` must be a scalar property; the result has shape ``x.shape``. With the default
    strategy this is one backward pass of ``loss`` and one forward-mode JVP of ``x``
    (cost ≈ one training gradient + two to three forward passes), for any number of entries.
    Multiply by the learning rate ``η`` for the first-order change of one SGD step; with
    ``metric`` (diagonal ``M``) it is ``J_x M (−∇L)``, the change under ``Δw = −M ∇L``.
    """
    chosen, weights = _prepare("rate", x, loss, params, strategy)
    _check_metric("rate", metric, weights)
    if chosen in (Strategy.AUTO, Strategy.JVP, Strategy.DOUBLE_VJP):
        loss_value, grad = _autodiff.gradient(loss, weights, caller="rate")
        _safeguards.check_finite_value("rate", loss, loss_value, weights)
        ascent = {n: -g for n, g in _scaled(grad, metric).items()}
        force = chosen is Strategy.DOUBLE_VJP
        value, change = _autodiff.directional(x, weights, ascent, force_reverse=force)
        _safeguards.check_finite_value("rate", x, value, weights)
        return _safeguards.check_finite_result("rate", change, (x, loss), weights)
    scalar = _scalar_loss(loss, weights)
    covariance = ntcov(x, scalar, params=params, strategy=chosen, metric=metric)
    return -covariance.reshape(x.shape)


def _checked_value(prop: Property, caller: str, weights: ParamDict) -> Tensor:
    """The property's value (its shape and dtype), checked to be a finite floating tensor."""
    value = prop.value()
    _autodiff.check_output(prop, value)
    _safeguards.check_finite_value(caller, prop, value, weights)
    return value


def _check_result_fits(caller: str, shape: torch.Size, value: Tensor) -> None:
    """Refuse up front a result larger than the free memory of its device."""
    fix = "compute it in blocks (ntcov(a[i:j], b)), or ntvar(a) for the diagonal of ntcov(a, a)."
    _safeguards.check_fits(caller, "the result", shape, value.dtype, value.device, fix)


def _check_loop_fits(
    props: tuple[Property, Property], shapes: tuple[torch.Size, torch.Size], weights: ParamDict
) -> None:
    """The ``LOOP`` reference holds each full Jacobian ``[K, P]``: refuse those that cannot fit."""
    first = next(iter(weights.values()))
    fix = "use strategy='vjp' (Jacobian rows in chunks under memory_budget)."
    for prop, shape in zip(props, shapes, strict=True):
        what = f"strategy='loop' holds the full Jacobian of {prop.name!r}, which"
        size = (shape.numel(), num_params(weights))
        _safeguards.check_fits("ntcov", what, size, first.dtype, first.device, fix)


def _empty(shape: torch.Size, a: Tensor, b: Tensor) -> Tensor:
    """The result when one side has no entries: zeros of ``shape`` (which has no entries)."""
    empty = torch.zeros(shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    return _autodiff.accumulating(empty)


def _check_memory_budget(caller: str, memory_budget: object) -> int:
    """``memory_budget`` as an int: ints and integral floats (``1e9``) are accepted."""
    if isinstance(memory_budget, float) and memory_budget.is_integer():
        memory_budget = int(memory_budget)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise TypeError(
            f"{caller}: memory_budget must be a whole number of bytes (an int such as 1 << 30, "
            f"or an integral float such as 1e9), got {memory_budget!r}."
        )
    if memory_budget <= 0:
        raise ValueError(
            f"{caller}: memory_budget must be a positive number of bytes, got {memory_budget}."
        )
    return int(memory_budget)


def _scaled(rows: ParamDict, metric: ParamDict | None) -> ParamDict:
    """``M ⊙ v`` per parameter block (``M`` broadcasts over leading row dimensions)."""
    if metric is None:
        return rows
    return {n: r * metric[n] for n, r in rows.items()}


def _check_metric(caller: str, metric: ParamDict | None, weights: ParamDict) -> None:
    if metric is None:
        return
    for name, weight in weights.items():
        if name not in metric:
            raise ValueError(f"{caller}: metric has no entry for parameter {name!r}.")
        if metric[name].shape != weight.shape:
            raise ValueError(
                f"{caller}: metric[{name!r}] has shape {list(metric[name].shape)}, expected the "
                f"parameter's shape {list(weight.shape)} (a diagonal metric)."
            )


def _scalar_loss(loss: Property, weights: ParamDict) -> Property:
    value, _ = _autodiff.gradient(loss, weights, caller="rate")  # a clear error if not scalar
    _safeguards.check_finite_value("rate", loss, value, weights)
    return loss.map(lambda v: v.reshape(()), loss.name)


def _prepare(
    caller: str, a: Property, b: Property, params: ParamSelection, strategy: Strategy | str
) -> tuple[Strategy, ParamDict]:
    for prop in (a, b):
        if not isinstance(prop, Property):
            raise TypeError(
                f"{caller}: expected ntcov.Property arguments, got {type(prop).__name__}. "
                "Wrap a function of the model as ntcov.Property(model, lambda m: ...)."
            )
    if a.module is not b.module:
        raise ValueError(
            f"{caller}: both properties must be functions of the same module; got "
            f"{different_modules(a.module, b.module)}."
        )
    for prop in (a, b):
        check_mode(prop.module, allow_train_mode=prop.allow_train_mode)
    return _as_strategy(caller, strategy), select_params(a.module, params)


def _as_strategy(caller: str, strategy: Strategy | str) -> Strategy:
    return as_choice(Strategy, strategy, caller, "strategy")


def _auto(
    a: Property,
    b: Property,
    shapes: tuple[torch.Size, torch.Size],
    weights: ParamDict,
    metric: ParamDict | None,
) -> Strategy:
    if min(shapes[0].numel(), shapes[1].numel()) <= JVP_MAX_SMALL_SIDE:
        return Strategy.JVP
    both = _structured_applies(a) and _structured_applies(b)
    if both and cheaper_than_per_example(a, b, weights, metric):  # one example's pass each
        return Strategy.STRUCTURED
    if a.per_example is not None or b.per_example is not None:
        return Strategy.PER_EXAMPLE
    return Strategy.VJP


def _ntcov_jvp(
    a: Property,
    b: Property,
    weights: ParamDict,
    shapes: tuple[torch.Size, torch.Size],
    metric: ParamDict | None,
    *,
    force_reverse: bool,
) -> Tensor:
    """Gradients of the smaller side, then JVPs of the larger side along each: ``[A, B]``.

    The gradients are held ``JVP_MAX_SMALL_SIDE`` at a time (not all ``m`` at once)."""
    small_is_b = shapes[1].numel() <= shapes[0].numel()
    small, large = (b, a) if small_is_b else (a, b)
    columns: list[Tensor] = []
    for _, rows in _autodiff.vjp_rows(small, weights, JVP_MAX_SMALL_SIDE):
        count = next(iter(rows.values())).shape[0]
        tangents = [_scaled({n: r[i] for n, r in rows.items()}, metric) for i in range(count)]
        columns += _autodiff.directions(large, weights, tangents, force_reverse=force_reverse)
    stacked = torch.stack(columns).reshape(len(columns), -1)  # [m, K_large]
    return stacked.T if small_is_b else stacked


RowSource = Callable[[Property, ParamDict, int], Iterator[tuple[int, _autodiff.Rows]]]


def _row_source(prop: Property, strategy: Strategy) -> RowSource:
    # batch statistics (BatchNorm in training mode) break the per-example structure
    per_example = prop.per_example is not None and not mixes_examples(prop.module)
    if strategy in (Strategy.PER_EXAMPLE, Strategy.STRUCTURED) and per_example:
        return _autodiff.per_example_rows
    return _autodiff.vjp_rows


def _structured_applies(prop: Property) -> bool:
    return prop.per_example is not None and not mixes_examples(prop.module)


def _ntcov_structured(
    a: Property,
    b: Property,
    weights: ParamDict,
    budget: int,
    metric: ParamDict | None,
    values: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``J_a M J_bᵀ`` (``[A, B]``) by the structured layer rules, or by per-example rows (with a
    warning saying why) when they cannot be used. ``values``: the batch values, if known."""
    try:
        if not (_structured_applies(a) and _structured_applies(b)):
            missing = a if not _structured_applies(a) else b
            raise StructuredUnavailable(
                f"property {missing.name!r} has no per-example structure (or its module mixes "
                "the examples of a batch)"
            )
        return structured_ntcov(a, b, weights, budget, metric, values)
    except StructuredUnavailable as reason:
        _autodiff._warn(
            "structured",
            a,
            f"the structured strategy is not available for ntcov({a.name!r}, {b.name!r}): "
            f"{reason}; using per-example gradients instead (exact, slower).",
        )
    chunk = _rows_per_chunk(weights, budget)
    return _ntcov_rows(a, b, weights, Strategy.PER_EXAMPLE, chunk, metric)


def _ntcov_rows(
    a: Property,
    b: Property,
    weights: ParamDict,
    strategy: Strategy,
    chunk: int,
    metric: ParamDict | None,
) -> Tensor:
    """``J_a M J_bᵀ`` (``[A, B]``) from row chunks; ``J_b`` is held whole when it fits."""
    rows_a, rows_b = _row_source(a, strategy), _row_source(b, strategy)
    held_a = list(rows_a(a, weights, chunk)) if a.shape.numel() <= chunk else None
    held_b: list[tuple[int, _autodiff.Rows]] | None
    if b is a and held_a is not None:
        held_b = held_a
    else:
        held_b = list(rows_b(b, weights, chunk)) if b.shape.numel() <= chunk else None
    blocks = []
    for _, block_a in held_a or rows_a(a, weights, chunk):
        parts = [
            _autodiff.contract(_scaled(block_a, metric), block_b)
            for _, block_b in held_b or rows_b(b, weights, chunk)
        ]
        blocks.append(torch.cat(parts, dim=1))
    return torch.cat(blocks).detach()


def _rows_per_chunk(weights: ParamDict, memory_budget: int) -> int:
    """Rows of ``J`` that fit in ``memory_budget``, with room for the backward pass (×4)."""
    bytes_per_row = 4 * num_params(weights) * _dtype_of(weights).itemsize
    return max(1, memory_budget // bytes_per_row)


def _dtype_of(weights: ParamDict) -> torch.dtype:
    return next(iter(weights.values())).dtype
