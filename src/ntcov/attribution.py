"""Why a property changes: exact parts per training example, per layer and per group of examples.

Price's rate under a (diagonal) metric ``M`` for the loss ``L = Σ_i w_i ℓ_i`` (``w_i = 1/N`` for
the unweighted mean) is bilinear, so it splits exactly. For a property ``x`` (``[*S]``, ``K``
entries) with Jacobian ``J_x`` and per-example losses ``ℓ`` (``[N]``):

    dx/dt = J_x M (−∇L) = Σ_i c_i,              c_i = −w_i ntcov_M(x, ℓ_i) = −w_i J_x M ∇ℓ_i
                        = Σ_blocks J_x^(l) M^(l) (−∇L)^(l)      (per layer / parameter group)
                        = Σ_groups Σ_{i∈g} c_i                    (per group of examples)

**Sign convention.** Every part is a contribution to ``dx/dt`` under gradient *descent* on ``L``
(fitness ``U = −L``): a positive ``c_i`` means that training on example ``i`` pushes ``x`` *up*.
The parts add up to ``ntcov.rate(x, L, metric=M)`` (``L = mean ℓ`` by default). Multiply by the
learning rate for one SGD step (or pass the optimizer's ``M``, which has it folded in).

How each split is computed (no ``[N, P]`` per-example gradients unless they are cheaper):

- ``by="example"``, strategy ``jvp``: ``K`` gradients ``∇x_k`` (batched backward passes), then
  one forward-mode JVP of the whole loss vector ``ℓ`` along each ``M ∇x_k``, the ``K`` JVPs
  batched with ``vmap`` in chunks under ``memory_budget``: cost ≈ ``3K`` forward passes over the
  ``N`` examples. Other strategies hand the ``[K, N]`` matrix to :func:`ntcov.ntcov` (``auto``
  picks the structured per-layer rules or per-example gradients for larger ``K``, where they
  are cheaper than ``K`` JVPs).
- ``by="layer"``: one backward pass for ``∇L``, then one JVP of ``x`` per block (batched).
- ``by="group"``: for ``K ≤ G`` the per-example parts summed per group; otherwise batched
  backward passes for the ``G`` group gradients ``∇(Σ_{i∈g} w_i ℓ_i)`` (chunks of groups under
  ``memory_budget``), then one JVP of ``x`` per group (batched).

:class:`TrainingAttribution` accumulates the per-example parts over a training run under the
optimizer's real ``M`` and bias ``b`` at every step (the exact first-order bookkeeping that
TracIn approximates with a few checkpoints).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import Tensor

from ntcov import _autodiff, _safeguards
from ntcov._choice import as_choice
from ntcov.covariance import DEFAULT_MEMORY_BUDGET, Strategy, ntcov
from ntcov.metric import optimizer_step
from ntcov.params import (
    ParamDict,
    ParamSelection,
    check_mode,
    select_params,
)
from ntcov.property import Property, different_modules
from ntcov.sketch import batched_jvp, tangents_per_chunk

__all__ = [
    "By",
    "Contributions",
    "StepAttribution",
    "TopK",
    "TrainingAttribution",
    "attribute",
]

JVP_MAX_PROPERTIES = 16  # auto: batched JVPs of ℓ up to this many entries of x, else ntcov's auto
Rows = dict[str, Tensor]
Result = TypeVar("Result")
Params = ParamSpec("Params")


class By(str, Enum):
    """What :func:`attribute` splits the rate over."""

    EXAMPLE = "example"
    LAYER = "layer"
    GROUP = "group"


@dataclass(frozen=True)
class TopK:
    """The ``k`` largest (or most negative) parts for each entry of ``x``.

    ``positions`` (``[*S, k]``, long) index the last axis of :attr:`Contributions.values`;
    ``values`` (``[*S, k]``) are the parts there; ``labels`` are their labels (a flat list for a
    scalar ``x``, nested lists otherwise).
    """

    positions: Tensor
    values: Tensor
    labels: list[Any]


@dataclass(frozen=True, eq=False)
class Contributions:
    """Parts of ``dx/dt`` (see the module docstring for the sign): ``values`` is ``[*S, G]``.

    ``labels`` names the ``G`` parts: training-example indices (``by="example"``), parameter
    block names (``"layer"``) or group labels (``"group"``). ``total`` (``[*S]``) is their sum,
    equal to ``ntcov.rate(x, L, metric=M)`` up to rounding.
    """

    values: Tensor
    labels: tuple[Any, ...]
    by: By

    @property
    def total(self) -> Tensor:
        """``Σ_g values[..., g]``, ``[*S]``: the whole rate."""
        return self.values.sum(-1)

    def top(self, k: int, *, direction: str = "up") -> TopK:
        """The ``k`` parts that push ``x`` most ``"up"`` (largest) or ``"down"`` (most negative)."""
        if direction not in ("up", "down"):
            raise ValueError(
                f"Contributions.top: direction must be 'up' or 'down', got {direction!r}."
            )
        count = self.values.shape[-1]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= count:
            raise ValueError(f"Contributions.top: k must be an int in [1, {count}], got {k!r}.")
        values, positions = torch.topk(self.values, int(k), dim=-1, largest=direction == "up")
        return TopK(positions, values, _nested_labels(positions.tolist(), self.labels))

    def helpful(self, k: int) -> TopK:
        """The ``k`` parts that raise ``x`` most (``top(k, direction="up")``)."""
        return self.top(k, direction="up")

    def harmful(self, k: int) -> TopK:
        """The ``k`` parts that lower ``x`` most (``top(k, direction="down")``)."""
        return self.top(k, direction="down")

    def as_dict(self) -> dict[Any, Tensor]:
        """``{label: values[..., g]}`` (each ``[*S]``)."""
        return {label: self.values[..., g] for g, label in enumerate(self.labels)}


def _nested_labels(positions: Any, labels: tuple[Any, ...]) -> Any:
    if isinstance(positions, int):
        return labels[positions]
    return [_nested_labels(p, labels) for p in positions]


def _public(fn: Callable[Params, Result]) -> Callable[Params, Result]:
    """Autograd on (works inside ``torch.no_grad()``), no inference mode, one warning per cause."""

    @functools.wraps(fn)
    def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        _autodiff.refuse_inference_mode(fn.__name__)
        with torch.enable_grad(), _autodiff.one_warning_per_cause():
            return fn(*args, **kwargs)

    return wrapper


@_public
def attribute(
    x: Property,
    per_example_loss: Property,
    *,
    by: By | str = By.EXAMPLE,
    groups: Any = None,
    metric: ParamDict | None = None,
    weights: Tensor | None = None,
    params: ParamSelection = None,
    strategy: Strategy | str = Strategy.AUTO,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_size: int | None = None,
    batch_size: int | None = None,
) -> Contributions:
    """Split ``dx/dt = ntcov_M(x, −L)``, ``L = Σ_i w_i ℓ_i``, into exact parts; ``[*S, G]``.

    ``per_example_loss`` is ``ℓ`` (``[N]``, e.g. :func:`ntcov.properties.per_example_loss`);
    ``weights`` (``[N]``) are the ``w_i`` (default ``1/N``: the mean loss). ``metric`` is a
    diagonal ``M`` (dict of tensors shaped like the parameters; default the identity).

    - ``by="example"``: ``G = N`` parts ``c_i = −w_i ntcov_M(x, ℓ_i)``; ``groups`` must be None.
    - ``by="layer"``: one part per parameter block; ``groups`` is ``None`` (one block per module
      owning parameters, e.g. ``"0"`` for ``"0.weight"`` and ``"0.bias"``) or a dict
      ``{label: params selection}`` of disjoint blocks (unlisted weights form ``"(rest)"``).
    - ``by="group"``: one part per group of examples; ``groups`` is ``[N]`` labels (a tensor or
      sequence) or a dict ``{label: example indices}`` (disjoint; the others form ``"(rest)"``).

    ``strategy`` (``by="example"``, and ``by="group"`` when ``K ≤ G``, where the groups are
    sums of the per-example parts): ``jvp`` for batched JVPs of ``ℓ``, or any
    :class:`ntcov.Strategy` for :func:`ntcov.ntcov`; ``auto`` uses JVPs up to
    ``JVP_MAX_PROPERTIES`` entries of ``x``. ``chunk_size`` bounds the JVPs batched together
    (default: from ``memory_budget``); ``batch_size`` evaluates ``ℓ`` that many examples at a
    time (needs per-example structure). Neither changes the result beyond rounding.
    """
    chosen = as_choice(By, by, "attribute", "by")
    weights_p = _prepare("attribute", x, per_example_loss, params)
    _check_metric("attribute", metric, weights_p)
    count = _num_examples("attribute", per_example_loss)
    x_value = _checked_value(x)
    shape = x_value.shape
    example_weights = _example_weights("attribute", weights, count, x_value.dtype)
    plan = _Plan(weights_p, metric, memory_budget, _check_chunk(chunk_size), batch_size)
    losses = _loss_batches("attribute", per_example_loss, count, batch_size)
    if chosen is By.EXAMPLE:
        if groups is not None:
            raise ValueError("attribute: groups is only used with by='layer' or by='group'.")
        if shape.numel() == 0:  # an empty property: nothing to differentiate
            values = x_value.new_zeros((*shape, count))
        else:
            values = _per_example(x, shape, losses, example_weights, plan, strategy, params)
        return Contributions(values, tuple(range(count)), chosen)
    if chosen is By.LAYER:
        blocks = _parameter_blocks(x.module, weights_p, groups)
        gradient = _cotangent_gradients(losses, weights_p, example_weights[None])
        direction = _scaled({n: -g[0] for n, g in gradient.items()}, metric)
        values = _jvp_by_block(x, direction, blocks, plan)
        return Contributions(values, tuple(blocks), chosen)
    labels, membership = _data_groups(groups, count)
    if 0 < shape.numel() <= membership.shape[0]:  # K ≤ G: sum the K·N per-example parts
        parts = _per_example(x, shape, losses, example_weights, plan, strategy, params)
        return Contributions(parts @ membership.T.to(parts), labels, chosen)
    cotangents = membership.to(example_weights) * example_weights
    values = _per_group(x, losses, cotangents, plan)
    return Contributions(values, labels, chosen)


# ----- checks --------------------------------------------------------------------------------


def _prepare(caller: str, x: Property, loss: Property, params: ParamSelection) -> ParamDict:
    for prop in (x, loss):
        if not isinstance(prop, Property):
            raise TypeError(
                f"{caller}: expected ntcov.Property arguments, got {type(prop).__name__}. "
                "Build them with ntcov.properties (probs, per_example_loss, ...)."
            )
    if x.module is not loss.module:
        raise ValueError(
            f"{caller}: x and per_example_loss must be properties of the same module; got "
            f"{different_modules(x.module, loss.module)}."
        )
    for prop in (x, loss):
        check_mode(prop.module, allow_train_mode=prop.allow_train_mode)
    return select_params(x.module, params)


def _check_metric(caller: str, metric: ParamDict | None, weights: ParamDict) -> None:
    if metric is None:
        return
    if not isinstance(metric, Mapping):
        hint = " (pass its .metric)" if hasattr(metric, "metric") else ""
        raise TypeError(
            f"{caller}: metric must be a dict {{parameter name: tensor of its shape}} (a "
            f"diagonal metric, e.g. ntcov.optimizer_step(...).metric), got "
            f"{type(metric).__name__}{hint}."
        )
    for name, weight in weights.items():
        if name not in metric or metric[name].shape != weight.shape:
            found = list(metric[name].shape) if name in metric else "nothing"
            raise ValueError(
                f"{caller}: metric[{name!r}] must be a tensor of the parameter's shape "
                f"{list(weight.shape)} (a diagonal metric), got {found}."
            )


def _checked_value(prop: Property) -> Tensor:
    value = prop.value()
    _autodiff.check_output(prop, value)
    return value


def _num_examples(caller: str, loss: Property) -> int:
    """``N`` (from the per-example structure when there is one: no forward pass)."""
    if loss.per_example is not None:
        return loss.per_example.num_examples
    value = loss.value()
    _autodiff.check_output(loss, value)
    if value.dim() != 1:
        raise ValueError(
            f"{caller}: per_example_loss {loss.name!r} must be one loss per example, shape [N], "
            f"got {list(value.shape)}. Use ntcov.properties.per_example_loss."
        )
    return value.shape[0]


def _example_weights(caller: str, weights: Tensor | None, count: int, dtype: torch.dtype) -> Tensor:
    """``w_i`` as ``[N]`` in ``dtype`` (``1/N`` by default)."""
    if weights is None:
        return torch.full((count,), 1.0 / max(count, 1), dtype=dtype)
    if not isinstance(weights, Tensor) or weights.shape != (count,):
        shape = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"{caller}: weights must be a tensor of shape [{count}] (one per example), got {shape}."
        )
    return weights.detach().to(dtype)


def _check_chunk(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"attribute: chunk_size must be an int or None, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"attribute: chunk_size must be >= 1, got {chunk_size}.")
    return int(chunk_size)


def _scaled(rows: Rows, metric: ParamDict | None) -> Rows:
    """``M ⊙ v`` per block (``M`` broadcasts over leading row dimensions)."""
    if metric is None:
        return rows
    return {n: r * metric[n] for n, r in rows.items()}


# ----- batches of the training set -----------------------------------------------------------

LossBatch = tuple[int, int, Property]  # (first example, stop, ℓ of those examples)


def _loss_batches(
    caller: str, loss: Property, count: int, batch_size: int | None
) -> list[LossBatch]:
    """``ℓ`` as properties of consecutive example batches (one batch unless ``batch_size``)."""
    if batch_size is None or batch_size >= count:
        return [(0, count, loss)]
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(f"{caller}: batch_size must be an int >= 1 or None, got {batch_size!r}.")
    batch_size = int(batch_size)
    pe = loss.per_example
    if pe is None or pe.num_examples != count:
        raise ValueError(
            f"{caller}: batch_size needs a per_example_loss with per-example structure "
            f"(ntcov.properties.per_example_loss or Property.from_per_example); "
            f"{loss.name!r} has none."
        )
    batches = []
    for first in range(0, count, batch_size):
        part = pe.select(slice(first, first + batch_size))
        prop = Property.from_per_example(
            loss.module,
            part.fn,
            part.inputs,
            allow_train_mode=loss.allow_train_mode,
            name=f"{loss.name}[{first}:{first + part.num_examples}]",
        )
        batches.append((first, first + part.num_examples, prop))
    return _consistent(caller, loss, batches, count)


def _consistent(
    caller: str, loss: Property, batches: list[LossBatch], count: int
) -> list[LossBatch]:
    """``batches``, or one batch of all ``count`` examples (with a :class:`FallbackWarning`)
    when ``ℓ`` evaluated a batch at a time differs from its value over all examples: its rows
    depend on other examples (batch statistics, a sequence-first layout, train-mode dropout),
    and only the whole batch is the loss that was asked about."""
    whole = loss.value()
    agree = _autodiff._agreement(whole, count)
    if all(agree(prop.value(), first) for first, _stop, prop in batches):
        return batches
    _autodiff._warn(
        "batch_size",
        loss,
        f"{caller}: per_example_loss {loss.name!r} evaluated {batches[0][1]} examples at a time "
        f"differs from its value over all {count} examples (its rows depend on other "
        "examples); batch_size is ignored: one batch of all examples, exact but more memory.",
    )
    return [(0, count, loss)]


# ----- batched JVPs and VJPs -----------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The weights, metric and memory settings shared by one call."""

    weights: ParamDict
    metric: ParamDict | None
    memory_budget: int
    chunk_size: int | None
    batch_size: int | None

    def tangents_per_chunk(self, prop: Property) -> int:
        """How many JVP tangents to push through ``prop`` at once (``chunk_size``, or from the
        memory budget and one measured forward pass)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return tangents_per_chunk(prop, self.weights, self.memory_budget)


def _chunked_jvp(prop: Property, plan: _Plan, tangents: Rows, step: int | None = None) -> Tensor:
    """:func:`batched_jvp` over chunks of ``step`` tangents (default: the plan's), ``[c, *S]``."""
    count = next(iter(tangents.values())).shape[0]
    if step is None:
        step = plan.tangents_per_chunk(prop) if count > 1 else 1
    parts = [
        batched_jvp(prop, plan.weights, {n: t[s : s + step] for n, t in tangents.items()})
        for s in range(0, count, step)
    ]
    return torch.cat(parts)


def _cotangent_gradients(losses: list[LossBatch], weights: ParamDict, cotangents: Tensor) -> Rows:
    """``∇(u_g · ℓ)`` for each row ``u_g`` of ``cotangents`` (``[G, N]``): ``{name: [G, *p]}``.

    One forward and one batched backward pass per batch of examples (a loop of backward passes
    where batching fails), summed over the batches.
    """
    parts = []
    for first, stop, loss in losses:
        out, leaves = _autodiff.evaluate(loss, weights)
        _check_loss_shape(loss, out.shape, stop - first)
        _safeguards.check_finite_value("attribute", loss, out.detach(), weights)
        parts.append(_batched_vjp(loss, out, leaves, cotangents[:, first:stop].to(out)))
    return {n: torch.stack([p[n] for p in parts]).sum(0) for n in weights}


def _batched_vjp(loss: Property, out: Tensor, leaves: ParamDict, rows: Tensor) -> Rows:
    """``{name: [G, *p]}``: the VJPs of ``out`` with each row of ``rows`` (``[G, *out.shape]``)."""
    if rows.shape[0] == 1:  # one plain backward pass: no vmap overhead
        grads = torch.autograd.grad(
            out, list(leaves.values()), rows[0], allow_unused=True, retain_graph=True
        )
        grads = tuple(None if g is None else g[None] for g in grads)
        _autodiff.check_grads(loss, grads)
        return _filled(leaves, grads, 1)
    try:
        grads = torch.autograd.grad(
            out,
            list(leaves.values()),
            rows,
            allow_unused=True,
            is_grads_batched=True,
            retain_graph=True,
        )
    except (RuntimeError, NotImplementedError):
        per_row = [
            torch.autograd.grad(out, list(leaves.values()), r, allow_unused=True, retain_graph=True)
            for r in rows
        ]
        grads = tuple(
            None if parts[0] is None else torch.stack(parts)  # type: ignore[misc]
            for parts in zip(*per_row, strict=True)
        )
    _autodiff.check_grads(loss, grads)
    return _filled(leaves, grads, rows.shape[0])


def _filled(leaves: ParamDict, grads: Sequence[Tensor | None], count: int) -> Rows:
    return {
        n: (p.new_zeros((count, *p.shape)) if g is None else g.detach())
        for (n, p), g in zip(leaves.items(), grads, strict=True)
    }


# ----- the three splits ----------------------------------------------------------------------


def _per_example(
    x: Property,
    shape: torch.Size,
    losses: list[LossBatch],
    example_weights: Tensor,
    plan: _Plan,
    strategy: Strategy | str,
    params: ParamSelection,
) -> Tensor:
    """``c = −w ⊙ J_x M J_ℓᵀ``, ``[*S, N]`` (``shape`` is ``x``'s, ``[*S]``)."""
    chosen = as_choice(Strategy, strategy, "attribute", "strategy")
    if chosen is Strategy.AUTO and shape.numel() <= JVP_MAX_PROPERTIES:
        chosen = Strategy.JVP
    parts = []
    for first, stop, loss in losses:
        if chosen is Strategy.JVP:
            parts.append(_covariance_by_jvp(x, shape.numel(), loss, plan, stop - first))
        else:
            cov = ntcov(
                x,
                loss,
                params=params,
                strategy=chosen,
                memory_budget=plan.memory_budget,
                metric=plan.metric,
            )
            _check_loss_shape(loss, cov.shape[len(shape) :], stop - first)
            parts.append(cov.reshape(shape.numel(), -1))
    covariance = torch.cat(parts, dim=1)  # [K, N]
    props = [x, *(loss for _, _, loss in losses)]
    _safeguards.check_finite_outcome("attribute", covariance, props, plan.weights)
    return (-covariance * example_weights.to(covariance)).reshape(*shape, -1)


def _covariance_by_jvp(x: Property, count: int, loss: Property, plan: _Plan, n: int) -> Tensor:
    """``J_x M J_ℓᵀ`` (``[K, n]``): rows ``∇x_k`` by batched backward passes, then batched JVPs
    of ``ℓ`` (``n`` examples) along ``M ∇x_k`` (``count`` = ``K``)."""
    if count == 1:  # one plain backward pass, one plain JVP
        out, leaves = _autodiff.evaluate(x, plan.weights)
        gradient = _batched_vjp(x, out.reshape(1), leaves, out.new_ones(1, 1))
        column = _chunked_jvp(loss, plan, _scaled(gradient, plan.metric), 1)
        _check_loss_shape(loss, column.shape[1:], n)
        return column.reshape(1, -1)
    step = plan.tangents_per_chunk(loss)
    blocks = []
    for _, rows in _autodiff.vjp_rows(x, plan.weights, step):
        blocks.append(_chunked_jvp(loss, plan, _scaled(rows, plan.metric), step))
        _check_loss_shape(loss, blocks[-1].shape[1:], n)
    return torch.cat(blocks).reshape(count, -1)


def _check_loss_shape(loss: Property, shape: Sequence[int], n: int) -> None:
    if tuple(shape) != (n,):
        raise ValueError(
            f"attribute: per_example_loss {loss.name!r} must be one loss per example, shape "
            f"[{n}], got {list(shape)}. Use ntcov.properties.per_example_loss (or reduce the "
            "other dimensions in your property)."
        )


def _jvp_by_block(
    x: Property, direction: Rows, blocks: Mapping[str, list[str]], plan: _Plan
) -> Tensor:
    """``J_x^(l) v^(l)`` for each block ``l`` (the tangent ``v`` masked to it), ``[*S, L]``."""
    tangents = {
        n: torch.stack([v if n in names else torch.zeros_like(v) for names in blocks.values()])
        for n, v in direction.items()
    }
    values = _chunked_jvp(x, plan, tangents)  # [L, *S]
    return values.movedim(0, -1)


def _per_group(x: Property, losses: list[LossBatch], cotangents: Tensor, plan: _Plan) -> Tensor:
    """``J_x M (−∇ Σ_{i∈g} w_i ℓ_i)`` per group, ``[*S, G]``; the group gradients (batched
    backward passes over the examples) a chunk of groups at a time under the memory budget."""
    step = plan.tangents_per_chunk(losses[0][2])
    parts = []
    for start in range(0, cotangents.shape[0], step):
        gradients = _cotangent_gradients(losses, plan.weights, cotangents[start : start + step])
        directions = _scaled({n: -g for n, g in gradients.items()}, plan.metric)
        parts.append(_chunked_jvp(x, plan, directions))
    return torch.cat(parts).movedim(0, -1)


# ----- labels of blocks and groups -----------------------------------------------------------

REST = "(rest)"


def _parameter_blocks(
    module: torch.nn.Module, weights: ParamDict, groups: Mapping[str, ParamSelection] | None
) -> dict[str, list[str]]:
    """``{label: parameter names}``: disjoint blocks covering every selected weight."""
    if groups is None:
        blocks: dict[str, list[str]] = {}
        for name in weights:
            owner = name.rpartition(".")[0] or "(root)"
            blocks.setdefault(owner, []).append(name)
        return blocks
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError(
            "attribute: with by='layer', groups must be None or a non-empty dict "
            "{label: parameter or submodule names (or submodules)}."
        )
    blocks, seen = {}, dict[str, str]()
    for label, selection in groups.items():
        names = list(select_params(module, selection))
        outside = [n for n in names if n not in weights]
        if outside:
            raise ValueError(
                f"attribute: layer group {label!r} selects parameters that are not "
                f"differentiated: {outside} (frozen, or outside params=)."
            )
        twice = [n for n in names if n in seen]
        if twice:
            raise ValueError(
                f"attribute: layer groups must be disjoint; {twice} are in both "
                f"{seen[twice[0]]!r} and {label!r}."
            )
        seen.update(dict.fromkeys(names, label))
        blocks[str(label)] = names
    rest = [n for n in weights if n not in seen]
    if rest:
        blocks[REST] = rest
    return blocks


def _data_groups(groups: Any, count: int) -> tuple[tuple[Any, ...], Tensor]:
    """``(labels, membership [G, N])`` from ``[N]`` labels or ``{label: indices}``."""
    if isinstance(groups, Mapping):
        return _groups_from_mapping(groups, count)
    if isinstance(groups, Tensor):
        if groups.shape != (count,):
            raise ValueError(
                f"attribute: with by='group', a groups tensor must be [N] = [{count}] labels, "
                f"got {list(groups.shape)}."
            )
        values: Sequence[Hashable] = groups.tolist()
    elif isinstance(groups, np.ndarray) and groups.shape == (count,):
        values = groups.tolist()
    elif isinstance(groups, Sequence) and not isinstance(groups, str) and len(groups) == count:
        values = list(groups)
    else:
        raise TypeError(
            f"attribute: with by='group', groups must be [N] = [{count}] labels (a tensor or a "
            "sequence) or a dict {label: example indices}."
        )
    labels = tuple(dict.fromkeys(values))
    position = {label: g for g, label in enumerate(labels)}
    membership = torch.zeros(len(labels), count)
    membership[torch.tensor([position[v] for v in values]), torch.arange(count)] = 1.0
    return labels, membership


def _groups_from_mapping(groups: Mapping[Any, Any], count: int) -> tuple[tuple[Any, ...], Tensor]:
    membership = torch.zeros(len(groups) + 1, count)
    for g, (label, indices) in enumerate(groups.items()):
        membership[g, _group_indices(label, indices, count)] = 1.0
    if (membership.sum(0) > 1).any():
        raise ValueError("attribute: groups must be disjoint; some examples are in two groups.")
    membership[-1] = 1.0 - membership[:-1].sum(0)
    labels: tuple[Any, ...] = tuple(groups)
    if membership[-1].any():
        return (*labels, REST), membership
    return labels, membership[:-1]


def _group_indices(label: Any, indices: Any, count: int) -> Tensor:
    """The example indices of one group: integers in ``[0, N)``, each once, or an ``[N]``
    boolean mask."""
    index = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
    if index.dtype == torch.bool:
        if index.shape != (count,):
            raise ValueError(
                f"attribute: group {label!r} is a boolean mask of shape {list(index.shape)}; "
                f"a mask must be [N] = [{count}]."
            )
        return index.nonzero().reshape(-1)
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(
            f"attribute: group {label!r} has non-integer example indices ({index.dtype}); "
            "give integer indices or an [N] boolean mask."
        )
    index = index.reshape(-1).long()
    if index.numel() and (index.min() < 0 or index.max() >= count):
        raise ValueError(f"attribute: group {label!r} has example indices outside [0, {count}).")
    if index.unique().numel() != index.numel():
        raise ValueError(f"attribute: group {label!r} lists an example more than once.")
    return index


# ----- over a training run -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepAttribution:
    """One optimizer step's first-order change of ``x`` (every tensor ``[*S]`` or ``[*S, ·]``).

    ``contributions`` (``[*S, B]``): ``c_i = −(1/B) J_x M ∇ℓ_i`` for the ``B`` examples of the
    step (training-set positions ``indices``); ``force`` their sum ``J_x(−M ∇L)``; ``bias``
    ``J_x b`` (momentum, weight decay: not attributable to an example of this step);
    ``layers`` (``[*S, L]``, or ``None``): ``J_x^(l) Δw^(l)``, summing to ``force + bias``.
    """

    value: Tensor
    indices: Tensor
    contributions: Tensor
    force: Tensor
    bias: Tensor
    layers: Tensor | None

    @property
    def first_order(self) -> Tensor:
        """``J_x Δw = force + bias``: the predicted change of ``x`` over this step."""
        return self.force + self.bias


def _count(num_examples: object) -> int:
    """``num_examples`` as an ``int >= 1`` (numpy integers accepted), else a ValueError."""
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, numbers.Integral)
        or int(num_examples) < 1
    ):
        raise ValueError(
            f"TrainingAttribution: num_examples must be an int >= 1, got {num_examples!r}."
        )
    return int(num_examples)


