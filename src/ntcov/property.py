"""Properties: differentiable functions of a module's weights, with algebra.

A :class:`Property` wraps ``fn(module) -> Tensor`` and evaluates it with the module's parameters
replaced by a parameter dict through :func:`torch.func.functional_call`, so that it is a pure
function ``x(w)`` of the weights. Buffers are held fixed and the user's module is never changed.

Properties combine like tensors of constants: ``a + b``, ``a - b``, ``c * a``, ``a / c``,
``F @ a``, ``a[idx]`` and ``a * b`` (the product rule comes from autodiff). A property may also
know that each of its rows depends on one input example (``per_example``); the covariance engine
then uses per-example gradients instead of one backward pass per entry.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ntcov.params import (
    ParamDict,
    check_mode,
    clone_buffers,
    copies_of_weights_written_in_place,
)

__all__ = ["PerExample", "Property"]

Constant = float | int | Tensor


class _Apply(nn.Module):
    """Holds the user's module as a child so ``functional_call`` can run any ``fn(module)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        return fn(self.module, *args)


def _call(
    module: nn.Module,
    params: ParamDict,
    fn: Callable[..., Tensor],
    *args: Any,
    name: str = "property",
) -> Tensor:
    """``fn(module, *args)`` with ``module``'s parameters replaced by ``params``.

    The buffers are passed as copies, so a forward pass that updates a buffer in place (running
    statistics, a call counter) never changes the user's module; so are the weights that the
    forward pass itself overwrites (embeddings with ``max_norm``) when ``params`` lacks them.
    Every evaluation draws its random numbers (dropout masks) from torch's generator seeded with
    :data:`RANDOMNESS_SEED`, restored afterwards: the property is one deterministic function of
    the weights, and the caller's random stream is left as it was.
    """
    wrapper = _Apply(module)
    values = copies_of_weights_written_in_place(module) | params | clone_buffers(module)
    state = {"module." + path: values[first] for path, first in _slots(module) if first in values}
    with _fixed_randomness():
        try:
            return functional_call(wrapper, state, (fn, *args), strict=False, tie_weights=False)
        except RuntimeError as err:
            mismatch = _explain_mismatch(module, name, err)
            if mismatch is None:
                raise
            raise mismatch from err


def _slots(module: nn.Module) -> list[tuple[str, str]]:
    """``(path, first path)`` for every slot — an attribute of a submodule — holding a parameter
    or buffer, once per slot; ``first path`` is the tensor's name in ``named_parameters()`` or
    ``named_buffers()``.

    A tied weight fills several slots (``emb.weight`` and ``out.weight``): each gets the
    substituted tensor. A module reachable under two names (``self.alias = self.out``) has one
    set of slots: substituting it under both names would make ``functional_call`` restore one of
    them to the substitute, leaving a plain tensor in the user's model.
    """
    first_path: dict[int, str] = {}
    slots = []
    for prefix, sub in module.named_modules():  # each module object once, as named_parameters
        for attribute, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
            if tensor is not None:
                path = f"{prefix}.{attribute}" if prefix else attribute
                slots.append((path, first_path.setdefault(id(tensor), path)))
    return slots


RANDOMNESS_SEED = 0
"""The seed of torch's generator during every evaluation of a property (see :func:`_call`)."""


@contextmanager
def _fixed_randomness() -> Iterator[None]:
    """Seed torch's generators with :data:`RANDOMNESS_SEED` inside the block, then restore them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        # only the forked generators: torch.manual_seed would also queue a lazy seeding of
        # uninitialised CUDA/XPU/MTIA (formatting a stack trace each time: ~0.8 ms per call)
        # that fork_rng does not undo
        torch.default_generator.manual_seed(RANDOMNESS_SEED)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(RANDOMNESS_SEED)
        yield


_DTYPE_MISMATCH = ("same dtype", "expected scalar type", "should be the same", "dtype mismatch")
_DEVICE_MISMATCH = ("same device", "expected device", "two devices", "torch.cuda")


def _explain_mismatch(module: nn.Module, name: str, err: RuntimeError) -> Exception | None:
    """A clear error for a dtype or device mismatch between the module and what ``fn`` feeds it,
    or ``None`` when ``err`` is something else."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    weights = list(module.parameters()) + list(module.buffers())
    dtypes = sorted({str(w.dtype) for w in weights if w.is_floating_point()})
    devices = sorted({str(w.device) for w in weights})
    found = f"({first}). The parameters of {type(module).__name__} are {', '.join(dtypes)} on "
    found += f"{', '.join(devices)}"
    if any(k in text for k in _DEVICE_MISMATCH):
        return ValueError(
            f"property {name!r}: a device mismatch {found}; move the inputs and constants used by "
            "fn to the model's device (x.to(device)), or the model to theirs (model.to(device))."
        )
    if any(k in text.lower() for k in _DTYPE_MISMATCH):
        return TypeError(
            f"property {name!r}: a dtype mismatch {found}; convert the inputs and constants used "
            "by fn to the model's dtype (x.to(dtype)), or the model to theirs (model.to(dtype))."
        )
    return None


