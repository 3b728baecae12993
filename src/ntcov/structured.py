"""Structured ntcov: K×K and K×N matrices of per-example properties, layer by layer.

For properties ``p`` and ``q`` with per-example structure (row ``i`` depends on example ``i``
only), every entry ``(i, k)`` of ``p`` is a scalar whose gradient with respect to a layer's
weight is ``Σ_t A_tᵀ B_t`` (:mod:`ntcov.structured_layers`: for ``nn.Linear``, ``A = δ`` the
back-propagated signal at the layer's output and ``B = h`` its input). Then

    ntcov(p_ik, q_jl) = Σ_layers Σ_calls Σ_{t,s} (A_t·A'_s)(B_t·B'_s)  +  Σ_other J_p J_qᵀ

and no ``d_out × d_in`` per-example gradient is ever formed. With one position (``T = 1``) a
layer's block is two matrix products and a product of entries: ``(Δ Δ'ᵀ) ⊙ (H H'ᵀ)`` with
``Δ`` ``[K, d_out]`` and ``H`` ``[K, d_in]`` (``+ Δ Δ'ᵀ`` for the bias). For each parameter a
cost model picks the cheaper of this *structured rule* (``≈ T·T'·(a + b)`` per pair of rows
for ``T`` positions) and the *per-example-gradient rule* (form ``Σ_t A_tᵀ B_t``, ``[K, a·b]``,
then one matrix product, ``≈ a·b`` per pair); parameters of any other layer (norms, attention
projections used through ``F.linear``, recurrent weights, weights also used directly) get
per-example gradients by ``vmap(jacrev)`` over examples, restricted to those parameters.

How ``δ`` and ``h`` are obtained, without changing the user's module: forward hooks, registered
only inside a ``with`` block, record each supported layer call's input ``h`` and add a zero
*probe* to its output, in ONE ordinary forward pass of a chunk of examples. Because row ``i``
depends on example ``i`` only, ``∂(Σ_i p_ik)/∂probe`` has ``δ_ik`` in row ``i``: ``m``
backward passes of the batch (one per entry of an example's row) give the signals of every
row. Checks, each falling back (:class:`StructuredUnavailable`) rather than risk a wrong number:

- a first pass on one example, with every supported layer recomputed from detached weights,
  finds weights that are also used outside their layer's call (tied to a functional op, or an
  ``nn.MultiheadAttention`` projection used through ``F.linear``): those get per-example
  gradients instead; its value must equal row 0 of the batch value;
- the values of the first ``S = 32`` examples evaluated alone, and of each chunk, must equal
  the batch evaluation, and every supported layer's output must have the examples on dim 0;
- the rows must add up: ``Σ_rows u_r ∇p_r`` rebuilt from the factors of the first ``S``
  examples equals one backward pass of their batch with the random cotangent ``u``, for every
  parameter (this also catches rows that depend on other examples of the same chunk).

Cost: one forward and ``m`` backward passes of the batch, a ``vmap`` pass for the parameters
without a rule (if any), and the contraction — half of it for ``ntcov(p, p)``, whose result
is symmetric. Memory: the factors, the per-example gradients of the dense parameters and the
pairwise temporaries of one tile, chunked so that they and the result fit ``memory_budget``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from ntcov import _autodiff
from ntcov.params import ParamDict, as_requires_grad
from ntcov.property import PerExample, Property, _call
from ntcov.structured_layers import (
    Factor,
    LayerRule,
    Pair,
    gram,
    recompute,
    rule_for,
    weighted_gradient,
)

__all__ = [
    "StructuredUnavailable",
    "cheaper_than_per_example",
    "discovery_cache",
    "structured_ntcov",
]

CHECK_SEED = 0
CHECK_EXAMPLES = 32  # the rows of these first examples must add up to their batch gradient
SYMMETRIC_TILES = 4  # ntcov(p, p): at least this many tiles per side, the lower ones mirrored
MIN_TILE_EXAMPLES = 64  # ... but no tile smaller than this (matrix products stay efficient)
AUTO_MARGIN = 0.8  # auto takes the structured path when it predicts at most this share of work
BATCH_PASS_WEIGHT = 16.0  # a flop of the batch pass (layers unseen by the hooks, autograd, m
# backward passes) against a flop of the contraction's matrix products, measured on CPU


class StructuredUnavailable(Exception):
    """The structured path cannot compute this property exactly; the message says why."""


@dataclass(frozen=True)
class CallSpec:
    """One call of a supported layer in one example's forward pass.

    ``names`` maps the layer's attributes (``weight``, ``bias``) to the selected parameters
    they are; ``output_shape`` is the call's output shape in a one-example batch (examples on
    dim 0), ``input_numel`` the number of elements of its input there.
    """

    module: nn.Module
    path: str
    rule: LayerRule
    names: dict[str, str]
    output_shape: torch.Size
    output_dtype: torch.dtype
    input_numel: int = 0

    @property
    def positions(self) -> int:
        """``T``: positions of the output (tokens × locations), ``numel / channels``."""
        return max(1, self.output_shape.numel() // self.rule.channels(self.module))


@dataclass
class Plan:
    """What the structured path needs to know about one property, found before the rows."""

    prop: Property
    per_example: PerExample
    entries: int  # m: entries of each example's row
    calls: list[CallSpec]
    structured: list[str]  # parameters whose every use is a supported layer call
    other: list[str]  # the rest: per-example gradients
    batch_value: Tensor  # [N, *item]
    row_weights: Tensor  # [S, m], the random cotangent u of the check on the first S examples
    reference: ParamDict  # Σ_rows u_r ∇p_r over those rows, from one batch backward pass

    @property
    def num_examples(self) -> int:
        return self.per_example.num_examples


@dataclass
class RowChunk:
    """The rows of ``n`` examples (``n·m`` rows): per call ``{name: (A, B)}`` for the parameters
    under the structured rule, and ``dense`` ``[n·m, P_dense]`` per-example gradients of the
    others, columns in a fixed parameter order."""

    examples: int
    entries: int
    calls: list[dict[str, Pair]]
    dense: Tensor | None


@dataclass(frozen=True)
class Choice:
    """Which parameters use the structured rule; the others (``dense``) per-example gradients."""

    structured: frozenset[str]
    dense: list[str]
    metric: ParamDict | None = field(default=None)
    batch_pass: bool = True  # False: every row from the per-example vmap pass
    # with a metric: the constant M of each structured parameter (its blocks are scaled by it)
    scales: Mapping[str, float] = field(default_factory=dict)


def structured_ntcov(
    a: Property,
    b: Property,
    weights: ParamDict,
    memory_budget: int,
    metric: ParamDict | None,
    values: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``J_a M J_bᵀ`` as ``[A, B]`` by the structured rules; raises :class:`StructuredUnavailable`
    when the properties or the model do not allow it (the caller then uses per-example rows).

    ``values`` are the batch values of ``a`` and ``b`` when the caller has them (not recomputed).
    For ``b is a`` the result is symmetric: only the tiles on and above the diagonal are
    computed, the others mirrored."""
    plan_a = make_plan(a, weights, None if values is None else values[0])
    plan_b = plan_a if b is a else make_plan(b, weights, None if values is None else values[1])
    choice = choose_rules(plan_a, plan_b, weights, metric)
    if not choice.batch_pass:
        plan_a = _per_example_only(plan_a, weights)
        plan_b = plan_a if b is a else _per_example_only(plan_b, weights)
    sizes = chunk_sizes(plan_a, plan_b, choice, weights, memory_budget)
    rows_a = plan_a.num_examples * plan_a.entries
    rows_b = plan_b.num_examples * plan_b.entries
    dtype = _autodiff.accumulating(plan_a.batch_value).dtype
    out = torch.zeros(rows_a, rows_b, dtype=dtype, device=plan_a.batch_value.device)
    if b is a:
        _fill_symmetric(out, plan_a, choice, weights, sizes)
    else:
        _fill(out, plan_a, plan_b, choice, weights, sizes)
    return out


