"""Ready-made properties of a classifier or regressor ``model(x) -> outputs``.

All but :func:`loss` have per-example structure, so the covariance engine can use per-example
gradients for them. That assumes dim 0 of ``x`` (and of ``model(x)``) is the example axis and
row ``i`` of ``model(x)`` depends on example ``i`` only (no batch statistics, no centring over
the batch); when that fails (a sequence-first RNN, say) the engine notices and falls back to
exact batched VJPs with a :class:`~ntcov.FallbackWarning`. Inputs and targets must be tensors;
NumPy integer targets are converted.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ntcov.property import Property

__all__ = ["log_probs", "logits", "loss", "per_example_loss", "probs"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def logits(model: nn.Module, x: Tensor, *, allow_train_mode: bool = False) -> Property:
    """The model's outputs ``model(x)``, shape ``[N, *out]``: ``x`` is ``[N, ...]`` with the
    examples on dim 0, and row ``i`` of the output must depend on example ``i`` only."""
    _check_input(x, "logits")
    return Property.from_per_example(
        model, lambda m, xs: m(xs), x, allow_train_mode=allow_train_mode, name="logits"
    )


def probs(
    model: nn.Module, x: Tensor, target: Tensor | int, *, allow_train_mode: bool = False
) -> Property:
    """``softmax(model(x))[i, target_i]``: the probability of each example's target class, ``[N]``.

    ``x`` is ``[N, ...]`` with the examples on dim 0 and ``model(x)`` is ``[N, C]``; ``target``
    is one class index for all examples or ``[N]`` integer class indices (a tensor or a NumPy
    array).
    """
    targets = _targets(x, target, "probs")
    return Property.from_per_example(
        model,
        lambda m, xs, ts: _pick(torch.softmax(_outputs(m, xs, "probs"), dim=-1), ts),
        (x, targets),
        allow_train_mode=allow_train_mode,
        name="probs",
    )


def log_probs(
    model: nn.Module, x: Tensor, target: Tensor | int, *, allow_train_mode: bool = False
) -> Property:
    """``log_softmax(model(x))[i, target_i]``, ``[N]``; ``x`` and ``target`` as in :func:`probs`."""
    targets = _targets(x, target, "log_probs")
    return Property.from_per_example(
        model,
        lambda m, xs, ts: _pick(torch.log_softmax(_outputs(m, xs, "log_probs"), dim=-1), ts),
        (x, targets),
        allow_train_mode=allow_train_mode,
        name="log_probs",
    )


def loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    *,
    allow_train_mode: bool = False,
) -> Property:
    """The scalar training loss ``loss_fn(model(x), y)`` (cross-entropy by default).

    ``loss_fn`` must return a scalar (e.g. a mean); a non-scalar is reported where a scalar
    is needed.
    """
    fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    y = _as_tensor(y)
    _check_pair(x, y, "loss")
    return Property(
        model,
        lambda m: fn(_outputs(m, x, "loss"), y),
        allow_train_mode=allow_train_mode,
        name="loss",
    )


def per_example_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    *,
    allow_train_mode: bool = False,
) -> Property:
    """The loss of each example ``ℓ_i``, shape ``[N]``: ``loss_fn``'s unreduced loss.

    ``loss_fn`` is a ``torch.nn`` loss module (used as a copy with ``reduction='none'``) or a
    function returning one loss per example, ``[N]``. Unreduced losses with more than one entry
    per example (``MSELoss`` on ``[N, D]`` outputs) are averaged over each example's entries.

    How ``ℓ`` adds up to :func:`loss` with the same ``loss_fn`` depends on its reduction:

    - an unweighted ``reduction='mean'`` loss (the default ``CrossEntropyLoss()``, ``MSELoss()``):
      ``loss = mean_i ℓ_i``, so ``rate(x, loss) = −(1/N) Σ_i ntcov(x, ℓ_i)``;
    - ``reduction='sum'``: ``loss = Σ_i ℓ_i``;
    - ``CrossEntropyLoss`` / ``NLLLoss`` with ``weight=w`` or ``ignore_index``:
      ``loss = Σ_i ℓ_i / Σ_i w_i`` with ``w_i = w[y_i]`` (1 without ``weight``) and ``w_i = 0``
      where ``y_i == ignore_index`` (``ℓ_i = 0`` there); ``ℓ_i`` already carries ``w[y_i]``.
    """
    y = _as_tensor(y)
    _check_pair(x, y, "per_example_loss")
    unreduced = _unreduced(loss_fn if loss_fn is not None else nn.CrossEntropyLoss())

    def rows(m: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
        values = unreduced(_outputs(m, xs, "per_example_loss"), ys)
        if values.dim() == 0 or values.shape[0] != xs.shape[0]:
            raise ValueError(
                f"per_example_loss: loss_fn returned shape {list(values.shape)} for a batch of "
                f"{xs.shape[0]}; it must return one loss per example. Pass an nn loss module "
                "(its reduction is switched off) or a function with reduction='none'."
            )
        # a 'mean' loss averages over every entry, so each example's loss is the mean of its own
        return values.reshape(xs.shape[0], -1).mean(1) if values.dim() > 1 else values

    return Property.from_per_example(
        model, rows, (x, y), allow_train_mode=allow_train_mode, name="per_example_loss"
    )


def _outputs(model: nn.Module, x: Tensor, caller: str) -> Tensor:
    """``model(x)``, refused with the builder's name when it is not one tensor."""
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{caller}: {type(model).__name__}(x) returned a {type(out).__name__}, expected one "
            "tensor of outputs [N, C]. Build the property from the output you want, e.g. "
            "ntcov.Property.from_per_example(model, lambda m, xs: m(xs)['logits'], x)."
        )
    return out