@dataclass(frozen=True)
class PerExample:
    """Structure of a property whose row ``i`` depends only on input example ``i``.

    ``fn(module, *batch) -> Tensor[n, *item_shape]`` maps a batch of inputs (each ``[n, ...]``)
    to one row per example; ``inputs`` are the full inputs, each ``[N, ...]``. Dim 0 of every
    input and of the output is the example axis, and row ``i`` depends on example ``i`` only.
    """

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]

    @property
    def num_examples(self) -> int:
        return self.inputs[0].shape[0]

    def select(self, index: Any) -> PerExample:
        """The same structure restricted to the examples ``index`` (a slice or 1-D index)."""
        return PerExample(self.fn, tuple(x[index] for x in self.inputs))

    def then(self, post: Callable[[Tensor], Tensor]) -> PerExample:
        """Apply a row-wise map ``post`` to the ``[n, *item]`` output."""
        fn = self.fn
        return PerExample(lambda module, *xs: post(fn(module, *xs)), self.inputs)


class Property:
    """A differentiable function of a module's trainable weights.

    ``Property(module, fn)`` with ``fn(module) -> Tensor`` of any floating shape. Calling
    ``prop(params)`` evaluates it with the parameters in ``params`` (a dict keyed by
    ``module.named_parameters()`` names; missing ones keep their current values).
    ``prop.value()`` evaluates it at the current weights without building a graph.

    Set ``allow_train_mode=True`` to accept BatchNorm or dropout in training mode (refused by
    default because the property is then random or batch-dependent).
    """

    def __init__(
        self,
        module: nn.Module,
        fn: Callable[[nn.Module], Tensor],
        *,
        allow_train_mode: bool = False,
        name: str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"Property: module must be a torch.nn.Module, got {type(module).__name__}."
            )
        if not callable(fn):
            raise TypeError(
                f"Property: fn must be callable as fn(module), got {type(fn).__name__}."
            )
        self.module = module
        self.allow_train_mode = allow_train_mode
        self.name = name or getattr(fn, "__name__", "property")
        self._fn: Callable[[ParamDict], Tensor] = lambda params: _call(
            module, params, fn, name=str(self.name)
        )
        self.per_example: PerExample | None = None

    @classmethod
    def from_per_example(
        cls,
        module: nn.Module,
        fn: Callable[..., Tensor],
        inputs: Tensor | tuple[Tensor, ...],
        *,
        allow_train_mode: bool = False,
        name: str | None = None,
    ) -> Property:
        """A property ``fn(module, *inputs) -> [N, *item]`` whose row ``i`` uses only example ``i``.

        ``inputs`` is one tensor or a tuple of tensors sharing their first dimension ``N`` (use a
        tuple for models with several inputs: ``fn(m, tokens, mask) = m(tokens, mask)``).
        Declaring this lets the covariance engine use per-example gradients (``vmap`` over
        single examples). Two assumptions come with it:

        - dim 0 of every input and of the output is the example axis (not, for instance, the
          time axis of a sequence-first RNN), and
        - row ``i`` depends on example ``i`` only: no statistics over the batch (BatchNorm in
          training mode, centring by the batch mean) and no broadcasting across examples.

        Each chunk of per-example values is compared with the batch evaluation; if the first
        disagrees, the rows are computed by batched VJPs instead (exact, slower) with a
        :class:`~ntcov.FallbackWarning`; if a later one disagrees, a ``ValueError`` is raised.
        """
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        sizes = {x.shape[0] if x.dim() else None for x in inputs}
        if len(sizes) != 1 or None in sizes:
            shapes = [tuple(x.shape) for x in inputs]
            raise ValueError(
                f"Property.from_per_example: inputs must share their first (example) dimension, "
                f"got shapes {shapes}."
            )
        prop = cls(module, lambda m: fn(m, *inputs), allow_train_mode=allow_train_mode, name=name)
        prop.per_example = PerExample(fn, inputs)
        return prop

    def _derive(
        self,
        fn: Callable[[ParamDict], Tensor],
        name: str,
        per_example: PerExample | None = None,
        other: Property | None = None,
    ) -> Property:
        """A new property sharing this one's module, computed as ``fn(params)``."""
        prop = Property.__new__(Property)
        prop.module = self.module
        prop.allow_train_mode = self.allow_train_mode or bool(other and other.allow_train_mode)
        prop.name = name
        prop._fn = fn
        prop.per_example = per_example
        return prop

    def __call__(self, params: ParamDict) -> Tensor:
        return self._fn(params)

    def value(self) -> Tensor:
        """The property at the module's current weights, ``[*shape]``, without a graph."""
        check_mode(self.module, allow_train_mode=self.allow_train_mode)
        with torch.no_grad():
            out = self._fn({})
        check_is_tensor(self, out)
        return out

    @property
    def shape(self) -> torch.Size:
        """Shape of the property's value (evaluates it once)."""
        return self.value().shape

    def __repr__(self) -> str:
        return f"Property({self.name!r}, module={type(self.module).__name__})"

    def __iter__(self) -> NoReturn:
        # without this, Python would iterate through __getitem__ with 0, 1, 2, ... forever
        raise TypeError(
            f"a Property is not iterable; index it with prop[i] (property {self.name!r})."
        )

    # ----- algebra -------------------------------------------------------------------------

    def _binary(self, other: Property | Constant, op: Callable, symbol: str) -> Property:
        f = self._fn
        if isinstance(other, Property):
            self._check_same_module(other, symbol)
            g = other._fn
            return self._derive(
                lambda p: op(f(p), g(p)), f"({self.name} {symbol} {other.name})", other=other
            )
        const = _as_constant(other, symbol)
        return self._derive(
            lambda p: (lambda v: op(v, _like(const, v)))(f(p)),
            f"({self.name} {symbol} c)",
            per_example=self._rowwise_per_example(lambda v: op(v, _like(const, v)), const, op),
        )

    def _rbinary(self, other: Constant, op: Callable, symbol: str) -> Property:
        f = self._fn
        const = _as_constant(other, symbol)
        return self._derive(
            lambda p: (lambda v: op(_like(const, v), v))(f(p)),
            f"(c {symbol} {self.name})",
            per_example=self._rowwise_per_example(lambda v: op(_like(const, v), v), const, op),
        )

    def _rowwise_per_example(
        self, post: Callable[[Tensor], Tensor], const: Tensor | float, op: Callable
    ) -> PerExample | None:
        """Per-example structure survives elementwise arithmetic with a scalar constant."""
        scalar = not isinstance(const, Tensor) or const.dim() == 0
        if self.per_example is None or not scalar or op is operator.matmul:
            return None
        return self.per_example.then(post)

    def _check_same_module(self, other: Property, symbol: str) -> None:
        if other.module is not self.module:
            raise ValueError(
                f"Property {symbol}: both properties must be functions of the same module, got "
                f"{different_modules(self.module, other.module)}."
            )

    def __add__(self, other: Property | Constant) -> Property:
        return self._binary(other, operator.add, "+")

    def __radd__(self, other: Constant) -> Property:
        return self._rbinary(other, operator.add, "+")

    def __sub__(self, other: Property | Constant) -> Property:
        return self._binary(other, operator.sub, "-")

    def __rsub__(self, other: Constant) -> Property:
        return self._rbinary(other, operator.sub, "-")

    def __mul__(self, other: Property | Constant) -> Property:
        return self._binary(other, operator.mul, "*")

    def __rmul__(self, other: Constant) -> Property:
        return self._rbinary(other, operator.mul, "*")

    def __truediv__(self, other: Property | Constant) -> Property:
        return self._binary(other, operator.truediv, "/")

    def __neg__(self) -> Property:
        return self._rbinary(-1.0, operator.mul, "*")

    def __matmul__(self, other: Property | Constant) -> Property:
        return self._binary(other, operator.matmul, "@")

    def __rmatmul__(self, other: Constant) -> Property:
        return self._rbinary(other, operator.matmul, "@")

    def __getitem__(self, index: Any) -> Property:
        f = self._fn
        return self._derive(
            lambda p: f(p)[index],
            f"{self.name}[{_index_repr(index)}]",
            per_example=_index_per_example(self.per_example, index),
        )

    def map(self, fn: Callable[[Tensor], Tensor], name: str | None = None) -> Property:
        """``fn(x)`` for a differentiable tensor function ``fn`` (``torch.sigmoid``, ``.sum``...).

        Keep per-example structure only if ``fn`` acts row by row: pass it through
        :meth:`map_rows` instead when it does.
        """
        f = self._fn
        return self._derive(lambda p: fn(f(p)), name or f"{_fn_name(fn)}({self.name})")

    def map_rows(self, fn: Callable[[Tensor], Tensor], name: str | None = None) -> Property:
        """``fn(x)`` for a function that maps each example's row independently (e.g. sigmoid).

        Unlike :meth:`map`, this keeps the per-example structure. ``fn`` must not mix rows.
        """
        f = self._fn
        pe = self.per_example.then(fn) if self.per_example is not None else None
        return self._derive(lambda p: fn(f(p)), name or f"{_fn_name(fn)}({self.name})", pe)

    def sum(self) -> Property:
        """The sum of all entries, a scalar property."""
        return self.map(torch.sum, f"sum({self.name})")

    def mean(self) -> Property:
        """The mean of all entries, a scalar property."""
        return self.map(torch.mean, f"mean({self.name})")

    def reshape(self, *shape: int) -> Property:
        """The property's value reshaped (no per-example structure)."""
        return self.map(lambda v: v.reshape(shape), f"{self.name}.reshape{shape}")


