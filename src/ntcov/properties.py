"""Ready-made properties of a classifier or regressor ``model(x) -> outputs``.

All but :func:`loss` have per-example structure (row ``i`` depends only on example ``i``), so the
covariance engine can use per-example gradients for them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ntcov.property import Property

__all__ = ["log_probs", "logits", "loss", "per_example_loss", "probs"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def logits(model: nn.Module, x: Tensor, *, allow_train_mode: bool = False) -> Property:
    """The model's outputs ``model(x)``, shape ``[N, *out]``."""
    return Property.from_per_example(
        model, lambda m, xs: m(xs), x, allow_train_mode=allow_train_mode, name="logits"
    )


def probs(
    model: nn.Module, x: Tensor, target: Tensor | int, *, allow_train_mode: bool = False
) -> Property:
    """``softmax(model(x))[i, target_i]``: the probability of each example's target class, ``[N]``.

    ``target`` is a class index for all examples or a ``[N]`` integer tensor.
    """
    targets = _targets(x, target, "probs")
    return Property.from_per_example(
        model,
        lambda m, xs, ts: _pick(torch.softmax(m(xs), dim=-1), ts),
        (x, targets),
        allow_train_mode=allow_train_mode,
        name="probs",
    )


def log_probs(
    model: nn.Module, x: Tensor, target: Tensor | int, *, allow_train_mode: bool = False
) -> Property:
    """``log_softmax(model(x))[i, target_i]``, ``[N]``."""
    targets = _targets(x, target, "log_probs")
    return Property.from_per_example(
        model,
        lambda m, xs, ts: _pick(torch.log_softmax(m(xs), dim=-1), ts),
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
    _check_pair(x, y, "loss")
    return Property(model, lambda m: fn(m(x), y), allow_train_mode=allow_train_mode, name="loss")


def per_example_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    *,
    allow_train_mode: bool = False,
) -> Property:
    """The loss of each example ``ℓ_i``, shape ``[N]``; ``mean(ℓ) = loss(...)``.

    ``loss_fn`` is a ``torch.nn`` loss module (used as a copy with ``reduction='none'``) or a
    function returning one loss per example, ``[N]``. Unreduced losses with more than one entry
    per example (``MSELoss`` on ``[N, D]`` outputs) are averaged over each example's entries, as
    ``reduction='mean'`` does.
    """
    _check_pair(x, y, "per_example_loss")
    unreduced = _unreduced(loss_fn if loss_fn is not None else nn.CrossEntropyLoss())

    def rows(m: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
        values = unreduced(m(xs), ys)
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


def _unreduced(loss_fn: LossFn) -> LossFn:
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"  # type: ignore[assignment]
        return unreduced
    return loss_fn


def _pick(table: Tensor, targets: Tensor) -> Tensor:
    return table.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _targets(x: Tensor, target: Tensor | int, caller: str) -> Tensor:
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    if not isinstance(target, Tensor) or target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{caller}: target must be an int or an integer tensor of class indices.")
    _check_pair(x, target, caller)
    return target.long()


def _check_pair(x: Tensor, y: Tensor, caller: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{caller}: x and targets must be tensors.")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{caller}: x and targets must share their first (example) dimension, got "
            f"{list(x.shape)} and {list(y.shape)}."
        )
