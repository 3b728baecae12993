"""Sharded covariances over ``torch.distributed``: the data split across ranks, exact results.

Everything ntcov computes over a training set is a *sum* over examples (the gradient of the mean
loss, per-layer or per-group totals) or a *concatenation* over examples (the ``[K, N]`` matrix of
per-example covariances, the rows of a Gram matrix). Each rank holds one shard of the examples,
computes its part, and only results travel:

- ``full_gradient``: ``∇_w (1/N) Σ_i ℓ_i`` — each rank backpropagates the sum over its shard,
  one ``all_reduce`` of a parameter-sized vector (what DistributedDataParallel does).
- ``rate``: ``J_x M (−∇L)`` for properties ``x`` held by every rank — the reduced gradient, then
  one local JVP.
- ``ntcov_examples``: ``ntcov(a, b)`` where ``b``'s example axis is sharded — each rank computes
  ``[*S_a, N_r]`` and the blocks are gathered to ``[*S_a, N]``.
- ``gram``: ``ntcov(p, p)`` for a per-example property ``p`` whose inputs are sharded — the
  *inputs* are gathered (data, not gradients), each rank computes its block of rows, the row
  blocks are gathered.
- ``attribute``: :func:`ntcov.attribute` over a sharded training set — per example, each rank
  its ``[*S, N_r]`` columns (weights ``1/N`` of the whole set), gathered; per layer, each rank
  the split of its shard's share of the rate, summed.

No per-example gradient ever leaves a rank. Launch with ``torchrun --nproc_per_node R ...`` and
call :func:`init` (gloo on CPU, NCCL when the model is on a GPU). Without an initialised process
group every function runs as a single process (world size 1), so the same code runs anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ntcov import _autodiff
from ntcov._choice import as_choice
from ntcov.attribution import By, Contributions
from ntcov.attribution import attribute as _attribute
from ntcov.covariance import DEFAULT_MEMORY_BUDGET, Strategy, ntcov
from ntcov.params import ParamDict, ParamSelection, select_params
from ntcov.property import Property

__all__ = [
    "all_gather_examples",
    "all_reduce_sum",
    "attribute",
    "full_gradient",
    "gram",
    "init",
    "is_launched",
    "ntcov_examples",
    "rank",
    "rate",
    "shard",
    "shard_slice",
    "world_size",
]


def is_launched() -> bool:
    """True under ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(backend: str | None = None) -> bool:
    """Join the process group described by the launcher's environment, once.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. Returns
    ``True`` when this process is part of a group of more than one rank.
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized() and is_launched():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen)
    return world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_slice(num_examples: int, *, rank_: int | None = None, size: int | None = None) -> slice:
    """The contiguous, balanced shard of ``range(num_examples)`` that ``rank_`` holds.

    The first ``num_examples % size`` ranks hold one example more; shards of ranks in order
    concatenate to the whole range, so gathered results are in the original example order.
    """
    r = rank() if rank_ is None else rank_
    n = world_size() if size is None else size
    if num_examples < 0 or n < 1 or not 0 <= r < n:
        raise ValueError(
            f"shard_slice: need num_examples >= 0 and 0 <= rank < size, got "
            f"num_examples={num_examples}, rank={r}, size={n}."
        )
    base, extra = divmod(num_examples, n)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def shard(*tensors: Tensor) -> tuple[Tensor, ...]:
    """This rank's shard (:func:`shard_slice`) of each tensor along dim 0."""
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(
            f"shard: tensors must share their first (example) dimension, got "
            f"{[tuple(t.shape) for t in tensors]}."
        )
    part = shard_slice(sizes.pop())
    return tuple(t[part] for t in tensors)