def check_is_tensor(prop: Property, out: Any) -> None:
    """A property's ``fn`` must return a tensor (not a model's tuple or dict, not a number)."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"property {prop.name!r} returned a {type(out).__name__}, expected a Tensor. If the "
            "model returns a tuple or dict, index the model's output in fn, e.g. "
            "lambda m: m(x)[0]."
        )


def different_modules(first: nn.Module, second: nn.Module) -> str:
    """Describes two distinct module objects for an error message."""
    return (
        f"two different module objects ({type(first).__name__} and {type(second).__name__}); "
        "build both properties from the same model"
    )


def _as_constant(value: Any, symbol: str) -> Tensor | float:
    if isinstance(value, Tensor):
        if value.requires_grad:
            value = value.detach()
        return value
    if isinstance(value, int | float):
        return float(value)
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"Property {symbol}: expected a Property, a number or a tensor, got "
            f"{type(value).__name__}."
        ) from err


def _like(const: Tensor | float, value: Tensor) -> Tensor | float:
    """A constant moved to the value's device and dtype (numbers are left as they are)."""
    if isinstance(const, Tensor):
        return const.to(device=value.device, dtype=value.dtype)
    return const


def _index_per_example(pe: PerExample | None, index: Any) -> PerExample | None:
    """Per-example structure after ``x[index]``, when ``index`` keeps the example axis."""
    if pe is None:
        return None
    first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
    if not _keeps_axis(first) or not _rest_keeps_rows(first, rest):
        return None
    selected = pe.select(first)
    if not rest:
        return selected
    return selected.then(lambda v: v[(slice(None), *rest)])


def _keeps_axis(index: Any) -> bool:
    if isinstance(index, slice):
        return True
    if isinstance(index, list):
        return all(isinstance(i, int) for i in index)
    return isinstance(index, Tensor) and index.dim() == 1


def _rest_keeps_rows(first: Any, rest: tuple[Any, ...]) -> bool:
    """Whether ``x[first, *rest]`` keeps example ``i``'s entries in row ``i`` of the result.

    Ints and slices after the example axis do. Another advanced (tensor or list) index is paired
    with an advanced ``first`` (``x[[0, 1], [2, 0]]`` picks single entries); after a slice, one
    advanced index among slices is safe, but several (or one next to ints) may move their axis
    to the front.
    """
    advanced = [r for r in rest if not isinstance(r, int | slice)]
    if not advanced:
        return True
    single = len(advanced) == 1 and all(isinstance(r, slice) or r is advanced[0] for r in rest)
    return isinstance(first, slice) and single and _keeps_axis(advanced[0])


def _index_repr(index: Any) -> str:
    text = repr(index)
    return text if len(text) < 30 else text[:27] + "..."


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