def _refuse_unmodelled(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    """Refuse, at construction, an optimizer :func:`ntcov.optimizer_step` cannot model."""
    try:
        optimizer_step(optimizer, module, {})
    except TypeError as err:
        raise TypeError(f"TrainingAttribution: {err}") from err


class TrainingAttribution:
    """Per-example (and per-layer) parts of the change of ``x`` over a whole training run.

    Call :meth:`record` before every ``optimizer.step()`` with the per-example loss of that
    step's batch and the batch's positions in the training set. Each step's update is
    ``Δw = −M ∇L_B + b`` (read from the optimizer, exactly as ``optimizer.step()`` will apply
    it, :func:`ntcov.optimizer_step`), so

        Δx ≈ J_x Δw = Σ_{i∈B} c_i + J_x b,       c_i = −(1/B) J_x M ∇ℓ_i

    What is exact: the first-order change of every step, split over the examples of its batch
    (and over layers), under the optimizer's real metric. What is not attributed to examples:
    the bias ``J_x b`` (the carried momentum, weight decay), kept as :attr:`bias`; and the
    higher-order terms, measured by :meth:`unexplained`. The step must use the gradient of
    ``mean_i ℓ_i`` over the batch (e.g. ``CrossEntropyLoss()`` on the batch): the parts are
    computed from ``ℓ``'s own gradients, so gradient clipping, loss scaling or extra loss terms
    applied to ``p.grad`` are not seen and end up in :meth:`unexplained` (the :class:`Monitor`
    reads ``p.grad`` and does see them). The model and the optimizer are never changed.
    """

    def __init__(
        self,
        x: Property,
        optimizer: torch.optim.Optimizer,
        num_examples: int,
        *,
        layers: bool = True,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(x, Property):
            raise TypeError(
                f"TrainingAttribution: x must be an ntcov.Property, got {type(x).__name__}."
            )
        num_examples = _count(num_examples)
        _refuse_unmodelled(optimizer, x.module)
        self.x, self.optimizer, self.num_examples = x, optimizer, num_examples
        self._layers, self._budget, self._chunk = layers, memory_budget, _check_chunk(chunk_size)
        value = x.value().detach()
        self.start_value: Tensor | None = None
        self.contributions = value.new_zeros(*value.shape, num_examples)
        self.bias = torch.zeros_like(value)
        self.layer_values: Tensor | None = None
        self.layer_labels: tuple[str, ...] = ()
        self.steps = 0

    @_public
    def record(
        self, per_example_loss: Property, indices: Tensor | Sequence[int] | None = None
    ) -> StepAttribution:
        """Attribute the coming ``optimizer.step()``; call it just before the step.

        ``per_example_loss`` is ``ℓ`` of the step's batch (``[B]``), ``indices`` the batch's
        positions in the training set (``[B]``; default ``0 … N−1`` for a full batch).
        """
        step = self._attribute_step(per_example_loss, indices)
        if self.start_value is None:
            self.start_value = step.value
        self.contributions.index_add_(-1, step.indices, step.contributions)
        self.bias += step.bias
        if step.layers is not None:
            self.layer_values = (
                step.layers if self.layer_values is None else self.layer_values + step.layers
            )
        self.steps += 1
        return step

    def _attribute_step(
        self, loss: Property, indices: Tensor | Sequence[int] | None
    ) -> StepAttribution:
        x = self.x
        weights = _prepare("TrainingAttribution.record", x, loss, None)
        count = _num_examples("TrainingAttribution.record", loss)
        index = self._indices(indices, count)
        value = x.value().detach()
        mean = torch.full((count,), 1.0 / count, dtype=value.dtype)
        losses = [(0, count, loss)]
        grad = {n: g[0] for n, g in _cotangent_gradients(losses, weights, mean[None]).items()}
        update = optimizer_step(self.optimizer, x.module, grad)
        metric = {n: update.metric[n] for n in weights}
        bias_direction = {n: update.bias[n] for n in weights}
        plan = _Plan(weights, metric, self._budget, self._chunk, None)
        contributions = _per_example(x, value.shape, losses, mean, plan, Strategy.AUTO, None)
        bias = _jvp_or_zero(x, plan, bias_direction, value)
        layers = None
        if self._layers:
            blocks = _parameter_blocks(x.module, weights, None)
            self.layer_labels = tuple(blocks)
            delta = {n: -metric[n] * grad[n] + bias_direction[n] for n in weights}
            layers = _jvp_by_block(x, delta, blocks, plan)
        return StepAttribution(value, index, contributions, contributions.sum(-1), bias, layers)

    def _indices(self, indices: Tensor | Sequence[int] | None, count: int) -> Tensor:
        if indices is None:
            if count != self.num_examples:
                raise ValueError(
                    f"TrainingAttribution.record: the batch has {count} examples but the "
                    f"training set {self.num_examples}; pass indices= (the batch's positions)."
                )
            return torch.arange(count)
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() != count or (
            count and (index.min() < 0 or index.max() >= self.num_examples)
        ):
            raise ValueError(
                f"TrainingAttribution.record: indices must be {count} positions in "
                f"[0, {self.num_examples}), one per row of per_example_loss."
            )
        return index

    @property
    def predicted_change(self) -> Tensor:
        """``Σ_steps J_x Δw_t = Σ_i contributions_i + bias``, ``[*S]``."""
        return self.contributions.sum(-1) + self.bias

    def result(self) -> Contributions:
        """The accumulated per-example parts (``[*S, N]``) as :class:`Contributions`."""
        return Contributions(self.contributions, tuple(range(self.num_examples)), By.EXAMPLE)

    def layer_result(self) -> Contributions:
        """The accumulated per-layer parts of ``J_x Δw`` (bias included), ``[*S, L]``."""
        if self.layer_values is None:
            raise ValueError(
                "TrainingAttribution: no layer split (layers=False, or no step recorded)."
            )
        return Contributions(self.layer_values, self.layer_labels, By.LAYER)

    def unexplained(self) -> Tensor:
        """``x(now) − x(first record) − predicted_change``: the higher-order remainder, ``[*S]``.

        Call it after the last ``optimizer.step()``.
        """
        if self.start_value is None:
            raise ValueError("TrainingAttribution.unexplained: no step recorded yet.")
        return self.x.value().detach() - self.start_value - self.predicted_change


def _jvp_or_zero(x: Property, plan: _Plan, direction: Rows, like: Tensor) -> Tensor:
    if not any(bool(t.any()) for t in direction.values()):
        return torch.zeros_like(like)
    return batched_jvp(x, plan.weights, {n: t[None] for n, t in direction.items()})[0]