@dataclass(frozen=True)
class Sizes:
    """Examples per row chunk on each side (factors held at once) and per contraction tile."""

    chunk_a: int
    chunk_b: int
    tile_a: int
    tile_b: int


def _fill(
    out: Tensor, plan_a: Plan, plan_b: Plan, choice: Choice, weights: ParamDict, sizes: Sizes
) -> None:
    """``out`` ``[A, B]`` chunk by chunk; ``b``'s rows are held when they fit in one chunk,
    else recomputed for each of ``a``'s chunks."""
    held_b = None
    if plan_b.num_examples <= sizes.chunk_b:
        held_b = list(row_chunks(plan_b, weights, choice, sizes.chunk_b))
    start_a = 0
    for chunk_a in row_chunks(plan_a, weights, choice, sizes.chunk_a):
        start_b = 0
        chunks_b = (
            held_b if held_b is not None else row_chunks(plan_b, weights, choice, sizes.chunk_b)
        )
        for chunk_b in chunks_b:
            _contract_tiles(out, (start_a, start_b), chunk_a, chunk_b, choice, weights, sizes)
            start_b += chunk_b.examples * chunk_b.entries
        start_a += chunk_a.examples * chunk_a.entries


def _fill_symmetric(
    out: Tensor, plan: Plan, choice: Choice, weights: ParamDict, sizes: Sizes
) -> None:
    """``out`` ``[A, A]`` for ``ntcov(p, p)``: the blocks on and above the diagonal, mirrored."""
    chunk = min(sizes.chunk_a, sizes.chunk_b)
    held = list(row_chunks(plan, weights, choice, chunk)) if plan.num_examples <= chunk else None
    starts = list(range(0, plan.num_examples, chunk))
    rows = plan.entries
    for i, chunk_i in enumerate(held or row_chunks(plan, weights, choice, chunk)):
        later = held[i:] if held is not None else _chunks_from(plan, weights, choice, chunk, i)
        for j, chunk_j in enumerate(later, start=i):
            offsets = (starts[i] * rows, starts[j] * rows)
            _contract_tiles(out, offsets, chunk_i, chunk_j, choice, weights, sizes, j == i)


def _chunks_from(
    plan: Plan, weights: ParamDict, choice: Choice, chunk: int, index: int
) -> Iterator[RowChunk]:
    """Row chunks ``index, index + 1, …`` (recomputed: the rows did not fit in memory)."""
    yield from row_chunks(plan, weights, choice, chunk, start=index * chunk)


# ----- planning -------------------------------------------------------------------------------


def make_plan(prop: Property, weights: ParamDict, value: Tensor | None = None) -> Plan:
    """Check the property, find its layer calls and which weights they cover (two passes).

    ``value`` is the property's batch value when the caller has it (else evaluated here)."""
    pe = prop.per_example
    if pe is None:
        raise StructuredUnavailable(f"property {prop.name!r} has no per-example structure")
    value = _batch_value(prop, weights) if value is None else value.detach()
    if value.dim() == 0 or value.shape[0] != pe.num_examples:
        raise StructuredUnavailable(
            f"property {prop.name!r} has shape {list(value.shape)}, not [N, ...] with "
            f"N = {pe.num_examples} examples on dim 0"
        )
    agree = _autodiff._agreement(value, pe.num_examples)
    row_weights, reference = _reference(prop, pe, weights, agree)
    calls, used_elsewhere = _discover(prop, pe, weights, agree)
    structured, other = _split(calls, used_elsewhere, weights)
    calls = [_restricted(spec, set(structured)) for spec in calls]
    entries = max(1, value[0].numel())
    return Plan(
        prop,
        pe,
        entries,
        [spec for spec in calls if spec.names],
        structured,
        other,
        value,
        row_weights.reshape(row_weights.shape[0], entries),
        reference,
    )


