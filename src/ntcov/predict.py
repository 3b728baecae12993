"""Predict what one optimizer step does to a property: first and second order, and minibatch noise.

The optimizer's next update is ``Δw = −M ∇L + b`` (:mod:`ntcov.metric`). For a property ``x(w)``
(``[*S]``, ``K`` entries) the step changes it by

    Δx = J_x Δw + ½ Δwᵀ H_x Δw + O(|Δw|³)

where ``J_x Δw = J_x(−M ∇L) + J_x b`` (the *force*: Price's covariance under the metric ``M``,
``ntcov_M(x, −L)``; and the *bias*: momentum, weight decay) is one forward-mode JVP per term, and
``Δwᵀ H_x Δw`` (for all ``K`` entries at once) is the second directional derivative
``d²/dε² x(w + εΔw)`` at ``ε = 0``: a forward-over-forward JVP, cost ≈ a few forward passes.

With minibatches of ``B`` of the ``N`` examples (``L = mean_i ℓ_i``), the force becomes
``(1/B) Σ_{i∈batch} c_i`` with per-example contributions ``c_i = J_x M (−∇ℓ_i)`` (``[*S, N]``,
``−ntcov_M(x, ℓ)``). Its mean is the full-batch force and its standard deviation is

    std = √(Var_i(c_i) / B · f),    f = (N − B)/(N − 1) without replacement, 1 with replacement

(``Var_i`` the population variance over the ``N`` examples). For adaptive optimizers (Adam,
AdamW, RMSprop, Adagrad) ``M`` is frozen at the full-batch gradient, and the second-order term
is that of the mean step. A real minibatch step normalises by its own gradient, so while the
optimizer's state is young the predicted spread can be far too wide (a fresh Adam on the
digits: 6–100×). So by default ``predict_step`` simulates ``SIMULATED_STEPS`` real minibatch
steps for them instead (``simulate``); ``simulate=0`` keeps the frozen ``M`` and warns
(:class:`ApproximationWarning`).

Prediction intervals (:meth:`StepPrediction.interval`). The ``c_i`` are often skewed and
heavy-tailed, so for small ``B`` the normal interval ``total ± z·std`` covers too little (at
``B = 1`` on digits: 90% for a nominal 95%). ``IntervalMethod.EMPIRICAL`` (the default) uses the
distribution of the minibatch mean ``c̄_B`` itself: at ``B = 1`` it is exactly one draw of
``c_i``, so the interval is the interpolated empirical quantiles of ``{c_i}`` over ``i``; for
``B > 1`` the quantiles of ``c̄_B`` over ``draws`` simulated minibatches (seeded; cost
``K·B·draws``, using the ``[K, N]`` contributions already computed). Either is shifted by
``total − force`` — the bias and (``order=2``) the second-order term of the *mean* step.

A minibatch step has its own curvature term. At ``B = 1`` (``order=2``) it is computed for every
example: ``q_i = ½ Δw_iᵀ H_x Δw_i`` with ``Δw_i = −M ∇ℓ_i + b`` (``second_contributions``,
``[*S, N]``; ``N`` nested JVPs, vectorised), so the distribution of the change over the draw of
the example is exact to second order: the interval is ``bias + q(c_i + q_i)`` and ``std`` that of
``c_i + q_i``. On digits at ``η·λ₀ = 0.02`` this is what takes the 95% coverage at ``B = 1`` from
0.90 to 0.94: a single example's gradient is large, and so is its own curvature term. For
``B > 1`` the mean step's term is used (the noise dominates there).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from enum import Enum
from statistics import NormalDist

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ntcov import _autodiff
from ntcov._choice import as_choice
from ntcov.covariance import ntcov
from ntcov.metric import GradDict, optimizer_step
from ntcov.params import ParamDict, check_mode, select_params
from ntcov.property import Property

__all__ = [
    "ADAPTIVE",
    "ApproximationWarning",
    "IntervalMethod",
    "Sampling",
    "StepPrediction",
    "predict_step",
]

SIMULATED_DRAWS = 2000  # minibatches simulated for an empirical interval with 1 < B < N


class Sampling(str, Enum):
    """How a minibatch is drawn from the ``N`` training examples."""

    WITHOUT_REPLACEMENT = "without_replacement"
    WITH_REPLACEMENT = "with_replacement"


class IntervalMethod(str, Enum):
    """How :meth:`StepPrediction.interval` turns the minibatch noise into an interval.

    - ``NORMAL``: ``total ± z·std``; right for large ``B`` (central limit), too narrow for small
      ``B`` when the per-example contributions are heavy-tailed.
    - ``EMPIRICAL``: quantiles of the minibatch mean of the per-example contributions: exact
      (interpolated) at ``B = 1``, by simulation of random minibatches for ``B > 1``.
    """

    NORMAL = "normal"
    EMPIRICAL = "empirical"


@dataclass(frozen=True, eq=False)
class StepPrediction:
    """The predicted change of a property ``x`` over one optimizer step; every tensor is ``[*S]``.

    - ``value``: ``x`` at the current weights.
    - ``force``: ``J_x(−M ∇L)``, the change driven by the loss gradient.
    - ``bias``: ``J_x b``, the change driven by the optimizer's carry-over (momentum, decay).
    - ``first_order``: ``J_x Δw = force + bias`` of the full-batch step (with ``batch_size``
      also the minibatch mean for SGD; for an adaptive optimizer the mean of ``simulated``).
    - ``second_order``: ``½ Δwᵀ H_x Δw`` (``order=2``), else ``None``.
    - ``std``: the minibatch standard deviation of the change (zeros for a full batch).
    - ``contributions``: the per-example forces ``c_i = J_x M (−∇ℓ_i)``, ``[*S, N]`` (with
      ``batch_size``; their mean over ``i`` is ``force``), else ``None``.
    - ``second_contributions``: at ``B = 1`` with ``order=2``, each example's own second-order
      term ``q_i = ½ Δw_iᵀ H_x Δw_i``, ``Δw_i = −M ∇ℓ_i + b``, ``[*S, N]``; else ``None``.
    - ``simulated``: with ``simulate``, the first-order changes ``J_x Δw_d`` of ``D`` simulated
      minibatch steps under the optimizer's real rule, ``[*S, D]``; ``std`` is their spread,
      their mean the expected minibatch change (for an adaptive optimizer not ``first_order``,
      the full-batch step's). Else ``None``.
    """

    value: Tensor
    force: Tensor
    bias: Tensor
    first_order: Tensor
    second_order: Tensor | None
    std: Tensor
    batch_size: int | None
    contributions: Tensor | None = None
    sampling: Sampling = Sampling.WITHOUT_REPLACEMENT
    second_contributions: Tensor | None = None
    simulated: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """The predicted change: ``first_order + second_order`` (``first_order`` at order 1)."""
        if self.second_order is None:
            return self.first_order
        return self.first_order + self.second_order

    @property
    def linearity(self) -> Tensor:
        """``|second_order| / |first_order|`` per entry: near 1 or above, the expansion fails."""
        if self.second_order is None:
            raise ValueError(
                "StepPrediction.linearity needs the second-order term; call predict_step with "
                "order=2."
            )
        tiny = torch.finfo(self.first_order.dtype).tiny
        return self.second_order.abs() / (self.first_order.abs() + tiny)

    def interval(
        self,
        level: float = 0.95,
        *,
        method: IntervalMethod | str = IntervalMethod.EMPIRICAL,
        draws: int = SIMULATED_DRAWS,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Central prediction interval ``(lower, upper)``, ``[*S]`` each.

        ``NORMAL``: ``total ± z·std`` (at ``B = 1`` with ``second_contributions``, centred on
        ``first_order + mean_i q_i`` instead). ``EMPIRICAL`` (needs ``contributions``; without
        them, a full batch, it is the normal one): ``total − force + q_{(1∓level)/2}(c̄_B)``, with
        the quantiles of the minibatch mean ``c̄_B`` exact at ``B = 1`` and estimated from ``draws``
        simulated minibatches (``torch.Generator`` seeded with ``seed``) for ``B > 1``. With
        ``second_contributions`` (``B = 1``, ``order=2``): ``bias + q_{(1∓level)/2}(c_i + q_i)``.
        With ``simulated`` steps: their quantiles (``NORMAL``: their mean ``± z·std``), plus the
        mean step's second-order term; ``draws`` and ``seed`` do not apply (the steps were drawn
        by :func:`predict_step`, seed 0).
        """
        if not 0 < level < 1:
            raise ValueError(f"StepPrediction.interval: level must be in (0, 1), got {level}.")
        chosen = _as_interval_method(method)
        if self.simulated is not None:
            return self._simulated_interval(self.simulated, level, chosen)
        if chosen is IntervalMethod.NORMAL or self.contributions is None or not self.std.any():
            z = NormalDist().inv_cdf(0.5 + level / 2)
            centre = self.total
            if self.second_contributions is not None:  # B = 1: the mean of c_i + q_i, + bias
                centre = self.first_order + self.second_contributions.mean(-1)
            return centre - z * self.std, centre + z * self.std
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 2:
            raise ValueError(f"StepPrediction.interval: draws must be an int >= 2, got {draws!r}.")
        if self.second_contributions is not None:  # B = 1: each example's own curvature
            means = (self.contributions + self.second_contributions).reshape(
                -1, self.contributions.shape[-1]
            )
            shift = self.bias
        else:
            means = _minibatch_means(
                self.contributions, self.batch_size or 1, self.sampling, draws, seed
            )
            shift = self.total - self.force
        low, high = _quantiles(means, (0.5 - level / 2, 0.5 + level / 2))
        return shift + low.reshape(shift.shape), shift + high.reshape(shift.shape)

    def _simulated_interval(
        self, simulated: Tensor, level: float, method: IntervalMethod
    ) -> tuple[Tensor, Tensor]:
        shift = self.second_order if self.second_order is not None else 0.0
        if method is IntervalMethod.NORMAL:
            z = NormalDist().inv_cdf(0.5 + level / 2)
            centre = simulated.mean(-1) + shift
            return centre - z * self.std, centre + z * self.std
        flat = simulated.reshape(-1, simulated.shape[-1])
        low, high = _quantiles(flat, (0.5 - level / 2, 0.5 + level / 2))
        return shift + low.reshape(self.std.shape), shift + high.reshape(self.std.shape)


def predict_step(
    x: Property,
    loss: Property,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int | None = None,
    order: int = 1,
    per_example_loss: Property | None = None,
    sampling: Sampling | str = Sampling.WITHOUT_REPLACEMENT,
    own_curvature: bool = True,
    simulate: int | None = None,
) -> StepPrediction:
    """Predict the change of ``x`` when ``optimizer`` steps on the gradient of ``loss``.

    ``loss`` is a scalar property (the full-batch loss) of the module that ``x`` belongs to;
    the module's current weights and the optimizer's current state are used, and neither is
    changed. ``order=2`` adds ``½ Δwᵀ H_x Δw``. With ``batch_size`` (``B``), ``per_example_loss``
    (``[N]``, whose mean is ``loss``) gives the minibatch standard deviation ``std``.
    Parameters that ``loss`` does not use have no gradient, so the optimizer skips them.

    With ``batch_size=1`` and ``order=2``, ``own_curvature`` (default) also computes each
    example's own second-order term ``second_contributions`` (see the module docstring), which
    the interval and ``std`` then include (not when steps are simulated: those come from them).

    ``simulate=D`` (with ``batch_size``) draws ``D`` minibatches and takes the optimizer's real
    rule on each one's own gradient (``simulated``, ``[*S, D]``); ``std`` and the interval then
    come from these steps. Default: ``SIMULATED_STEPS`` for Adam, AdamW, RMSprop and Adagrad,
    whose step is not linear in the gradient (a minibatch step normalises by its own), and 0 for
    SGD, whose per-example contributions are exact. ``simulate=0`` with an adaptive optimizer
    freezes ``M`` at the full-batch gradient and warns (:class:`ApproximationWarning`).

    Cost: one backward pass of ``loss``, one or two JVPs of ``x``; a nested JVP for
    ``order=2``; ``ntcov(x, per_example_loss)`` (``[*S, N]``) for the minibatch noise; ``N``
    nested JVPs of ``x`` for ``own_curvature`` at ``B = 1``; per simulated step, one backward
    pass of ``per_example_loss`` and one JVP of ``x``.
    """
    _check_properties(x, loss, per_example_loss)
    if not isinstance(own_curvature, bool):
        raise TypeError(
            f"predict_step: own_curvature must be True or False, got {own_curvature!r}."
        )
    if order not in (1, 2):
        raise ValueError(f"predict_step: order must be 1 or 2, got {order!r}.")
    chosen = _as_sampling(sampling)
    batch_size = _as_batch_size(batch_size)
    count = _check_minibatch(batch_size, per_example_loss, loss, chosen)
    draws = _simulation_count(simulate, optimizer, count)
    if count is not None and type(optimizer) in ADAPTIVE and draws == 0:
        _warn_adaptive_minibatch(optimizer)
    weights = select_params(x.module)
    grad = _loss_gradient(loss, weights)
    step = optimizer_step(optimizer, x.module, grad)
    force_direction = _restrict(step.force(grad), weights)
    bias_direction = _restrict(step.bias, weights)
    value, force = _autodiff.directional(x, weights, force_direction, force_reverse=False)
    bias = _jvp_unless_zero(x, weights, bias_direction, like=force)
    second = None
    if order == 2:
        delta = {n: force_direction[n] + bias_direction[n] for n in weights}
        second = 0.5 * second_directional(x, weights, delta)
    std, contributions, own = torch.zeros_like(force), None, None
    if batch_size is not None and per_example_loss is not None and count is not None:
        metric = _restrict(step.metric, weights)
        contributions = -ntcov(x, per_example_loss, metric=metric)  # [*S, N]
        if order == 2 and batch_size == 1 and own_curvature and not draws:
            own = 0.5 * per_example_second_order(
                x, per_example_loss, weights, metric, bias_direction
            ).movedim(0, -1)  # [N, *S] -> [*S, N], as the contributions
        spread = contributions if own is None else contributions + own
        std = _minibatch_std(spread, batch_size, chosen)
    simulated = None
    if draws and per_example_loss is not None and batch_size is not None:
        draw = _Draw(batch_size, chosen, draws, seed=0)
        simulated = simulate_steps(x, per_example_loss, optimizer, weights, draw)
        std = simulated.std(-1, correction=0)
    return StepPrediction(
        value,
        force,
        bias,
        force + bias,
        second,
        std,
        batch_size,
        contributions,
        chosen,
        own,
        simulated,
    )


SIMULATED_STEPS = 500  # real optimizer steps simulated by default for an adaptive optimizer


@dataclass(frozen=True)
class _Draw:
    """How minibatches are drawn: ``draws`` batches of ``batch_size``, seeded."""

    batch_size: int
    sampling: Sampling
    draws: int
    seed: int

    def index(self, count: int) -> Tensor:
        """``[draws, B]`` example indices out of ``count``."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.sampling is Sampling.WITHOUT_REPLACEMENT:
            return _disjoint_batches(count, self.batch_size, self.draws, generator)
        return torch.randint(0, count, (self.draws, self.batch_size), generator=generator)


def simulate_steps(
    x: Property,
    per_example_loss: Property,
    optimizer: torch.optim.Optimizer,
    weights: ParamDict,
    draw: _Draw,
) -> Tensor:
    """``J_x Δw_d`` for ``D`` simulated minibatch steps, ``[*S, D]``.

    For each drawn batch ``B_d``: its gradient ``g_d = ∇ mean_{i∈B_d} ℓ_i``, the optimizer's
    real update ``Δw_d = −M(g_d) g_d + b(g_d)`` (:func:`ntcov.optimizer_step`, the state left
    untouched), and its first-order change of ``x`` (one JVP). With per-example structure the
    gradient is one forward and backward pass over the ``B`` drawn examples (as the real step);
    without, a backward pass of all of ``ℓ`` with the cotangent ``1/B`` on the drawn examples.
    """
    pe = per_example_loss.per_example
    count = pe.num_examples if pe is not None else per_example_loss.value().shape[0]
    changes = []
    for rows in draw.index(count):
        grad = _batch_gradient(per_example_loss, weights, rows, draw.batch_size)
        delta = _restrict(optimizer_step(optimizer, x.module, grad).delta(grad), weights)
        changes.append(_autodiff.directional(x, weights, delta, force_reverse=False)[1])
    return torch.stack(changes, dim=-1)


def _batch_gradient(loss: Property, weights: ParamDict, rows: Tensor, batch: int) -> GradDict:
    """``∇ (1/B) Σ_{i∈rows} ℓ_i`` (``None`` where ``ℓ`` does not use a weight)."""
    pe = loss.per_example
    if pe is not None:
        part = pe.select(rows)
        loss = Property.from_per_example(
            loss.module, part.fn, part.inputs, allow_train_mode=loss.allow_train_mode
        )
    out, leaves = _autodiff.evaluate(loss, weights)
    with torch.enable_grad():
        if pe is not None:
            total = out.sum() / batch
        else:
            weight = torch.zeros_like(out).index_add_(
                0, rows.to(out.device), out.new_full(rows.shape, 1.0 / batch)
            )
            total = (out * weight).sum()
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {n: None if g is None else g.detach() for n, g in zip(leaves, grads, strict=True)}


def _simulation_count(
    simulate: int | None, optimizer: torch.optim.Optimizer, count: int | None
) -> int:
    """How many minibatch steps to simulate (0: none)."""
    if simulate is None:
        return SIMULATED_STEPS if count is not None and type(optimizer) in ADAPTIVE else 0
    if isinstance(simulate, bool) or not isinstance(simulate, numbers.Integral) or simulate < 0:
        raise ValueError(f"predict_step: simulate must be an int >= 0, got {simulate!r}.")
    if simulate == 1:
        raise ValueError("predict_step: simulate needs at least 2 steps for a spread, got 1.")
    if simulate and count is None:
        raise ValueError("predict_step: simulate draws minibatches; pass batch_size too.")
    return int(simulate)


PER_EXAMPLE_CHUNK = 64  # examples whose second directional derivatives are vectorised together


def per_example_second_order(
    x: Property,
    per_example_loss: Property,
    weights: ParamDict,
    metric: ParamDict,
    bias: ParamDict,
) -> Tensor:
    """``Δw_iᵀ H_x Δw_i`` with ``Δw_i = −M ⊙ ∇ℓ_i + b`` for every example ``i``, ``[N, *S]``.

    The gradients ``∇ℓ_i`` come as Jacobian rows of ``ℓ`` (``PER_EXAMPLE_CHUNK`` at a time);
    each chunk's second directional derivatives of ``x`` are one vectorised forward-over-forward
    JVP (a loop of them where ``vmap`` cannot run the model). Cost: ``N`` nested JVPs of ``x``.
    """
    rows = (
        _autodiff.per_example_rows
        if per_example_loss.per_example is not None
        else _autodiff.vjp_rows
    )
    parts = []
    for _, chunk in rows(per_example_loss, weights, PER_EXAMPLE_CHUNK):
        steps = {n: bias[n] - metric[n] * chunk[n] for n in weights}
        parts.append(_second_directionals(x, weights, steps))
    return torch.cat(parts)


def _second_directionals(prop: Property, weights: ParamDict, directions: ParamDict) -> Tensor:
    """:func:`second_directional` along each row of ``directions`` (``{name: [c, *p]}``),
    ``[c, *S]``."""

    def along(direction: ParamDict) -> Tensor:
        return jvp(lambda w: jvp(prop, (w,), (direction,))[1], (weights,), (direction,))[1]

    _autodiff._load_forward_ad()
    try:
        with _autodiff.composite_attention():
            return vmap(along, randomness="same")(directions).detach()
    except (RuntimeError, NotImplementedError):
        count = next(iter(directions.values())).shape[0]
        return torch.stack(
            [
                second_directional(prop, weights, {n: d[i] for n, d in directions.items()})
                for i in range(count)
            ]
        )


def second_directional(prop: Property, weights: ParamDict, direction: ParamDict) -> Tensor:
    """``d²/dε² x(w + εv)`` at ``ε = 0`` (``vᵀ H_k v`` for every entry ``k``), ``[*S]``.

    Forward-over-forward (a JVP of a JVP, cost ≈ four forward passes); where an op has no
    forward-mode AD, reverse-over-reverse-over-reverse with a :class:`FallbackWarning`.
    """

    def along(w: ParamDict) -> Tensor:
        return jvp(prop, (w,), (direction,))[1]

    _autodiff._load_forward_ad()
    try:
        with _autodiff.composite_attention():
            return jvp(along, (weights,), (direction,))[1].detach()
    except NotImplementedError as err:
        _warn_second_order_fallback(prop, err)
    return _second_directional_reverse(prop, weights, direction)


def _second_directional_reverse(prop: Property, weights: ParamDict, direction: ParamDict) -> Tensor:
    """``vᵀ H_k v`` by three reverse passes: ``∂/∂u [v · ∇_w (uᵀ J v)]`` (linear in ``u``); a
    clear ``RuntimeError`` when the model's backward pass has no derivative of its own."""
    try:
        return _reverse_cubed(prop, weights, direction)
    except (RuntimeError, NotImplementedError) as err:
        if isinstance(err, _autodiff.NotTwiceDifferentiable) or "derivative for" in str(err):
            raise RuntimeError(
                f"predict_step: the second-order term of property {prop.name!r} needs "
                "forward-over-forward AD or double backward, and this model has neither "
                f"({_autodiff._first_line(err)}); use order=1."
            ) from err
        raise


def _reverse_cubed(prop: Property, weights: ParamDict, direction: ParamDict) -> Tensor:
    with _autodiff.composite_attention():
        out, leaves = _autodiff.evaluate(prop, weights)
    probe = torch.ones_like(out, requires_grad=True)
    with torch.enable_grad():
        pulled = torch.autograd.grad(
            out, list(leaves.values()), probe, create_graph=True, allow_unused=True
        )
        inner = _dot(pulled, direction, leaves)
        if inner is None or not inner.requires_grad:
            return torch.zeros_like(out).detach()
        curvature = torch.autograd.grad(
            inner, list(leaves.values()), create_graph=True, allow_unused=True
        )
        outer = _dot(curvature, direction, leaves)
    if outer is None or not outer.requires_grad:
        return torch.zeros_like(out).detach()
    (result,) = torch.autograd.grad(outer, probe, allow_unused=True)
    return torch.zeros_like(out).detach() if result is None else result.detach()


def _dot(
    grads: tuple[Tensor | None, ...], direction: ParamDict, leaves: ParamDict
) -> Tensor | None:
    terms = [(g * direction[n]).sum() for n, g in zip(leaves, grads, strict=True) if g is not None]
    return torch.stack(terms).sum() if terms else None


def _warn_second_order_fallback(prop: Property, err: Exception) -> None:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    warnings.warn(
        f"forward-over-forward AD is not available for property {prop.name!r} ({first_line}); "
        "computing the second-order term by reverse-over-reverse-over-reverse instead (same "
        "numbers, slower).",
        _autodiff.FallbackWarning,
        stacklevel=4,
    )


def _loss_gradient(loss: Property, weights: ParamDict) -> GradDict:
    """``∇L`` per parameter; ``None`` where ``L`` does not use it (as ``.grad`` would be)."""
    out, leaves = _autodiff.evaluate(loss, weights)
    if out.numel() != 1:
        raise ValueError(
            f"predict_step: loss {loss.name!r} must be a scalar property, got shape "
            f"{list(out.shape)}. Reduce it first (prop.mean())."
        )
    with torch.enable_grad():  # the reshape must be recorded even under torch.no_grad()
        scalar = out.reshape(())
    grads = torch.autograd.grad(scalar, list(leaves.values()), allow_unused=True)
    return {n: None if g is None else g.detach() for n, g in zip(leaves, grads, strict=True)}


def _restrict(tangent: ParamDict, weights: ParamDict) -> ParamDict:
    return {n: tangent[n] for n in weights}


def _jvp_unless_zero(
    prop: Property, weights: ParamDict, tangent: ParamDict, like: Tensor
) -> Tensor:
    if not any(t.any() for t in tangent.values()):
        return torch.zeros_like(like)
    return _autodiff.directional(prop, weights, tangent, force_reverse=False)[1]


def _minibatch_std(contributions: Tensor, batch_size: int, sampling: Sampling) -> Tensor:
    """``√(Var_i(c_i) / B · f)`` over the ``N`` examples of ``contributions`` ``[*S, N]``."""
    count = contributions.shape[-1]
    if contributions.numel() == 0:  # an empty property: no spread (and no torch warning)
        return contributions.new_zeros(contributions.shape[:-1])
    variance = contributions.reshape(-1, count).var(dim=1, correction=0)
    factor = 1.0
    if sampling is Sampling.WITHOUT_REPLACEMENT:
        factor = (count - batch_size) / (count - 1) if count > 1 else 0.0
    return (variance / batch_size * factor).sqrt().reshape(contributions.shape[:-1])


GATHER_ELEMENTS = 1 << 22  # contributions gathered at once by _minibatch_means


def _minibatch_means(
    contributions: Tensor, batch_size: int, sampling: Sampling, draws: int, seed: int
) -> Tensor:
    """Samples of the minibatch mean ``c̄_B``, ``[K, D]``.

    ``B = 1``: the ``N`` contributions themselves (the exact distribution, ``D = N``). Else
    ``D = draws`` random minibatches (without replacement: consecutive blocks of ``B`` of random
    permutations, as an epoch of shuffled minibatches; each block is a uniform random subset),
    gathered ``GATHER_ELEMENTS`` at a time (cost and memory ``K·D·B``, never ``N·D``).
    """
    count = contributions.shape[-1]
    flat = contributions.reshape(-1, count)
    if batch_size == 1:
        return flat
    index = _Draw(batch_size, sampling, draws, seed).index(count).to(flat.device)
    means = flat.new_empty(flat.shape[0], draws)
    chunk = max(1, GATHER_ELEMENTS // (flat.shape[0] * batch_size))  # memory K·chunk·B
    for start in range(0, draws, chunk):
        means[:, start : start + chunk] = flat[:, index[start : start + chunk]].mean(-1)
    return means


def _disjoint_batches(
    count: int, batch_size: int, draws: int, generator: torch.Generator
) -> Tensor:
    """``[draws, B]`` example indices: the ``⌊N/B⌋`` disjoint blocks of ``B`` of as many random
    permutations of the ``N`` examples as needed (cost ``≈ draws·B`` random numbers)."""
    per_permutation = count // batch_size
    permutations = -(-draws // per_permutation)
    blocks = [
        torch.randperm(count, generator=generator)[: per_permutation * batch_size]
        for _ in range(permutations)
    ]
    return torch.cat(blocks).reshape(-1, batch_size)[:draws]


def _quantiles(samples: Tensor, probabilities: tuple[float, ...]) -> list[Tensor]:
    """Quantiles of each row of ``samples`` ``[K, D]``, ``[K]`` each, treating the row as the
    distribution: the ``j``-th smallest sample (0-based) sits at ``(j + ½)/D`` and values in
    between are interpolated linearly (Hazen). Unlike ``torch.quantile``'s ``(j)/(D − 1)`` this
    leaves ``≈ p·D`` samples below the ``p``-quantile, so the coverage of the exact ``B = 1``
    distribution is ``≈ level`` even for small ``N``.
    """
    ordered = samples.sort(dim=-1).values
    count = ordered.shape[-1]
    result = []
    for p in probabilities:
        position = min(max(p * count - 0.5, 0.0), count - 1.0)
        below = int(position)
        above = min(below + 1, count - 1)
        weight = position - below
        result.append(ordered[:, below] * (1 - weight) + ordered[:, above] * weight)
    return result


class ApproximationWarning(UserWarning):
    """A prediction rests on an approximation that can be far off in the case at hand."""


# optimizers whose metric M depends on the gradient the step itself sees
ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


def _warn_adaptive_minibatch(optimizer: torch.optim.Optimizer) -> None:
    warnings.warn(
        f"predict_step: simulate=0 freezes {type(optimizer).__name__}'s metric M at the "
        "full-batch gradient for the minibatch std and interval, but M depends on the gradient "
        "each step sees. While the optimizer's state is young, real minibatch steps are "
        "normalised by their own, larger gradients and this spread can be far too wide (a "
        "fresh Adam on the digits: 6-100x). Leave simulate at its default to take real steps.",
        ApproximationWarning,
        stacklevel=3,
    )


def _as_batch_size(batch_size: object) -> int | None:
    """``batch_size`` as an int (NumPy integers accepted); ``None`` stays ``None``."""
    if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool):
        return int(batch_size)
    if batch_size is None:
        return None
    raise ValueError(f"predict_step: batch_size must be a positive int, got {batch_size!r}.")


def _check_minibatch(
    batch_size: int | None, per_example_loss: Property | None, loss: Property, sampling: Sampling
) -> int | None:
    """Validate the minibatch arguments; the number of examples ``N`` (``None``: full batch)."""
    if batch_size is None:
        if per_example_loss is not None:
            raise ValueError(
                "predict_step: per_example_loss is only used with batch_size; pass batch_size=B "
                "for the minibatch standard deviation, or drop per_example_loss."
            )
        return None
    if per_example_loss is None:
        raise ValueError(
            "predict_step: batch_size needs per_example_loss, a Property [N] of the losses of "
            "the N training examples whose mean is loss (e.g. "
            "ntcov.properties.per_example_loss(model, x, y))."
        )
    count = _check_per_example_loss(per_example_loss, loss)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"predict_step: batch_size must be a positive int, got {batch_size!r}.")
    if sampling is Sampling.WITHOUT_REPLACEMENT and batch_size > count:
        raise ValueError(
            f"predict_step: batch_size={batch_size} exceeds the {count} examples of "
            "per_example_loss; sampling without replacement needs batch_size <= N."
        )
    return count


def _check_per_example_loss(per_example_loss: Property, loss: Property) -> int:
    values = per_example_loss.value()
    if values.dim() != 1:
        raise ValueError(
            f"predict_step: per_example_loss must have shape [N], got {list(values.shape)}."
        )
    mean, full = values.mean(), loss.value().reshape(())
    if not torch.allclose(mean, full, rtol=1e-6, atol=1e-12):
        raise ValueError(
            f"predict_step: per_example_loss has mean {float(mean):.6g} but loss is "
            f"{float(full):.6g}; the minibatch noise needs L = mean_i ℓ_i (fold any "
            "regulariser into each example's loss)."
        )
    return values.shape[0]


def _check_properties(x: Property, loss: Property, per_example_loss: Property | None) -> None:
    props = {"x": x, "loss": loss, "per_example_loss": per_example_loss}
    for label, prop in props.items():
        if prop is None:
            continue
        if not isinstance(prop, Property):
            raise TypeError(
                f"predict_step: {label} must be an ntcov.Property, got {type(prop).__name__}."
            )
        if prop.module is not x.module:
            raise ValueError(
                f"predict_step: {label} is a property of a different module than x; all must "
                "be functions of the same model."
            )
        check_mode(prop.module, allow_train_mode=prop.allow_train_mode)


def _as_interval_method(method: IntervalMethod | str) -> IntervalMethod:
    return as_choice(IntervalMethod, method, "StepPrediction.interval", "method")


def _as_sampling(sampling: Sampling | str) -> Sampling:
    return as_choice(Sampling, sampling, "predict_step", "sampling")
