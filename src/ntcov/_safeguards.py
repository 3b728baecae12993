"""Checks that turn silent wrong numbers and out-of-memory crashes into clear errors.

- :func:`check_finite_value` / :func:`check_finite_result`: a property with ``nan``/``inf``
  values, diverged weights, or a gradient that is not finite (``sqrt``, ``log``, ``norm`` or a
  division at 0 inside ``fn``) raise a ``ValueError`` naming the property or parameter.
- :func:`check_fits`: a result (``[*S_a, *S_b]``) or a full Jacobian (``[K, P]``, the ``LOOP``
  reference) larger than the memory available on its device is refused up front, with its size
  and the option that avoids it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ntcov.params import ParamDict
from ntcov.property import Property

__all__ = [
    "available_bytes",
    "check_finite_result",
    "check_finite_value",
    "check_finite_weights",
    "check_fits",
]


def check_finite_value(caller: str, prop: Property, value: Tensor, weights: ParamDict) -> None:
    """Refuse a property whose value has ``nan`` or ``inf`` entries (its gradient is undefined),
    naming the diverged parameter when the weights are the cause."""
    if value.numel() == 0 or bool(torch.isfinite(value).all()):
        return
    check_finite_weights(caller, weights)
    bad = int((~torch.isfinite(value)).sum())
    raise ValueError(
        f"{caller}: property {prop.name!r} has non-finite values ({bad} of {value.numel()} "
        "entries are nan or inf), so its gradient is undefined. Check its inputs and fn (log of "
        "0, division by 0, overflow), or use log-space versions (log_softmax instead of "
        "log(softmax))."
    )


def check_finite_result(
    caller: str, result: Tensor, props: Sequence[Property], weights: ParamDict
) -> Tensor:
    """``result`` if it is finite; otherwise a ``ValueError`` naming the diverged parameter, or
    the properties whose gradient is not finite."""
    if result.numel() == 0 or bool(torch.isfinite(result).all()):
        return result
    check_finite_weights(caller, weights)
    names = " or ".join(dict.fromkeys(repr(p.name) for p in props))
    raise ValueError(
        f"{caller}: the result has nan or inf entries: the gradient of property {names} is not "
        "finite at these weights (sqrt, norm, log or pow at 0, or a division by 0, inside fn). "
        "Add a small epsilon inside fn (e.g. sqrt(x + 1e-12))."
    )


def check_finite_outcome(
    caller: str, result: Tensor, props: Sequence[Property], weights: ParamDict
) -> Tensor:
    """``result`` if it is finite; otherwise the error naming the property with non-finite
    values (evaluated only then), else :func:`check_finite_result`'s."""
    if result.numel() == 0 or bool(torch.isfinite(result).all()):
        return result
    for prop in props:
        check_finite_value(caller, prop, prop.value(), weights)
    return check_finite_result(caller, result, props, weights)


def check_finite_weights(caller: str, weights: ParamDict) -> None:
    """Refuse weights with ``nan`` or ``inf`` entries, naming the first such parameter."""
    for name, weight in weights.items():
        if not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(
                f"{caller}: parameter {name!r} has {bad} non-finite entries (nan or inf): the "
                "weights have diverged (lower the learning rate, or clip gradients)."
            )


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: free device memory; CPU: the kernel's
    ``MemAvailable``), or ``None`` when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.3g} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.3g} TiB"  # unreachable


def check_fits(
    caller: str, what: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device, fix: str
) -> None:
    """Refuse to allocate a ``shape`` tensor that needs more than the free memory of ``device``.

    ``what`` says what the tensor is ("the result", "the full Jacobian of 'x'"); ``fix`` says
    how to avoid it. Nothing is checked where the free memory cannot be told.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    needed = numel * torch.empty((), dtype=dtype).element_size()
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    raise ValueError(
        f"{caller}: {what} has shape {list(shape)} ({format_bytes(needed)} of {dtype}), more "
        f"than the {format_bytes(free)} free on {device}; {fix}"
    )