def _split(
    calls: list[CallSpec], used_elsewhere: set[str], weights: ParamDict
) -> tuple[list[str], list[str]]:
    """The selected weights whose every use is a supported layer call, and the others."""
    covered = {name for spec in calls for name in spec.names.values()}
    structured = [n for n in weights if n in covered and n not in used_elsewhere]
    return structured, [n for n in weights if n not in structured]


def _restricted(spec: CallSpec, names: set[str]) -> CallSpec:
    kept = {attr: name for attr, name in spec.names.items() if name in names}
    return replace(spec, names=kept)


def _batch_value(prop: Property, weights: ParamDict) -> Tensor:
    """The property's value for the whole batch ``[N, *item]`` (no graph)."""
    with _autodiff.composite_attention(), torch.no_grad():
        out = prop(weights)
    _autodiff.check_output(prop, out)
    return out


def _not_per_example(prop: Property, what: str) -> StructuredUnavailable:
    return StructuredUnavailable(
        f"the values of property {prop.name!r} for {what} differ from its batch evaluation "
        "(rows depend on other examples, or dim 0 is not the example axis)"
    )


def _reference(
    prop: Property, pe: PerExample, weights: ParamDict, agree: Callable[[Tensor, int], bool]
) -> tuple[Tensor, ParamDict]:
    """A random cotangent ``u`` ``[S, *item]`` for the first ``S`` examples and ``uᵀ J`` over
    their rows by one backward pass of the batch of those examples (which also checks that
    the property depends on the selected weights, and that their values, evaluated alone,
    are the batch's)."""
    count = min(CHECK_EXAMPLES, pe.num_examples)
    leaves = as_requires_grad(weights)
    with _autodiff.composite_attention(), torch.enable_grad():
        out = _call(prop.module, leaves, pe.fn, *(x[:count] for x in pe.inputs))
    _autodiff.check_output(prop, out)
    if not agree(out.detach(), 0):
        raise _not_per_example(prop, f"the first {count} examples alone")
    _autodiff.check_depends(prop, out)
    generator = torch.Generator().manual_seed(CHECK_SEED)
    u = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, list(leaves.values()), u, allow_unused=True)
    _autodiff.check_grads(prop, grads)
    return u, _autodiff._fill_unused(leaves, grads)


def supported_layers(module: nn.Module) -> dict[str, tuple[nn.Module, LayerRule]]:
    """The submodules with a structured rule, by path (a module used twice appears once)."""
    found = {}
    for path, sub in module.named_modules():
        rule = rule_for(sub)
        if rule is not None:
            found[path] = (sub, rule)
    return found


Hook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]


@contextmanager
def forward_hooks(
    layers: dict[str, tuple[nn.Module, LayerRule]], make_hook: Callable[[str, LayerRule], Hook]
) -> Iterator[None]:
    """Forward hooks on ``layers`` for the duration of the block, removed even on error."""
    handles = []
    try:
        for path, (module, rule) in layers.items():
            hook = make_hook(path, rule)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["input"]


def _discover(
    prop: Property, pe: PerExample, weights: ParamDict, agree: Callable[[Tensor, int], bool]
) -> tuple[list[CallSpec], set[str]]:
    """Run the property on example 0 with every supported layer recomputed from detached
    weights: the calls in order, and the selected weights still reached by the backward pass
    (used outside the supported calls). Its value must be row 0 of the batch value."""
    calls, out, reached = _first_example_layout(prop, pe, weights)
    if isinstance(out, Tensor) and not agree(out, 0):
        raise _not_per_example(prop, "example 0 alone")
    return calls, reached


Layout = tuple[list["CallSpec"], Tensor, set[str]]
_LAYOUTS: ContextVar[dict[tuple[int, int], Layout] | None] = ContextVar(
    "ntcov_structured_layouts", default=None
)


@contextmanager
def discovery_cache() -> Iterator[None]:
    """Inside the block, each property's first-example layout (:func:`_first_example_layout`)
    is found once per weight selection: ``auto``'s cost model and the plan share it. Nested
    blocks share the outermost one's cache."""
    if _LAYOUTS.get() is not None:
        yield
        return
    token = _LAYOUTS.set({})
    try:
        yield
    finally:
        _LAYOUTS.reset(token)


def _first_example_layout(prop: Property, pe: PerExample, weights: ParamDict) -> Layout:
    """The supported layer calls of example 0, its output (detached), and the selected weights
    its backward pass still reaches outside those calls (cached inside :func:`discovery_cache`,
    keyed by the property and the weights dict, both alive for the whole block)."""
    cache, key = _LAYOUTS.get(), (id(prop), id(weights))
    if cache is not None and key in cache:
        return cache[key]
    calls, out, leaves = _first_example_calls(prop, pe, weights)
    detached = out.detach() if isinstance(out, Tensor) else out
    layout = (calls, detached, _still_reached(out, leaves))
    if cache is not None:
        cache[key] = layout
    return layout


