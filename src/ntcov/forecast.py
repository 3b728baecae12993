"""Forecasts over many steps: train the linearised network and track a property along the way.

Price's equation gives the rate of change of a property at the current weights. Over many steps
the kernel ``ntcov`` itself moves, so a forecast has to integrate the dynamics. This module does
it in weight space, which never builds an ``N×N`` kernel.

Around a centre ``c`` (the weights at the last linearisation) the training outputs ``f``
(``[*S_f]``, e.g. the logits on the training set) and the property ``x`` (``[*S]``) are replaced
by their first-order Taylor expansions

    f_lin(w) = f(c) + J_f(c) (w − c),        x_lin(w) = x(c) + J_x(c) (w − c),

and the linearised loss ``L_lin(w) = loss_fn(f_lin(w), y)`` is minimised with the user's own
optimizer rule (SGD, momentum, Adam...; built by ``optimizer_factory`` on fresh copies of the
weights). Its gradient is ``∇_w L_lin = J_f(c)ᵀ ∇_f loss(f_lin(w), y)``: a VJP through the network
at ``c``. With ``relinearize_every=None`` the centre stays at the starting weights (the kernel is
frozen, the "lazy training" regime); with ``relinearize_every=m`` the forecast re-linearises
around its own current weights every ``m`` steps. ``m = 1`` is exactly the real training of the
nonlinear network (then ``w = c`` whenever a gradient is taken).

Cost per step: one forward-mode JVP for ``f_lin`` (≈ 3 forward passes), one VJP for
``J_fᵀ ∇_f loss`` (one backward pass through the graph of ``f(c)``, kept for the whole window),
and one JVP for ``x_lin``; plus one forward pass of ``f`` and of ``x`` at each re-linearisation.

:func:`forecast_error` compares a forecast with what training actually does
(:func:`actual_trajectory`), relative to how far the property has moved so far, and
:func:`forecast_horizon` reports the first step at which that error passes a threshold.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ntcov import _autodiff
from ntcov.params import ParamDict, ParamSelection, check_mode, select_params
from ntcov.property import Property

__all__ = ["Forecast", "actual_trajectory", "forecast", "forecast_error", "forecast_horizon"]

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Forecast:
    """A forecast of a property over ``steps`` optimizer steps.

    ``trajectory[t]`` is the forecast of ``x`` after ``t`` steps, shape ``[steps + 1, *S]``
    (``trajectory[0] = x(w0)``). ``relinearize_every`` is ``None`` for a kernel frozen at the
    start, else the number of steps between re-linearisations.
    """

    trajectory: Tensor
    steps: int
    relinearize_every: int | None


@dataclass
class _Linearisation:
    """``f`` and ``x`` expanded around the centre ``c``; ``f_graph`` keeps ``f(c)``'s graph."""

    centre: ParamDict
    leaves: ParamDict
    f_graph: Tensor
    f_centre: Tensor
    x_centre: Tensor


def forecast(
    x: Property,
    outputs: Property,
    targets: Tensor,
    loss_fn: LossFn,
    optimizer_factory: OptimizerFactory,
    steps: int,
    *,
    relinearize_every: int | None = None,
    params: ParamSelection = None,
) -> Forecast:
    """Forecast ``x`` over ``steps`` steps by training the linearised network (module docstring).

    ``outputs`` is the property the loss is computed on (``properties.logits(model, x_train)``,
    ``[*S_f]``) and ``loss_fn(outputs, targets)`` must return a scalar. ``optimizer_factory``
    builds a new optimizer over the list of weights it is given (``lambda ps: SGD(ps, lr=0.1)``);
    it receives fresh copies of the trainable weights (``params`` selects them, as in
    :func:`ntcov.ntcov`), so neither the model nor any existing optimizer is touched. Optimizers
    that need a closure (LBFGS) are not supported; the optimizer's state (momentum, Adam's
    moments) carries over re-linearisations. Returns a :class:`Forecast` with a
    ``[steps + 1, *S]`` trajectory: ``x_lin(w_t)``, which at a re-linearisation step is
    ``x(w_t)`` itself (the expansion is exact at its centre).
    """
    _check_inputs("forecast", x, outputs, steps, relinearize_every)
    weights = _fresh_leaves(select_params(x.module, params))
    optimizer = _build_optimizer("forecast", optimizer_factory, weights)
    points: list[Tensor] = []
    lin: _Linearisation | None = None
    for t in range(steps + 1):
        if lin is None or (relinearize_every is not None and t % relinearize_every == 0):
            lin = _linearise(x, outputs, weights)
            x_t, f_t = lin.x_centre, lin.f_centre
        else:
            delta = {n: w.detach() - lin.centre[n] for n, w in weights.items()}
            x_t = lin.x_centre + _jvp(x, lin.centre, delta)
            f_t = lin.f_centre + _jvp(outputs, lin.centre, delta) if t < steps else lin.f_centre
        points.append(x_t)
        if t < steps:
            _step(optimizer, weights, _linearised_gradient(lin, f_t, targets, loss_fn))
    return Forecast(torch.stack(points), steps, relinearize_every)