def all_gather_examples(local: Tensor, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``local`` along ``dim`` in rank order (sizes may differ)."""
    if world_size() == 1:
        return local
    dim = dim % max(local.dim(), 1)
    sizes = _gather_sizes(local.shape[dim], local.device)
    padded_shape = list(local.shape)
    padded_shape[dim] = max(sizes)
    padded = local.new_zeros(padded_shape)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)], dim=dim)


def _gather_sizes(size: int, device: torch.device) -> list[int]:
    mine = torch.tensor([size], device=device, dtype=torch.long)
    sizes = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Sum each tensor over ranks (one flattened all_reduce for all of them)."""
    if world_size() == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return [part.view_as(t) for part, t in zip(parts, tensors, strict=True)]


def full_gradient(
    shard_loss_sum: Property, num_examples: int, *, params: ParamSelection = None
) -> ParamDict:
    """``∇_w (1/N) Σ_i ℓ_i`` from every rank's ``Σ_{i ∈ shard} ℓ_i`` (a scalar property).

    ``num_examples`` is ``N``, the size of the whole dataset (the sum of the shard sizes).
    One backward pass per rank and one all_reduce of the gradient.
    """
    _check_count("full_gradient", num_examples)
    weights = select_params(shard_loss_sum.module, params)
    _, grad = _autodiff.gradient(shard_loss_sum, weights, caller="full_gradient")
    names = list(grad)
    summed = all_reduce_sum([grad[n].detach() for n in names])
    return {n: g / num_examples for n, g in zip(names, summed, strict=True)}


def rate(
    x: Property,
    shard_loss_sum: Property,
    num_examples: int,
    *,
    params: ParamSelection = None,
    metric: ParamDict | None = None,
) -> Tensor:
    """Price's rate ``dx/dt = J_x M (−∇L)`` for ``L`` the mean loss over the sharded dataset.

    ``x`` is held by every rank (e.g. held-out predictions); the result is the same on all.
    """
    if x.module is not shard_loss_sum.module:
        raise ValueError("rate: x and shard_loss_sum must be properties of the same module.")
    grad = full_gradient(shard_loss_sum, num_examples, params=params)
    weights = select_params(x.module, params)
    ascent = {n: -g * (metric[n] if metric is not None else 1) for n, g in grad.items()}
    with torch.enable_grad():
        return _autodiff.directional(x, weights, ascent, force_reverse=False)[1].detach()


def ntcov_examples(
    a: Property,
    b_shard: Property,
    *,
    params: ParamSelection = None,
    strategy: Strategy | str = Strategy.AUTO,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    metric: ParamDict | None = None,
) -> Tensor:
    """``ntcov(a, b)`` ``[*S_a, N, *item]`` where ``b`` (``[N, *item]``) is sharded over ranks.

    Each rank passes its shard ``b_shard`` (``[N_r, *item]``, e.g. its per-example losses); ``a``
    is held by every rank. The per-rank blocks are gathered in rank order, so the result equals
    the single-process ``ntcov(a, b)`` for shards taken with :func:`shard`.
    """
    local = ntcov(
        a, b_shard, params=params, strategy=strategy, memory_budget=memory_budget, metric=metric
    )
    return all_gather_examples(local, dim=len(a.shape))


def gram(
    p_shard: Property,
    *,
    params: ParamSelection = None,
    strategy: Strategy | str = Strategy.AUTO,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    metric: ParamDict | None = None,
) -> Tensor:
    """``ntcov(p, p)`` ``[N, *item, N, *item]`` for a per-example property with sharded inputs.

    ``p_shard`` must come from :meth:`Property.from_per_example` on this rank's inputs. The
    inputs (not gradients) are gathered so that every rank can evaluate ``p`` on all examples;
    each rank computes its rows ``ntcov(p_shard, p)`` and the row blocks are gathered.
    """
    pe = p_shard.per_example
    if pe is None:
        raise ValueError(
            f"gram: property {p_shard.name!r} has no per-example structure; build it with "
            "Property.from_per_example(module, fn, inputs) on this rank's shard of the inputs."
        )
    inputs = tuple(all_gather_examples(x) for x in pe.inputs)
    whole = Property.from_per_example(
        p_shard.module, pe.fn, inputs, allow_train_mode=p_shard.allow_train_mode
    )
    rows = ntcov(
        p_shard, whole, params=params, strategy=strategy, memory_budget=memory_budget, metric=metric
    )
    return all_gather_examples(rows, dim=0)


def attribute(
    x: Property,
    shard_loss: Property,
    num_examples: int,
    *,
    by: By | str = By.EXAMPLE,
    metric: ParamDict | None = None,
    params: ParamSelection = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Contributions:
    """:func:`ntcov.attribute` of ``x`` over the mean loss of a dataset sharded across ranks.

    ``shard_loss`` is this rank's per-example loss ``[N_r]`` (shards taken with :func:`shard`,
    so that gathering in rank order restores the example order); ``num_examples`` is ``N``.
    ``by="example"``: ``[*S, N]`` parts ``c_i = −(1/N) ntcov_M(x, ℓ_i)``, labelled by global
    example index. ``by="layer"``: each rank splits its shard's share of the rate by layer and
    the splits are summed. Every rank gets the whole result.
    """
    chosen = as_choice(By, by, "distributed.attribute", "by")
    if chosen is By.GROUP:
        raise ValueError(
            "distributed.attribute: by='group' is not sharded; use by='example' and sum the "
            "gathered parts over each group (exact: the parts add up)."
        )
    _check_count("distributed.attribute", num_examples)
    local_count = shard_loss.shape[0] if shard_loss.shape else 0
    first = next(iter(select_params(x.module, params).values()))
    weights = torch.full((local_count,), 1.0 / num_examples, dtype=first.dtype, device=first.device)
    local = _attribute(
        x, shard_loss, by=chosen, metric=metric, weights=weights, params=params,
        memory_budget=memory_budget,
    )  # fmt: skip
    if chosen is By.EXAMPLE:
        values = all_gather_examples(local.values, dim=local.values.dim() - 1)
        return Contributions(values, tuple(range(values.shape[-1])), chosen)
    (values,) = all_reduce_sum([local.values])
    return Contributions(values, local.labels, chosen)


def _check_count(caller: str, num_examples: int) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(
            f"{caller}: num_examples must be the whole dataset's size (an int >= 1), "
            f"got {num_examples!r}."
        )