def _first_example_calls(
    prop: Property, pe: PerExample, weights: ParamDict
) -> tuple[list[CallSpec], Tensor, ParamDict]:
    """The supported layer calls of example 0, its output, and the leaves it was computed from."""
    leaves = as_requires_grad(weights)
    name_of = {id(t): n for n, t in leaves.items()}
    calls: list[CallSpec] = []

    def make_hook(path: str, rule: LayerRule) -> Hook:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            names = _selected_attributes(module, name_of)
            if not names or not isinstance(output, Tensor):
                return None
            weight, bias = (_detached(module, attr, names) for attr in ("weight", "bias"))
            layer_input = _layer_input(args, kwargs)
            spec = CallSpec(
                module, path, rule, names, output.shape, output.dtype, layer_input.numel()
            )
            calls.append(spec)
            return recompute(module, layer_input, weight, bias)

        return hook

    try:
        hooks = forward_hooks(supported_layers(prop.module), make_hook)
        with hooks, _autodiff.composite_attention(), torch.enable_grad():
            out = _call(prop.module, leaves, pe.fn, *(x[:1] for x in pe.inputs))
    except (RuntimeError, NotImplementedError) as err:
        reason = f"one example alone fails ({_autodiff._first_line(err)})"
        raise StructuredUnavailable(reason) from err
    return calls, out, leaves


def _selected_attributes(module: nn.Module, name_of: dict[int, str]) -> dict[str, str]:
    found = {}
    for attr in ("weight", "bias"):
        tensor = getattr(module, attr, None)
        if isinstance(tensor, Tensor) and id(tensor) in name_of:
            found[attr] = name_of[id(tensor)]
    return found


def _detached(module: nn.Module, attr: str, names: dict[str, str]) -> Tensor | None:
    tensor = getattr(module, attr, None)
    return tensor.detach() if attr in names and tensor is not None else tensor


def _still_reached(out: Tensor, leaves: ParamDict) -> set[str]:
    if not isinstance(out, Tensor) or not out.requires_grad:
        return set()
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out), allow_unused=True)
    return {n for n, g in zip(leaves, grads, strict=True) if g is not None}


# ----- choosing a rule per parameter, and auto ------------------------------------------------


def choose_rules(
    plan_a: Plan, plan_b: Plan, weights: ParamDict, metric: ParamDict | None
) -> Choice:
    """The structured rule for each parameter where the cost model prefers it. With a metric,
    only parameters whose ``M`` is one constant (SGD, momentum: ``M = η a``) can use it: a
    general diagonal ``M`` does not factor over ``Σ_t A_tᵀ B_t``, a constant scales the block."""
    chosen: set[str] = set()
    scales = uniform_metric(metric, weights)
    names = set(plan_a.structured) & set(plan_b.structured)
    if metric is not None:
        names &= set(scales)
    if names:
        rows = (_rows(plan_a), _rows(plan_b))
        for name in sorted(names):
            if _structured_is_cheaper(name, plan_a.calls, plan_b.calls, *rows):
                chosen.add(name)
        for name in sorted(names - chosen):  # biases whose layer's δ gram is computed anyway
            shared = _shares_signals(name, plan_a, plan_b, chosen)
            if shared and _structured_is_cheaper(name, plan_a.calls, plan_b.calls, *rows, True):
                chosen.add(name)
    if (plan_a.other or plan_b.other) and not _batch_pass_pays(plan_a, plan_b, chosen, weights):
        return Choice(frozenset(), list(weights), metric, batch_pass=False)
    dense = [n for n in weights if n not in chosen]
    return Choice(frozenset(chosen), dense, metric, scales={n: scales[n] for n in chosen})


def uniform_metric(metric: ParamDict | None, weights: ParamDict) -> dict[str, float]:
    """``{name: M}`` for the parameters whose metric is one constant over all entries (all
    parameters, with ``M = 1``, when there is no metric)."""
    if metric is None:
        return dict.fromkeys(weights, 1.0)
    scales = {}
    for name in weights:
        values = metric[name].reshape(-1)
        if values.numel() and bool((values == values[0]).all()):
            scales[name] = float(values[0])
    return scales


def _batch_pass_pays(plan_a: Plan, plan_b: Plan, chosen: set[str], weights: ParamDict) -> bool:
    """With parameters that need the per-example ``vmap`` pass anyway, whether the batch pass
    (``N·(1 + 2m)·Σ_calls 2·T·a·b`` flops per side, weighted by ``BATCH_PASS_WEIGHT``) is paid
    back by the structured rules (``K_a·K_b·(numel − structured cost)`` per chosen parameter).
    Else all rows come from the ``vmap`` pass."""
    rows = (_rows(plan_a), _rows(plan_b))
    pairs = rows[0][0] * rows[0][1] * rows[1][0] * rows[1][1]
    saved = 0.0
    for name in chosen:
        shared = _shares_signals(name, plan_a, plan_b, chosen)
        cost = _pair_costs(name, plan_a.calls, plan_b.calls, *rows, shared)
        saved += pairs * (weights[name].numel() - (cost[0] if cost else 0.0))
    spent = sum(
        plan.num_examples * (1 + 2 * plan.entries) * _forward_flops(plan.calls)
        for plan in ((plan_a,) if plan_b is plan_a else (plan_a, plan_b))
    )
    return saved > BATCH_PASS_WEIGHT * spent


def _forward_flops(calls: list[CallSpec]) -> float:
    """``Σ_calls 2·T·a·b``: one example's forward pass through the supported layers."""
    return sum(
        2.0 * spec.positions * math.prod(spec.rule.matrix(spec.module, "weight")) for spec in calls
    )


def _per_example_only(plan: Plan, weights: ParamDict) -> Plan:
    """The plan with every parameter's rows from the per-example ``vmap`` pass."""
    return replace(plan, calls=[], structured=[], other=list(weights))


def _shares_signals(name: str, plan_a: Plan, plan_b: Plan, chosen: set[str]) -> bool:
    """Whether every use of ``name`` is a bias whose layer call's weight is structured: then
    its block ``Σ_{t,s} δ_t·δ'_s`` reuses the weight's gram of the signals."""
    uses = _calls_of(name, plan_a.calls) + _calls_of(name, plan_b.calls)
    return all(attr == "bias" and spec.names.get("weight") in chosen for spec, attr in uses)