def actual_trajectory(
    x: Property,
    outputs: Property,
    targets: Tensor,
    loss_fn: LossFn,
    optimizer_factory: OptimizerFactory,
    steps: int,
    *,
    params: ParamSelection = None,
) -> Tensor:
    """What training really does to ``x``: ``[steps + 1, *S]``, ``x`` after each step.

    Trains copies of the weights (the module is evaluated with them, never changed) on
    ``loss_fn(outputs, targets)`` with a new optimizer from ``optimizer_factory``, full batch,
    recording ``x`` before the first and after every step. Same arguments as :func:`forecast`.
    """
    _check_inputs("actual_trajectory", x, outputs, steps, None)
    weights = _fresh_leaves(select_params(x.module, params))
    optimizer = _build_optimizer("actual_trajectory", optimizer_factory, weights)
    points: list[Tensor] = []
    for t in range(steps + 1):
        with torch.no_grad():
            points.append(x(weights).detach().clone())
        if t < steps:
            with torch.enable_grad():
                loss = _scalar_loss("actual_trajectory", loss_fn, outputs(weights), targets)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            _step(optimizer, weights, dict(zip(weights, grads, strict=True)))
    return torch.stack(points)


def forecast_error(predicted: Forecast | Tensor, actual: Tensor) -> Tensor:
    """Relative error of a forecast at each step, ``[T + 1]``.

    ``error[t] = ‖x_pred(t) − x_act(t)‖ / ‖x_act(t) − x_act(0)‖`` (Frobenius norms over the
    property's entries): the error relative to the change so far. Where the property has not
    moved (``t = 0``), the error is 0 if the forecast agrees to rounding (``8 ε ‖x_act(t)‖``) and
    ``inf`` otherwise.
    """
    pred = predicted.trajectory if isinstance(predicted, Forecast) else predicted
    if not isinstance(pred, Tensor) or not isinstance(actual, Tensor):
        raise TypeError("forecast_error: predicted and actual must be tensors (or a Forecast).")
    if pred.shape != actual.shape or pred.dim() == 0:
        raise ValueError(
            f"forecast_error: predicted and actual trajectories must have the same shape "
            f"[T + 1, *S], got {list(pred.shape)} and {list(actual.shape)}."
        )
    pred, act = pred.reshape(pred.shape[0], -1), actual.to(pred.dtype).reshape(pred.shape[0], -1)
    error = torch.linalg.vector_norm(pred - act, dim=1)
    change = torch.linalg.vector_norm(act - act[:1], dim=1)
    rounding = 8 * torch.finfo(pred.dtype).eps * torch.linalg.vector_norm(act, dim=1)
    error = torch.where(error <= rounding, torch.zeros_like(error), error)
    unmoved = torch.where(error > 0, torch.full_like(error, float("inf")), error)
    return torch.where(change > 0, error / change.clamp_min(torch.finfo(pred.dtype).tiny), unmoved)


def forecast_horizon(
    predicted: Forecast | Tensor, actual: Tensor, threshold: float = 0.1
) -> int | None:
    """The first step at which :func:`forecast_error` exceeds ``threshold``, or ``None``."""
    if not threshold > 0:
        raise ValueError(f"forecast_horizon: threshold must be positive, got {threshold!r}.")
    above = torch.nonzero(forecast_error(predicted, actual) > threshold)
    return int(above[0, 0]) if above.numel() else None


