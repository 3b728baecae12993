"""An optimizer's next step as a metric and a bias: ``Δw = −M ∇L + b``.

For the optimizers of ``torch.optim`` that act elementwise, the update that ``optimizer.step()``
would make from the gradient ``g = ∇L`` (what ``p.grad`` holds) is, per parameter entry,

    Δw = −M ⊙ g + b

with ``M`` (the *metric*, the learning rate folded in) and ``b`` (the *bias*: momentum carried
over from earlier steps, weight decay, Adam's first-moment carry-over) read from the optimizer's
hyperparameters and state. With ``g_eff = ±g + λ w`` (the sign is ``−`` for ``maximize=True``,
``λ`` the coupled weight decay):

- SGD (rate ``η``, momentum ``μ``, dampening ``d``): ``M = η a`` and ``b = −η (a λ w + c)``.
  Without momentum ``a = 1``, ``c = 0``; on the first momentum step (no buffer yet) ``a = 1``
  (``1 + μ`` with Nesterov), ``c = 0``; later ``a = 1 − d``, ``c = μ buf``
  (Nesterov: ``a = 1 + μ(1 − d)``, ``c = μ² buf``).
- Adam/AdamW: ``v = β₂ v_old + (1 − β₂) g_eff²`` (``max`` with the old maximum for AMSGrad),
  ``s = η / ((1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε))``; ``M = s (1 − β₁)``,
  ``b = −s (β₁ m_old + (1 − β₁) λ w) − η λ_decoupled w`` (AdamW decays the weights directly).
- RMSprop: ``v = α v_old + (1 − α) g_eff²`` (minus the squared running mean when centered),
  ``M = η / (√v + ε)``, ``b = −M λ w − η μ buf`` with momentum ``μ``.
- Adagrad: ``Σ = Σ_old + g_eff²``, ``M = η_t / (√Σ + ε)`` with
  ``η_t = η / (1 + (t − 1) lr_decay)``, ``b = −M λ w``.

For the adaptive optimizers (Adam, AdamW, RMSprop, Adagrad), ``M`` depends on the current gradient
through the second moment; it is defined *at the given gradient*, so that ``delta(grad)`` equals
the true step exactly. For another gradient (a minibatch's), ``force(other)`` is the step under the
metric frozen at ``grad``. With ``maximize=True`` the metric is negative (the optimizer ascends).
The ``foreach``, ``fused``, ``capturable`` and ``differentiable`` implementations compute the
same update (scalars such as Adam's bias corrections are taken in the precision torch uses).
Parameters that the optimizer does not hold, or whose gradient is missing (``None``: the
optimizer skips them), get ``M = 0`` and ``b = 0``. Nothing here changes the optimizer or its state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntcov.params import ParamDict

__all__ = ["OptimizerStep", "optimizer_step", "weights_of"]

GradDict = Mapping[str, Tensor | None]
Group = dict[str, Any]
State = Mapping[str, Any]
# (group, state, w, g_eff) -> (coef, carry) with Δw = −coef ⊙ g_eff + carry
Rule = Callable[[Group, State, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True, eq=False)
class OptimizerStep:
    """The next update ``Δw = −M ⊙ g + b`` of an optimizer, per parameter.

    ``metric`` (``M``) and ``bias`` (``b``) are dicts keyed by ``model.named_parameters()`` names,
    each tensor shaped like its parameter.
    """

    metric: ParamDict
    bias: ParamDict

    def force(self, grad: GradDict) -> ParamDict:
        """``−M ⊙ g`` per parameter; names absent from ``grad`` (or ``None``) give zeros."""
        self._check_names(grad, "force")
        out = {}
        for name, metric in self.metric.items():
            g = grad.get(name)
            out[name] = torch.zeros_like(metric) if g is None else torch.mul(metric, g).neg_()
        return out

    def delta(self, grad: GradDict) -> ParamDict:
        """The update ``Δw = −M ⊙ g + b`` per parameter (exact at the gradient it was built at)."""
        self._check_names(grad, "delta")
        out = {}
        for name, metric in self.metric.items():
            g, bias = grad.get(name), self.bias[name]
            out[name] = bias.clone() if g is None else torch.addcmul(bias, metric, g, value=-1)
        return out

    def _check_names(self, grad: GradDict, method: str) -> None:
        unknown = [n for n in grad if n not in self.metric]
        if unknown:
            raise ValueError(
                f"OptimizerStep.{method}: grad has entries for unknown parameters {unknown}; "
                f"known parameters are {list(self.metric)}."
            )


def optimizer_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, grad: GradDict
) -> OptimizerStep:
    """The step ``optimizer.step()`` would take if each parameter's ``.grad`` were ``grad[name]``.

    ``grad`` maps ``model.named_parameters()`` names to gradients (a missing name or ``None``
    means no gradient: the optimizer skips that parameter). Optimizer parameters are matched to
    names by identity. Supported: SGD, Adam, AdamW, RMSprop, Adagrad (exact types), with
    per-group hyperparameters and the ``foreach``/``fused``/``capturable`` implementations.
    """
    rule = _rule_for(optimizer)
    names = _names_by_identity(optimizer, model)
    params = dict(model.named_parameters())
    _check_grad(grad, params)
    _check_no_grad_scaler(optimizer)
    stepped: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                g = grad.get(name)
                if g is None:
                    continue
                _check_entry(name, p, g)
                state = optimizer.state.get(p, {})
                stepped[name] = _linear_step(rule, optimizer, group, state, p, g)
    metric, bias = {}, {}
    for name, p in params.items():  # in model order; parameters not stepped get M = b = 0
        if name in stepped:
            metric[name], bias[name] = stepped[name]
        else:
            metric[name], bias[name] = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())
    return OptimizerStep(metric, bias)


def _linear_step(
    rule: Rule, optimizer: torch.optim.Optimizer, group: Group, state: State, p: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    """``(M, b)`` from the rule's ``(coef, carry)`` in terms of ``g_eff = sign g + λ w``."""
    w, g = p.detach(), g.detach()
    maximize = bool(group.get("maximize", False))
    decay = _coupled_weight_decay(optimizer, group)
    effective = -g if maximize else g
    if decay != 0:
        effective = effective + decay * w
    coef, carry = rule(group, state, w, effective)
    bias = carry - coef * (decay * w) if decay != 0 else carry
    return (-coef if maximize else coef), bias