def _rows(plan: Plan) -> tuple[int, int]:
    """``(N, m)``: examples and entries per example."""
    return plan.num_examples, plan.entries


def _calls_of(name: str, calls: list[CallSpec]) -> list[tuple[CallSpec, str]]:
    return [(spec, attr) for spec in calls for attr, n in spec.names.items() if n == name]


def _structured_is_cheaper(
    name: str,
    calls_a: list[CallSpec],
    calls_b: list[CallSpec],
    rows_a: tuple[int, int],
    rows_b: tuple[int, int],
    shared: bool = False,
) -> bool:
    """Flops per pair of rows: ``Σ_{calls} T·T'·(a + b/(m·m') + 2)`` (``2·T·T'`` when the gram of
    ``A`` is ``shared`` with another parameter's) against ``a·b`` (+ forming ``Σ_t A_tᵀ B_t``,
    spread over the other side's rows)."""
    cost = _pair_costs(name, calls_a, calls_b, rows_a, rows_b, shared)
    return cost is not None and cost[0] <= cost[1]


def _pair_costs(
    name: str,
    calls_a: list[CallSpec],
    calls_b: list[CallSpec],
    rows_a: tuple[int, int],
    rows_b: tuple[int, int],
    shared: bool = False,
) -> tuple[float, float] | None:
    """(structured, per-example gradients) flops per pair of rows for one parameter, or
    ``None`` when its uses have different matrix shapes (only flat gradients compare)."""
    uses_a, uses_b = _calls_of(name, calls_a), _calls_of(name, calls_b)
    shapes = {spec.rule.matrix(spec.module, attr) for spec, attr in uses_a + uses_b}
    if len(shapes) != 1:
        return None
    a, b = shapes.pop()
    pairs = rows_a[1] * rows_b[1]
    per_position = 2.0 if shared else a + b / pairs + 2
    structured = sum(
        sa.positions * sb.positions * per_position for sa, _ in uses_a for sb, _ in uses_b
    )
    forming = sum(s.positions for s, _ in uses_a) / (rows_b[0] * rows_b[1]) + sum(
        s.positions for s, _ in uses_b
    ) / (rows_a[0] * rows_a[1])
    return structured, a * b * (1 + forming)


def cheaper_than_per_example(
    a: Property, b: Property, weights: ParamDict, metric: ParamDict | None = None
) -> bool:
    """Whether the structured path is predicted cheaper than per-example gradients for
    ``ntcov(a, b)`` (``strategy='auto'``). Costs one forward and backward pass of one example
    per property (to find the layer calls), nothing of the batch.

    Per pair of rows, per-example gradients cost ``P``; the structured path costs, per
    parameter, the cheaper rule of the cost model (``numel`` for parameters without a rule).
    The structured path is taken when it predicts at most ``AUTO_MARGIN`` of that work, or when
    every parameter has a rule (then no per-example ``vmap`` pass runs at all). With a
    ``metric``, only parameters whose ``M`` is constant have a rule (:func:`choose_rules`)."""
    layouts = []
    for prop in (a, b) if b is not a else (a,):
        pe = prop.per_example
        if pe is None:
            return False
        try:
            calls, out, reached = _first_example_layout(prop, pe, weights)
        except StructuredUnavailable:
            return False
        structured, _ = _split(calls, reached, weights)
        rows = (pe.num_examples, max(1, out[0].numel()) if out.dim() > 0 else 1)
        layouts.append((calls, set(structured), rows))
    calls_a, names_a, rows_a = layouts[0]
    calls_b, names_b, rows_b = layouts[-1]
    total = sum(w.numel() for w in weights.values())
    ruled = names_a & names_b & set(uniform_metric(metric, weights))  # see choose_rules
    cost = 0.0
    for name, weight in weights.items():
        pair = None
        if name in ruled:
            pair = _pair_costs(name, calls_a, calls_b, rows_a, rows_b)
        cost += weight.numel() if pair is None else min(pair[0], weight.numel())
    every_rule = all(n in ruled for n in weights)
    return (every_rule and cost <= total) or cost <= AUTO_MARGIN * total


# ----- memory ---------------------------------------------------------------------------------