def _linearise(x: Property, outputs: Property, weights: ParamDict) -> _Linearisation:
    """Expand around the current weights: ``f(c)`` with its graph, and ``x(c)``."""
    centre = {n: w.detach().clone() for n, w in weights.items()}
    f_graph, leaves = _autodiff.evaluate(outputs, centre)
    with torch.no_grad():
        x_centre = x(centre).detach().clone()
    return _Linearisation(centre, leaves, f_graph, f_graph.detach(), x_centre)


def _jvp(prop: Property, centre: ParamDict, delta: ParamDict) -> Tensor:
    """``J_prop(c) δ``: one forward-mode JVP (exact double-VJP fallback for ops without one)."""
    return _autodiff.directional(prop, centre, delta, force_reverse=False)[1]


def _linearised_gradient(
    lin: _Linearisation, f_lin: Tensor, targets: Tensor, loss_fn: LossFn
) -> ParamDict:
    """``∇_w L_lin = J_f(c)ᵀ ∇_f loss(f_lin, y)``: a VJP through the kept graph of ``f(c)``."""
    point = f_lin.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _scalar_loss("forecast", loss_fn, point, targets)
        (cotangent,) = torch.autograd.grad(loss, point)
        grads = torch.autograd.grad(
            lin.f_graph, list(lin.leaves.values()), cotangent, retain_graph=True, allow_unused=True
        )
    return dict(zip(lin.leaves, grads, strict=True))


def _step(
    optimizer: torch.optim.Optimizer, weights: ParamDict, grads: Mapping[str, Tensor | None]
) -> None:
    """One optimizer step with the given gradients.

    ``None`` (a weight the loss does not use) leaves ``.grad`` unset, as real autograd does, so
    the optimizer skips that weight: no weight decay, momentum or state update for it.
    """
    for name, w in weights.items():
        g = grads[name]
        w.grad = None if g is None else g.detach()
    optimizer.step()


def _scalar_loss(caller: str, loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{caller}: loss_fn(outputs, targets) must return a scalar tensor, got {shape}. "
            "Use a reduced loss (e.g. reduction='mean')."
        )
    return loss.reshape(())


def _fresh_leaves(params: ParamDict) -> ParamDict:
    """Copies of the weights that an optimizer can update, sharing nothing with the module."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def _build_optimizer(
    caller: str, factory: OptimizerFactory, weights: ParamDict
) -> torch.optim.Optimizer:
    """``factory(weights)``, refused unless it optimises exactly these fresh copies."""
    if not callable(factory):
        raise TypeError(
            f"{caller}: optimizer_factory must be callable as factory(params) -> Optimizer, e.g. "
            f"lambda ps: torch.optim.SGD(ps, lr=0.1); got {type(factory).__name__}."
        )
    optimizer = factory(list(weights.values()))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{caller}: optimizer_factory returned {type(optimizer).__name__}, expected a "
            "torch.optim.Optimizer."
        )
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{caller}: {type(optimizer).__name__}.step needs a closure (it re-evaluates the "
            "loss), which the linearised dynamics do not provide; use an optimizer whose step "
            "takes the gradient in p.grad (SGD, Adam, AdamW, RMSprop, Adagrad, ...)."
        )
    ours = {id(w) for w in weights.values()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if {id(p) for p in held} != ours or len(held) != len(ours):
        raise ValueError(
            f"{caller}: optimizer_factory must build a new optimizer over exactly the parameters "
            "it is given (fresh copies of the weights); it returned one over other tensors, "
            "which would change them."
        )
    return optimizer


def _check_inputs(
    caller: str, x: Property, outputs: Property, steps: int, relinearize_every: int | None
) -> None:
    for name, prop in (("x", x), ("outputs", outputs)):
        if not isinstance(prop, Property):
            raise TypeError(f"{caller}: {name} must be an ntcov.Property, got {type(prop)}.")
        check_mode(prop.module, allow_train_mode=prop.allow_train_mode)
    if x.module is not outputs.module:
        raise ValueError(f"{caller}: x and outputs must be properties of the same module.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{caller}: steps must be a non-negative int, got {steps!r}.")
    every = relinearize_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(
            f"{caller}: relinearize_every must be None (kernel frozen) or a positive int, "
            f"got {every!r}."
        )