def _coupled_weight_decay(optimizer: torch.optim.Optimizer, group: Group) -> float:
    """``λ`` added to the gradient (Adam with ``decoupled_weight_decay`` and AdamW decay ``w``)."""
    if isinstance(optimizer, torch.optim.Adam) and group.get("decoupled_weight_decay", False):
        return 0.0
    return _scalar(group.get("weight_decay", 0.0))


def _sgd(group: Group, state: State, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    lr, momentum = _scalar(group["lr"]), _scalar(group["momentum"])
    if momentum == 0:
        return torch.full_like(w, lr), torch.zeros_like(w)
    dampening, nesterov = _scalar(group["dampening"]), group["nesterov"]
    buffer = state.get("momentum_buffer")
    if buffer is None:  # the first step: the buffer starts as the gradient, undamped
        return torch.full_like(w, lr * (1 + momentum if nesterov else 1.0)), torch.zeros_like(w)
    if nesterov:
        scale, carry = 1 + momentum * (1 - dampening), momentum * momentum * buffer
    else:
        scale, carry = 1 - dampening, momentum * buffer
    return torch.full_like(w, lr * scale), -lr * carry


def _adam(group: Group, state: State, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    eps = _scalar(group["eps"])
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    first, old_second = state.get("exp_avg"), state.get("exp_avg_sq")
    second = torch.mul(g, g).mul_(1 - beta2)
    if old_second is not None:
        second.add_(old_second, alpha=beta2)
    if group["amsgrad"] and state.get("max_exp_avg_sq") is not None:
        second = torch.maximum(state["max_exp_avg_sq"], second)
    correction1, root_correction2 = _adam_corrections(group, state, beta1, beta2)
    step_size = _like(group["lr"] / correction1, w)  # the precision torch computes it in
    scale = step_size / second.sqrt_().div_(_like(root_correction2, w)).add_(eps)
    carry = torch.zeros_like(w) if first is None else torch.mul(first, scale).mul_(-beta1)
    if group.get("decoupled_weight_decay", False):  # w ← (1 − η λ) w, in torch's precision
        shrink = _like(1 - group["lr"] * _scalar(group["weight_decay"]), w)
        carry = carry + (shrink - 1) * w
    return scale * (1 - beta1), carry


def _adam_corrections(
    group: Group, state: State, beta1: float, beta2: float
) -> tuple[float | Tensor, float | Tensor]:
    """``1 − β₁ᵗ`` and ``√(1 − β₂ᵗ)`` at the next step ``t``, in the precision torch uses.

    ``capturable``/``differentiable`` compute them from the ``step`` tensor (often float32);
    otherwise from its value as a Python float.
    """
    step = _next_step(state, torch.float32 if group.get("fused") else None)
    if group.get("capturable") or group.get("differentiable"):
        return 1 - beta1**step, (1 - beta2**step).sqrt()
    t = float(step)
    return 1 - beta1**t, (1 - beta2**t) ** 0.5


def _rmsprop(group: Group, state: State, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    lr, alpha, eps = _scalar(group["lr"]), _scalar(group["alpha"]), _scalar(group["eps"])
    momentum = _scalar(group["momentum"])
    second = alpha * state.get("square_avg", torch.zeros_like(w)) + (1 - alpha) * g * g
    if group["centered"]:
        mean = state.get("grad_avg", torch.zeros_like(w))
        mean = mean + (1 - alpha) * (g - mean)
        second = second - mean * mean
    coef = lr / (second.sqrt() + eps)
    if momentum > 0:
        carry = -lr * momentum * state.get("momentum_buffer", torch.zeros_like(w))
    else:
        carry = torch.zeros_like(w)
    return coef, carry


def _adagrad(group: Group, state: State, w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    eps, lr_decay = _scalar(group["eps"]), _scalar(group["lr_decay"])
    initial = torch.full_like(w, _scalar(group["initial_accumulator_value"]))
    total = state.get("sum", initial) + g * g
    step = float(_next_step(state, None))
    decayed_lr = _like(group["lr"] / (1 + (step - 1) * lr_decay), w)
    return decayed_lr / (total.sqrt() + eps), torch.zeros_like(w)


def _next_step(state: State, dtype: torch.dtype | None) -> Tensor:
    """The optimizer's step counter after this step, as a tensor (the state's own dtype)."""
    step = state.get("step")
    if step is None:
        default = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        return torch.tensor(1.0, dtype=dtype or default)
    return torch.as_tensor(step).detach() + 1


_RULES: dict[type, Rule] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Adagrad: _adagrad,
}


def _rule_for(optimizer: torch.optim.Optimizer) -> Rule:
    rule = _RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in _RULES)
        raise TypeError(
            f"optimizer_step: {type(optimizer).__module__}.{type(optimizer).__qualname__} is not "
            f"supported; supported optimizers (exact types, not subclasses) are {supported}."
        )
    return rule


def weights_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, str]:
    """``id(param) → name`` for every parameter ``optimizer`` holds; a ``ValueError`` naming
    those that are not parameters of ``model``."""
    return _names_by_identity(optimizer, model)


def _names_by_identity(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, str]:
    """``id(param) → name`` for every optimizer parameter; refuse those not in ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [
        f"group {i} parameter {j} (shape {list(p.shape)})"
        for i, group in enumerate(optimizer.param_groups)
        for j, p in enumerate(group["params"])
        if id(p) not in names
    ]
    if missing:
        raise ValueError(
            f"optimizer_step: the optimizer holds parameters that are not parameters of the "
            f"{type(model).__name__}: {', '.join(missing)}. Pass the model the optimizer trains."
        )
    return names


def _check_grad(grad: GradDict, params: Mapping[str, Tensor]) -> None:
    if not isinstance(grad, Mapping):
        raise TypeError(
            f"optimizer_step: grad must be a dict {{parameter name: Tensor}}, got "
            f"{type(grad).__name__}."
        )
    unknown = [n for n in grad if n not in params]
    if unknown:
        raise ValueError(
            f"optimizer_step: grad has entries {unknown} that are not parameter names of the "
            f"model; names are those of model.named_parameters()."
        )


def _check_entry(name: str, param: Tensor, grad: Tensor) -> None:
    if not isinstance(grad, Tensor) or grad.shape != param.shape:
        shape = list(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(
            f"optimizer_step: grad[{name!r}] is {shape}, expected a tensor of the parameter's "
            f"shape {list(param.shape)}."
        )
    if grad.dtype != param.dtype or grad.device != param.device:
        raise ValueError(
            f"optimizer_step: grad[{name!r}] is {grad.dtype} on {grad.device}, the parameter "
            f"{param.dtype} on {param.device}; torch's own step refuses such a .grad. Convert "
            "it, e.g. grad.to(param)."
        )
    if grad.is_sparse or param.is_complex():
        raise ValueError(
            f"optimizer_step: parameter {name!r} is complex or has a sparse gradient; only real "
            "parameters with dense gradients are supported."
        )


def _check_no_grad_scaler(optimizer: torch.optim.Optimizer) -> None:
    if getattr(optimizer, "grad_scale", None) is not None:
        raise ValueError(
            "optimizer_step: the optimizer carries a GradScaler scale (grad_scale), so its step "
            "unscales the gradients; pass unscaled gradients to a plain step instead."
        )


def _like(value: float | Tensor, w: Tensor) -> Tensor:
    """A scalar (a float, or a 0-dim tensor in its own precision) as a 0-dim tensor like ``w``."""
    if isinstance(value, Tensor):
        return value.detach().to(w)
    return torch.tensor(value, dtype=w.dtype, device=w.device)


def _scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python float (hyperparameters may be 0-dim tensors)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)