def chunk_sizes(
    plan_a: Plan, plan_b: Plan, choice: Choice, weights: ParamDict, memory_budget: int
) -> Sizes:
    """Examples per row chunk and per tile. The result ``[A, B]`` is held whole; of what the
    budget leaves beside it (at least an eighth of the budget), a quarter goes to each side's
    row chunk (factors, per-example gradients, the batch pass) and half to the pairwise
    temporaries of one tile. For ``ntcov(p, p)`` the tiles are square, and at least
    ``SYMMETRIC_TILES`` per side (when that keeps ``MIN_TILE_EXAMPLES``)."""
    itemsize = plan_a.batch_value.element_size()
    rows = plan_a.num_examples * plan_a.entries * plan_b.num_examples * plan_b.entries
    result = rows * _autodiff.accumulating(plan_a.batch_value).element_size()
    spare = max(memory_budget - result, memory_budget // 8)
    chunk_a, chunk_b = (
        max(1, spare // 4 // (itemsize * _elements_per_example(plan, choice, weights)))
        for plan in (plan_a, plan_b)
    )
    pair = _pair_elements(plan_a, plan_b, choice) * max(itemsize, 4)
    tiles = [min(chunk_a, plan_a.num_examples), min(chunk_b, plan_b.num_examples)]
    while tiles[0] * tiles[1] * pair > spare // 2 and max(tiles) > 1:
        larger = 0 if tiles[0] >= tiles[1] else 1
        tiles[larger] = max(1, tiles[larger] // 2)
    if plan_b is plan_a:
        tile = min(tiles)
        split = max(MIN_TILE_EXAMPLES, -(-plan_a.num_examples // SYMMETRIC_TILES))
        tiles = [min(tile, split)] * 2
    return Sizes(chunk_a, chunk_b, tiles[0], tiles[1])


def _elements_per_example(plan: Plan, choice: Choice, weights: ParamDict) -> int:
    """Elements held per example for its rows: the batch pass (layer inputs and outputs, ×4
    for the graph), the signals ``δ`` of the ``m`` entries and the factors (unfolded patches),
    ``m`` rows of the dense per-example gradients (×2 while they are formed), and, with
    parameters without a rule, the per-example ``vmap`` pass (×4 activations per entry)."""
    m = plan.entries
    activations = sum(spec.output_shape.numel() + spec.input_numel for spec in plan.calls)
    factors = sum(_factor_elements(spec, m) for spec in plan.calls)
    dense = sum(weights[n].numel() for n in choice.dense)
    other_pass = 4 * m * activations if plan.other else 0
    return max(1, 4 * activations + m * activations + factors + 2 * m * dense + other_pass)


def _factor_elements(spec: CallSpec, m: int) -> int:
    """``T·(m·channels + b)``: the signals of ``m`` entries and the ``B`` side of the weight."""
    _, width = spec.rule.matrix(spec.module, "weight")
    return spec.positions * (m * spec.rule.channels(spec.module) + width)


def _pair_elements(plan_a: Plan, plan_b: Plan, choice: Choice) -> int:
    """Elements of the temporaries for one pair of examples: the dense product's ``m·m'`` and,
    for the structured calls, two grams and their product, ``3·(m·m' + 1)·T·T'``."""
    longest = [
        max([spec.positions for spec in plan.calls if _is_structured(spec, choice)], default=0)
        for plan in (plan_a, plan_b)
    ]
    pairs = plan_a.entries * plan_b.entries
    return max(1, pairs + 3 * (pairs + 1) * longest[0] * longest[1])


def _is_structured(spec: CallSpec, choice: Choice) -> bool:
    return any(name in choice.structured for name in spec.names.values())


# ----- rows -----------------------------------------------------------------------------------


def row_chunks(
    plan: Plan, weights: ParamDict, choice: Choice, examples_per_chunk: int, start: int = 0
) -> Iterator[RowChunk]:
    """The property's rows, ``examples_per_chunk`` examples at a time from example ``start``.
    Before the rows of the first ``S`` examples are handed out (``start = 0``), checks that they
    add up to their batch backward pass, and every chunk's values against the batch value
    (else :class:`StructuredUnavailable`)."""
    agree = _autodiff._agreement(plan.batch_value, plan.num_examples)
    rebuilt: ParamDict = {n: torch.zeros_like(w) for n, w in weights.items()}
    checked = plan.row_weights.shape[0] if start == 0 else 0
    for first in range(start, plan.num_examples, examples_per_chunk):
        stop = min(plan.num_examples, first + examples_per_chunk)
        xs = tuple(x[first:stop] for x in plan.per_example.inputs)
        deltas: list[Tensor] = []
        inputs: list[Tensor] = []
        if plan.calls:
            values, deltas, inputs = _batch_pass(plan, weights, xs)
            if not agree(values, first):
                raise _not_per_example(plan.prop, f"examples {first}..{stop - 1}")
        other = _other_rows(plan, weights, xs, agree, first) if plan.other else {}
        if first < checked:  # the rows of the first examples must add up (checked before use)
            count = min(stop, checked) - first
            part = _pairs(plan, [d[:count] for d in deltas], [h[:count] for h in inputs], None)
            first_rows = {n: g[:count] for n, g in other.items()}
            _add_weighted(rebuilt, part, first_rows, plan.row_weights[first : first + count])
            if stop >= checked:
                _check_rebuilt(plan, rebuilt)
        calls = _pairs(plan, deltas, inputs, choice.structured)
        dense = _dense(plan, deltas, inputs, other, choice, weights)
        yield RowChunk(stop - first, plan.entries, calls, dense)


def _batch_pass(
    plan: Plan, weights: ParamDict, xs: tuple[Tensor, ...]
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One forward pass of a chunk of ``c`` examples with probes on the supported layer calls,
    then ``m`` backward passes (one per entry ``k``, of ``Σ_i p_ik``): values ``[c, *item]``,
    signals ``δ`` ``[c, m, 1, *out]`` and inputs ``[c, 1, *in]`` per call (the layout of one
    example's call inside ``vmap``, which the layer rules take).

    Row ``i`` depends on example ``i`` only, so ``∂(Σ_i p_ik)/∂probe`` is ``δ_ik`` in row ``i``."""
    count = xs[0].shape[0]
    recorder = _Recorder(plan.calls, count)
    layers = {spec.path: (spec.module, spec.rule) for spec in plan.calls}
    fixed = {n: w.detach() for n, w in weights.items()}
    try:
        with (
            forward_hooks(layers, recorder.make_hook),
            _autodiff.composite_attention(),
            torch.enable_grad(),
        ):
            out = _call(plan.prop.module, fixed, plan.per_example.fn, *xs)
            inputs = recorder.finish()
        if out.shape[:1] != (count,) or out[0].numel() != plan.entries:
            raise StructuredUnavailable(
                f"property {plan.prop.name!r} has shape {list(out.shape)} for {count} examples"
            )
        deltas = _signals(out.reshape(count, plan.entries), recorder.probes)
    except (RuntimeError, NotImplementedError) as err:
        reason = f"the batch pass failed ({_autodiff._first_line(err)})"
        raise StructuredUnavailable(reason) from err
    deltas = [d.unsqueeze(2) for d in deltas]
    return out.detach(), deltas, [h.unsqueeze(1) for h in inputs]


def _signals(rows: Tensor, probes: list[Tensor]) -> list[Tensor]:
    """``∂(Σ_i rows_ik)/∂probe`` for each entry ``k``: ``[c, m, *probe[1:]]`` per probe."""
    m = rows.shape[1]
    per_entry: list[list[Tensor]] = []
    for k in range(m):
        if not rows.requires_grad:
            grads: tuple[Tensor | None, ...] = (None,) * len(probes)
        else:
            grads = torch.autograd.grad(
                rows[:, k].sum(), probes, retain_graph=k < m - 1, allow_unused=True
            )
        per_entry.append(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, probes, strict=True)]
        )
    return [torch.stack([entry[i] for entry in per_entry], 1) for i in range(len(probes))]


def _other_rows(
    plan: Plan,
    weights: ParamDict,
    xs: tuple[Tensor, ...],
    agree: Callable[[Tensor, int], bool],
    first: int,
) -> ParamDict:
    """Per-example gradients ``[c, m, *p]`` of the parameters without a rule, by ``vmap`` over
    examples of ``jacrev`` with respect to those parameters only (the others held fixed).
    The per-example values must be the batch's.

    Runs under ``no_grad``: the transforms still differentiate, but no graph is kept."""
    fixed = {n: weights[n].detach() for n in plan.structured}
    module, fn = plan.prop.module, plan.per_example.fn

    def single(other: ParamDict, *x: Tensor) -> tuple[Tensor, Tensor]:
        out = _call(module, fixed | other, fn, *(xi.unsqueeze(0) for xi in x)).squeeze(0)
        return out, out

    batched = vmap(jacrev(single, has_aux=True), in_dims=(None, *[0] * len(xs)))
    try:
        with _autodiff.composite_attention(), torch.no_grad():
            jac, values = batched({n: weights[n] for n in plan.other}, *xs)
    except (RuntimeError, NotImplementedError) as err:
        reason = f"per-example vmap failed ({_autodiff._first_line(err)})"
        raise StructuredUnavailable(reason) from err
    if not agree(values, first):
        raise _not_per_example(plan.prop, f"examples {first}..{first + values.shape[0] - 1}")
    count, m = xs[0].shape[0], plan.entries
    return {n: g.reshape(count, m, *weights[n].shape) for n, g in jac.items()}


class _Recorder:
    """State of the hooks during one batch pass: which call comes next, the probes added to
    the outputs and the layer inputs seen so far."""

    def __init__(self, calls: list[CallSpec], count: int) -> None:
        self.calls = calls
        self.count = count
        self.probes: list[Tensor] = []
        self.inputs: list[Tensor] = []

    def finish(self) -> list[Tensor]:
        if len(self.inputs) != len(self.calls):
            raise StructuredUnavailable(
                f"the supported layers were called {len(self.inputs)} times for a batch, "
                f"but {len(self.calls)} times in the first pass"
            )
        return self.inputs

    def make_hook(self, path: str, rule: LayerRule) -> Hook:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            index = len(self.inputs)
            expected = self.calls[index] if index < len(self.calls) else None
            if expected is None or expected.module is not module:
                raise StructuredUnavailable(
                    f"layer {path!r} was called in a different order for a batch than in the "
                    "first pass (control flow that depends on the data?)"
                )
            shape = torch.Size([self.count, *expected.output_shape[1:]])
            if expected.output_shape[:1] != (1,) or output.shape != shape:
                raise StructuredUnavailable(
                    f"layer {path!r} has output shape {list(output.shape)} for {self.count} "
                    f"examples, {list(expected.output_shape)} for one: its examples are not "
                    "on dim 0"
                )
            probe = torch.zeros_like(output, requires_grad=True)
            self.probes.append(probe)
            self.inputs.append(_layer_input(args, kwargs).detach())
            return output + probe

        return hook


def _pairs(
    plan: Plan, deltas: list[Tensor], inputs: list[Tensor], only: frozenset[str] | None
) -> list[dict[str, Pair]]:
    """``{name: (A, B)}`` for every call, for the structured parameters it uses (those in
    ``only`` when given)."""
    calls = []
    for spec, delta, layer_input in zip(plan.calls, deltas, inputs, strict=True):
        names = {a: n for a, n in spec.names.items() if only is None or n in only}
        pairs = spec.rule.pairs(spec.module, layer_input, delta) if names else {}
        calls.append({name: pairs[attr] for attr, name in names.items()})
    return calls


def _dense(
    plan: Plan,
    deltas: list[Tensor],
    inputs: list[Tensor],
    other: ParamDict,
    choice: Choice,
    weights: ParamDict,
) -> Tensor | None:
    """Per-example gradients ``[n·m, P_dense]`` of the parameters under the dense rule: from
    ``jacrev`` for the others, from the layer rules (summed over calls) for the rest."""
    blocks = dict(other)
    for spec, delta, layer_input in zip(plan.calls, deltas, inputs, strict=True):
        wanted = {a: n for a, n in spec.names.items() if n not in choice.structured}
        if not wanted:
            continue
        grads = spec.rule.gradients(spec.module, layer_input, delta, set(wanted))
        for attr, name in wanted.items():
            rows = grads[attr].reshape(*grads[attr].shape[:2], *weights[name].shape)
            blocks[name] = rows if name not in blocks else blocks[name] + rows
    columns = [blocks[n].reshape(-1, weights[n].numel()) for n in choice.dense]
    return torch.cat(columns, dim=1) if columns else None


def _add_weighted(
    rebuilt: ParamDict,
    calls: list[dict[str, Pair]],
    other: ParamDict,
    row_weights: Tensor,
) -> None:
    """``rebuilt += Σ_rows u_r ∇p_r`` for one chunk."""
    for pairs in calls:
        for name, pair in pairs.items():
            rebuilt[name] += weighted_gradient(pair, row_weights).reshape(rebuilt[name].shape)
    for name, rows in other.items():
        rebuilt[name] += torch.einsum("im...,im->...", rows, row_weights)


def _check_rebuilt(plan: Plan, rebuilt: ParamDict) -> None:
    scale = max(float(g.abs().max()) for g in plan.reference.values() if g.numel())
    tolerance = torch.finfo(plan.batch_value.dtype).eps ** 0.5 * max(scale, 1e-30)
    for name, expected in plan.reference.items():
        error = float((rebuilt[name] - expected).abs().max()) if expected.numel() else 0.0
        if not math.isfinite(error) or error > tolerance:
            raise StructuredUnavailable(
                f"the per-example rows of parameter {name!r} do not add up to the batch "
                f"gradient (max difference {error:.3g}, tolerance {tolerance:.3g}): the model "
                "uses it in a way the layer rules do not see"
            )


# ----- contraction ----------------------------------------------------------------------------


def _contract_tiles(
    out: Tensor,
    offsets: tuple[int, int],
    x: RowChunk,
    y: RowChunk,
    choice: Choice,
    weights: ParamDict,
    sizes: Sizes,
    diagonal: bool | None = None,
) -> None:
    """``out[rows of x, rows of y] = J_x M J_yᵀ``, one tile of examples at a time.

    ``diagonal=None``: an ordinary block. ``False``/``True`` (``ntcov(p, p)``): the block is
    mirrored into ``out[rows of y, rows of x]``; ``True``: ``x`` and ``y`` are the same chunk,
    and only its tiles on and above the diagonal are computed."""
    for i0 in range(0, x.examples, sizes.tile_a):
        i1 = min(x.examples, i0 + sizes.tile_a)
        rows = slice(offsets[0] + i0 * x.entries, offsets[0] + i1 * x.entries)
        tile_x = _slice(x, i0, i1)
        for j0 in range(i0 if diagonal else 0, y.examples, sizes.tile_b):
            j1 = min(y.examples, j0 + sizes.tile_b)
            columns = slice(offsets[1] + j0 * y.entries, offsets[1] + j1 * y.entries)
            target = out[rows, columns]
            contract_into(target, tile_x, _slice(y, j0, j1), choice, weights)
            if diagonal and j0 == i0:  # BLAS need not round A Aᵀ symmetrically: mirror it
                target.copy_(target.triu() + target.triu(1).T)
            elif diagonal is not None:
                out[columns, rows] = target.T


def _slice(chunk: RowChunk, start: int, stop: int) -> RowChunk:
    """The rows of examples ``start … stop − 1`` of a chunk (views; a factor shared by two
    parameters stays shared, so that its gram is computed once)."""
    if start == 0 and stop == chunk.examples:
        return chunk
    cut: dict[int, Factor] = {}

    def part(factor: Factor) -> Factor:
        if id(factor) not in cut:
            cut[id(factor)] = replace(factor, values=factor.values[start:stop])
        return cut[id(factor)]

    calls = [{n: (part(a), part(b)) for n, (a, b) in pairs.items()} for pairs in chunk.calls]
    m = chunk.entries
    dense = None if chunk.dense is None else chunk.dense[start * m : stop * m]
    return RowChunk(stop - start, m, calls, dense)


def contract_into(
    target: Tensor, x: RowChunk, y: RowChunk, choice: Choice, weights: ParamDict
) -> None:
    """``target += J_x M J_yᵀ`` for two chunks, ``[n·m, n'·m']``: one matrix product for the
    dense parameters, ``Σ_{t,s} (A_t·A'_s)(B_t·B'_s)`` for the structured ones."""
    if x.dense is not None and y.dense is not None:
        left = _autodiff.accumulating(_scaled_dense(x.dense, choice, weights))
        target.addmm_(left, _autodiff.accumulating(y.dense).T)
    block = target.view(x.examples, x.entries, y.examples, y.entries)
    for pairs_x in x.calls:
        for pairs_y in y.calls:
            _add_call_pair(block, pairs_x, pairs_y, choice)


def _scaled_dense(dense: Tensor, choice: Choice, weights: ParamDict) -> Tensor:
    if choice.metric is None:
        return dense
    scale = torch.cat([choice.metric[n].reshape(-1) for n in choice.dense])
    return dense * scale


def _add_call_pair(
    block: Tensor, pairs_x: dict[str, Pair], pairs_y: dict[str, Pair], choice: Choice
) -> None:
    """``block += Σ_{t,s} (A_t·A'_s)(B_t·B'_s)`` for the structured parameters two calls share;
    the gram of a factor shared by weight and bias (``δ``) is computed once. With one
    position on each side that is ``(Δ Δ'ᵀ) ⊙ (H H'ᵀ)``, added in place."""
    grams: dict[tuple[int, int], Tensor] = {}

    def cached(f: Factor, g: Factor) -> Tensor:
        key = (id(f.values), id(g.values))
        if key not in grams:
            grams[key] = gram(f, g)
        return grams[key]

    for name, (a, b) in pairs_x.items():
        if name not in choice.structured or name not in pairs_y:
            continue
        a2, b2 = pairs_y[name]
        first = cached(a, a2)
        scale = choice.scales.get(name, 1.0)
        if b.ones and b2.ones:
            part = first.sum((-2, -1)) if first.shape[-2:] != (1, 1) else first[..., 0, 0]
            block.add_(part, alpha=scale)
        elif first.shape[-2:] == (1, 1) and (b.positions, b2.positions) == (1, 1):
            block.addcmul_(first[..., 0, 0], cached(b, b2)[..., 0, 0], value=scale)
        else:
            block.add_((first * cached(b, b2)).sum((-2, -1)), alpha=scale)