def _unreduced(loss_fn: LossFn) -> LossFn:
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"  # type: ignore[assignment]
        return unreduced
    return loss_fn


def _pick(table: Tensor, targets: Tensor) -> Tensor:
    return table.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _targets(x: Tensor, target: Tensor | int, caller: str) -> Tensor:
    """Class indices ``[N]`` (long) from one index for all examples or ``[N]`` indices."""
    _check_input(x, caller)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return torch.full((x.shape[0],), int(target), dtype=torch.long, device=x.device)
    target = _as_tensor(target)
    if not isinstance(target, Tensor) or not _is_integer(target):
        raise TypeError(f"{caller}: target must be an int or an integer tensor of class indices.")
    if target.dim() != 1:
        raise ValueError(
            f"{caller}: target must be one class index per example, shape [N], got shape "
            f"{list(target.shape)}. Flatten it (target.reshape(-1)) if it is [N, 1]."
        )
    _check_pair(x, target, caller)
    return target.long()


def _is_integer(tensor: Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _as_tensor(value: Any) -> Any:
    """NumPy arrays and scalars become tensors; anything else is returned as it is."""
    if isinstance(value, np.ndarray | np.generic):
        return torch.as_tensor(value)
    return value


def _check_input(x: Any, caller: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{caller}: x must be a torch.Tensor, got {type(x).__name__}. Convert it first, "
            "e.g. torch.as_tensor(x, dtype=torch.float32)."
        )
    if x.dim() == 0:
        raise ValueError(f"{caller}: x must be [N, ...] with the examples on dim 0, got a scalar.")


def _check_pair(x: Tensor, y: Tensor, caller: str) -> None:
    _check_input(x, caller)
    if not isinstance(y, Tensor):
        raise TypeError(
            f"{caller}: targets must be a torch.Tensor or a NumPy array, got {type(y).__name__}."
        )
    if y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{caller}: x and targets must share their first (example) dimension, got "
            f"{list(x.shape)} and {list(y.shape)}."
        )
