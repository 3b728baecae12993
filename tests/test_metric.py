"""optimizer_step against real torch.optim steps: Δw = −M ∇L + b, exactly, step after step."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntcov.metric import OptimizerStep, optimizer_step

DTYPE = torch.float64
STEPS = 4
Optim = torch.optim.Optimizer

CONFIGS: dict[str, tuple[type[Optim], dict[str, Any]]] = {
    "sgd_tensor_lr": (torch.optim.SGD, {"lr": torch.tensor(0.1), "momentum": 0.9}),
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd_wd": (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.1}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sgd_dampening": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.8, "dampening": 0.3}),
    "sgd_nesterov_wd": (
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
    ),
    "sgd_maximize": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "maximize": True}),
    "sgd_foreach": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "foreach": True}),
    "sgd_fused": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "betas": (0.8, 0.9)}),
    "adam_wd": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    "adam_amsgrad_wd": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    "adam_decoupled": (
        torch.optim.Adam,
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    "adam_maximize": (torch.optim.Adam, {"lr": 0.01, "maximize": True}),
    "adam_foreach": (torch.optim.Adam, {"lr": 0.01, "foreach": True, "weight_decay": 0.1}),
    "adam_fused": (torch.optim.Adam, {"lr": 0.01, "fused": True, "amsgrad": True}),
    "adam_tensor_lr": (torch.optim.Adam, {"lr": torch.tensor(0.01)}),
    "adamw_tensor_lr": (torch.optim.AdamW, {"lr": torch.tensor(0.01), "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01}),
    "adamw_amsgrad_wd": (torch.optim.AdamW, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.3}),
    "adamw_foreach": (torch.optim.AdamW, {"lr": 0.01, "foreach": True}),
    "adamw_fused": (torch.optim.AdamW, {"lr": 0.01, "fused": True}),
    "rmsprop_tensor_lr": (torch.optim.RMSprop, {"lr": torch.tensor(0.01), "momentum": 0.5}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01}),
    "rmsprop_centered": (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "alpha": 0.9}),
    "rmsprop_momentum_wd": (
        torch.optim.RMSprop,
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1, "eps": 1e-3},
    ),
    "rmsprop_all": (
        torch.optim.RMSprop,
        {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.1, "maximize": True},
    ),
    "rmsprop_foreach": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9, "foreach": True}),
    "adagrad_tensor_lr": (torch.optim.Adagrad, {"lr": torch.tensor(0.1), "lr_decay": 0.1}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
    "adagrad_decay": (
        torch.optim.Adagrad,
        {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1, "initial_accumulator_value": 0.2},
    ),
    "adagrad_maximize": (torch.optim.Adagrad, {"lr": 0.1, "maximize": True}),
    "adagrad_foreach": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1, "foreach": True}),
    "adagrad_fused": (torch.optim.Adagrad, {"lr": 0.1, "fused": True}),
}


def make_model(dtype: torch.dtype = DTYPE, device: str = "cpu") -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randint(0, 3, (16,))
    return model.to(device), x.to(device), y.to(device)


def backward(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor | None]:
    """Fills ``p.grad`` with the loss gradient; returns copies keyed by name."""
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def relative_error(predicted: dict[str, Tensor], actual: dict[str, Tensor]) -> float:
    diff = torch.cat([(predicted[n] - actual[n]).reshape(-1) for n in actual])
    total = torch.cat([actual[n].reshape(-1) for n in actual])
    return float(diff.norm() / total.norm())


def real_step(model: nn.Module, optimizer: Optim) -> dict[str, Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def predicted_vs_real(model: nn.Module, optimizer: Optim, x: Tensor, y: Tensor) -> list[float]:
    errors = []
    for _ in range(STEPS):
        grad = backward(model, x, y)
        predicted = optimizer_step(optimizer, model, grad).delta(grad)
        errors.append(relative_error(predicted, real_step(model, optimizer)))
    return errors


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_matches_real_optimizer(config: str) -> None:
    model, x, y = make_model()
    cls, kwargs = CONFIGS[config]
    optimizer = cls(model.parameters(), **kwargs)
    errors = predicted_vs_real(model, optimizer, x, y)
    assert max(errors) < 1e-12, errors  # measured ≤ 3e-15


@pytest.mark.parametrize("config", ["sgd_nesterov_wd", "adam_amsgrad_wd", "adamw", "rmsprop_all"])
def test_step_matches_in_float32(config: str) -> None:
    model, x, y = make_model(torch.float32)
    cls, kwargs = CONFIGS[config]
    optimizer = cls(model.parameters(), **kwargs)
    errors = predicted_vs_real(model, optimizer, x, y)
    assert max(errors) < 1e-5, errors


CUDA_CONFIGS: dict[str, tuple[type[Optim], dict[str, Any]]] = {
    "adam_capturable": (torch.optim.Adam, {"lr": 0.01, "capturable": True, "amsgrad": True}),
    "adamw_capturable_foreach": (
        torch.optim.AdamW,
        {"lr": 0.01, "capturable": True, "foreach": True},
    ),
    "adamw_fused": (torch.optim.AdamW, {"lr": 0.01, "fused": True, "weight_decay": 0.1}),
    "rmsprop_capturable": (torch.optim.RMSprop, {"lr": 0.01, "capturable": True, "momentum": 0.5}),
    "sgd_fused": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable optimizers need CUDA")
@pytest.mark.parametrize("config", list(CUDA_CONFIGS))
def test_step_matches_on_cuda(config: str) -> None:
    model, x, y = make_model(device="cuda")
    cls, kwargs = CUDA_CONFIGS[config]
    optimizer = cls(model.parameters(), **kwargs)
    errors = predicted_vs_real(model, optimizer, x, y)
    assert max(errors) < 1e-6, errors  # capturable keeps some scalars in float32


@pytest.mark.parametrize("config", ["sgd_nesterov_wd", "adam_amsgrad_wd", "rmsprop_all"])
def test_per_group_hyperparameters(config: str) -> None:
    model, x, y = make_model()
    cls, kwargs = CONFIGS[config]
    first, second = model[0], model[2]
    other = {"lr": kwargs["lr"] * 3, "weight_decay": 0.0}
    optimizer = cls(
        [{"params": first.parameters()}, {"params": second.parameters(), **other}], **kwargs
    )
    assert max(predicted_vs_real(model, optimizer, x, y)) < 1e-12


@pytest.mark.parametrize("config", ["sgd_momentum", "adamw", "rmsprop_momentum_wd", "adagrad"])
def test_frozen_and_gradient_free_parameters(config: str) -> None:
    model, x, y = make_model()
    model[0].weight.requires_grad_(False)  # frozen: not in the optimizer
    cls, kwargs = CONFIGS[config]
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    for _ in range(2):
        grad = backward(model, x, y)
        grad["0.bias"] = None  # the optimizer skips a parameter without a gradient
        model[0].bias.grad = None
        step = optimizer_step(optimizer, model, grad)
        for name in ("0.weight", "0.bias"):
            assert not step.metric[name].any() and not step.bias[name].any()
        actual = real_step(model, optimizer)
        assert relative_error(step.delta(grad), actual) < 1e-12
        assert not actual["0.weight"].any() and not actual["0.bias"].any()


def snapshot(optimizer: Optim) -> dict[str, Any]:
    return copy.deepcopy(optimizer.state_dict())


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same(u, v)
    else:
        assert a == b


@pytest.mark.parametrize("config", ["sgd_nesterov_wd", "adam_amsgrad_wd", "rmsprop_all"])
def test_optimizer_and_model_not_mutated(config: str) -> None:
    model, x, y = make_model()
    cls, kwargs = CONFIGS[config]
    optimizer = cls(model.parameters(), **kwargs)
    for step in range(3):
        grad = backward(model, x, y)
        before, weights = snapshot(optimizer), copy.deepcopy(model.state_dict())
        optimizer_step(optimizer, model, grad)
        assert_same(snapshot(optimizer), before)
        assert_same(model.state_dict(), weights)
        assert (len(optimizer.state) == 0) == (step == 0)
        optimizer.step()


def test_force_plus_bias_is_delta_and_force_is_linear() -> None:
    model, x, y = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    predicted_vs_real(model, optimizer, x, y)  # warm up the state
    grad = backward(model, x, y)
    step = optimizer_step(optimizer, model, grad)
    assert isinstance(step, OptimizerStep)
    for name, delta in step.delta(grad).items():
        # delta is one fused b − M ⊙ g: equal to force + bias up to one rounding
        assert torch.allclose(delta, step.force(grad)[name] + step.bias[name], atol=0, rtol=1e-15)
        half = step.force({n: 0.5 * g for n, g in grad.items() if g is not None})[name]
        assert torch.allclose(half, 0.5 * step.force(grad)[name], rtol=1e-15, atol=0)


class MySGD(torch.optim.SGD):
    pass


UNSUPPORTED: dict[str, Callable[[list[nn.Parameter]], Optim]] = {
    "lbfgs": lambda p: torch.optim.LBFGS(p),
    "sparse_adam": lambda p: torch.optim.SparseAdam(p),
    "nadam": lambda p: torch.optim.NAdam(p),
    "radam": lambda p: torch.optim.RAdam(p),
    "adamax": lambda p: torch.optim.Adamax(p),
    "asgd": lambda p: torch.optim.ASGD(p),
    "rprop": lambda p: torch.optim.Rprop(p),
    "adadelta": lambda p: torch.optim.Adadelta(p),
    "subclass": lambda p: MySGD(p, lr=0.1),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_optimizers_are_refused(name: str) -> None:
    model, x, y = make_model()
    optimizer = UNSUPPORTED[name](list(model.parameters()))
    with pytest.raises(TypeError, match=type(optimizer).__name__) as info:
        optimizer_step(optimizer, model, backward(model, x, y))
    assert "torch.optim.AdamW" in str(info.value)


def test_errors_name_the_offending_parameter() -> None:
    model, x, y = make_model()
    stranger = nn.Parameter(torch.zeros(7, 2, dtype=DTYPE))
    optimizer = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    grad = backward(model, x, y)
    with pytest.raises(ValueError, match=r"shape \[7, 2\]"):
        optimizer_step(optimizer, model, grad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'fc\.weight'"):
        optimizer_step(optimizer, model, {**grad, "fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"grad\['0.bias'\].*\[8\]"):
        optimizer_step(optimizer, model, {**grad, "0.bias": torch.zeros(3, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"grad\['0.bias'\] is torch.float32 on cpu"):
        optimizer_step(optimizer, model, {**grad, "0.bias": grad["0.bias"].float()})
