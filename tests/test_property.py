"""Property algebra, per-example structure, the ready-made properties, and no mutation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ntcov
from ntcov import Property, properties
from tests.zoo import ZOO, Case, assert_close


def _random(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def mlp() -> Case:
    return ZOO["mlp"]()


# ----- values of the operators ----------------------------------------------------------------

F_LEFT = _random(2, 5, seed=1)  # acts on the example axis of [5, 3] logits
G_RIGHT = _random(3, 4, seed=2)
C_TENSOR = _random(5, 3, seed=3)

BINARY: dict[str, tuple[Callable[[Property, Property], Property], Callable]] = {
    "add": (lambda a, b: a + b, lambda u, v: u + v),
    "sub": (lambda a, b: a - b, lambda u, v: u - v),
    "mul": (lambda a, b: a * b, lambda u, v: u * v),
    "div": (lambda a, b: a / b, lambda u, v: u / v),
}

UNARY: dict[str, tuple[Callable[[Property], Property], Callable[[Tensor], Tensor]]] = {
    "scalar_mul": (lambda a: 2.5 * a, lambda u: 2.5 * u),
    "mul_scalar": (lambda a: a * 2.5, lambda u: u * 2.5),
    "add_scalar": (lambda a: a + 1.5, lambda u: u + 1.5),
    "radd_scalar": (lambda a: 1.5 + a, lambda u: 1.5 + u),
    "sub_scalar": (lambda a: a - 1.5, lambda u: u - 1.5),
    "rsub_scalar": (lambda a: 1.5 - a, lambda u: 1.5 - u),
    "div_scalar": (lambda a: a / 4.0, lambda u: u / 4.0),
    "int_scalar": (lambda a: 3 * a, lambda u: 3 * u),
    "neg": (lambda a: -a, lambda u: -u),
    "tensor_mul": (lambda a: C_TENSOR * a, lambda u: C_TENSOR * u),
    "mul_tensor": (lambda a: a * C_TENSOR, lambda u: u * C_TENSOR),
    "add_tensor": (lambda a: a + C_TENSOR, lambda u: u + C_TENSOR),
    "left_matmul": (lambda a: F_LEFT @ a, lambda u: F_LEFT @ u),
    "right_matmul": (lambda a: a @ G_RIGHT, lambda u: u @ G_RIGHT),
    "slice": (lambda a: a[1:4], lambda u: u[1:4]),
    "index_tensor": (lambda a: a[torch.tensor([4, 0, 2])], lambda u: u[torch.tensor([4, 0, 2])]),
    "index_list": (lambda a: a[[3, 1]], lambda u: u[[3, 1]]),
    "column": (lambda a: a[:, 1], lambda u: u[:, 1]),
    "columns": (lambda a: a[:, [2, 0]], lambda u: u[:, [2, 0]]),
    "entry": (lambda a: a[2, 1], lambda u: u[2, 1]),
    "pairs": (lambda a: a[[0, 4], [2, 1]], lambda u: u[[0, 4], [2, 1]]),
    "map": (lambda a: a.map(torch.tanh), torch.tanh),
    "map_rows": (lambda a: a.map_rows(torch.sigmoid), torch.sigmoid),
    "sum": (lambda a: a.sum(), torch.sum),
    "mean": (lambda a: a.mean(), torch.mean),
    "reshape": (lambda a: a.reshape(3, 5), lambda u: u.reshape(3, 5)),
}


@pytest.mark.parametrize("op", list(BINARY))
def test_binary_operator_values(mlp: Case, op: str) -> None:
    a = properties.logits(mlp.model, mlp.x)
    b = properties.logits(mlp.model, mlp.x.flip(0) + 1.0)
    prop_op, tensor_op = BINARY[op]
    assert_close(prop_op(a, b).value(), tensor_op(a.value(), b.value()))


@pytest.mark.parametrize("op", list(UNARY))
def test_unary_operator_values(mlp: Case, op: str) -> None:
    a = properties.logits(mlp.model, mlp.x)
    prop_op, tensor_op = UNARY[op]
    derived = prop_op(a)
    expected = tensor_op(mlp.model(mlp.x).detach())
    assert_close(derived.value(), expected)
    assert derived.shape == expected.shape
    # and its gradient is the chain rule of the same expression (checked against the loop)
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    assert_close(ntcov.ntcov(derived, loss), ntcov.ntcov(derived, loss, strategy="loop"))


def test_property_evaluates_at_given_weights(mlp: Case) -> None:
    a = properties.logits(mlp.model, mlp.x)
    new_weight = _random(3, 6, seed=9)
    changed = copy.deepcopy(mlp.model)
    with torch.no_grad():
        changed[2].weight.copy_(new_weight)
    assert_close(a({"2.weight": new_weight}), changed(mlp.x).detach())
    assert_close(a({}), mlp.model(mlp.x).detach())


def test_properties_match_their_definitions(mlp: Case) -> None:
    model, x, y = mlp.model, mlp.x, mlp.y
    out = model(x).detach()
    targets = torch.tensor([0, 2, 1, 1, 0])
    assert_close(properties.logits(model, x).value(), out)
    assert_close(properties.probs(model, x, 2).value(), torch.softmax(out, -1)[:, 2])
    assert_close(
        properties.probs(model, x, targets).value(), torch.softmax(out, -1)[range(5), targets]
    )
    assert_close(
        properties.log_probs(model, x, targets).value(),
        torch.log_softmax(out, -1)[range(5), targets],
    )
    assert_close(properties.loss(model, x, y).value(), F.cross_entropy(out, y))
    assert_close(
        properties.per_example_loss(model, x, y).value(), F.cross_entropy(out, y, reduction="none")
    )


@pytest.mark.parametrize(
    "loss_fn", [None, nn.CrossEntropyLoss(), nn.MSELoss(), nn.L1Loss()], ids=str
)
def test_mean_of_per_example_loss_is_the_loss(mlp: Case, loss_fn: nn.Module | None) -> None:
    y = mlp.y if loss_fn is None or isinstance(loss_fn, nn.CrossEntropyLoss) else _random(5, 3)
    per_example = properties.per_example_loss(mlp.model, mlp.x, y, loss_fn)
    loss = properties.loss(mlp.model, mlp.x, y, loss_fn)
    assert per_example.shape == (5,)
    assert_close(per_example.mean().value(), loss.value())
    assert_close(ntcov.ntcov(per_example.mean(), per_example), ntcov.ntcov(loss, per_example))
    if loss_fn is not None:
        assert loss_fn.reduction == "mean"  # the user's loss module is not changed


# ----- per-example structure ------------------------------------------------------------------

KEEPS = ["scalar_mul", "mul_scalar", "add_scalar", "radd_scalar", "sub_scalar", "rsub_scalar"]
KEEPS += ["div_scalar", "int_scalar", "neg", "slice", "index_tensor", "index_list", "column"]
KEEPS += ["columns", "map_rows"]
DROPS = ["tensor_mul", "mul_tensor", "add_tensor", "left_matmul", "right_matmul", "entry"]
DROPS += ["pairs", "map", "sum", "mean", "reshape"]


def _check_structure(prop: Property) -> None:
    """The declared per-example function reproduces the value, row by row."""
    pe = prop.per_example
    assert pe is not None
    value = prop.value()
    assert_close(pe.fn(prop.module, *pe.inputs).detach(), value)
    for i in range(pe.num_examples):
        single = pe.fn(prop.module, *(x[i : i + 1] for x in pe.inputs)).detach()
        assert_close(single[0], value[i])


@pytest.mark.parametrize(
    "make",
    [
        lambda c: properties.logits(c.model, c.x),
        lambda c: properties.probs(c.model, c.x, 1),
        lambda c: properties.log_probs(c.model, c.x, c.y),
        lambda c: properties.per_example_loss(c.model, c.x, c.y),
    ],
    ids=["logits", "probs", "log_probs", "per_example_loss"],
)
def test_ready_made_properties_are_per_example(mlp: Case, make: Callable) -> None:
    _check_structure(make(mlp))
    assert properties.loss(mlp.model, mlp.x, mlp.y).per_example is None


@pytest.mark.parametrize("op", KEEPS)
def test_operations_that_keep_per_example_structure(mlp: Case, op: str) -> None:
    derived = UNARY[op][0](properties.logits(mlp.model, mlp.x))
    _check_structure(derived)


@pytest.mark.parametrize("op", DROPS)
def test_operations_that_drop_per_example_structure(mlp: Case, op: str) -> None:
    assert UNARY[op][0](properties.logits(mlp.model, mlp.x)).per_example is None


@pytest.mark.parametrize("op", list(BINARY))
def test_combining_two_properties_drops_per_example_structure(mlp: Case, op: str) -> None:
    a, b = properties.logits(mlp.model, mlp.x), properties.logits(mlp.model, mlp.x)
    assert BINARY[op][0](a, b).per_example is None


@pytest.mark.parametrize("op", [*KEEPS, "pairs"])
def test_per_example_strategy_on_indexed_and_scaled_properties(mlp: Case, op: str) -> None:
    derived = UNARY[op][0](properties.logits(mlp.model, mlp.x))
    expected = ntcov.ntvar(derived, strategy="loop")
    assert_close(ntcov.ntvar(derived, strategy="per_example"), expected)
    assert_close(ntcov.ntvar(derived, strategy="auto", memory_budget=1), expected)


# ----- the user's module is never changed -----------------------------------------------------


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "ids": [id(p) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for key in ("ids", "requires_grad", "training", "hooks"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grads"])


def _exercise(model: nn.Module, case: Case, *, allow_train_mode: bool = False) -> None:
    kwargs = {"allow_train_mode": allow_train_mode}
    logits = properties.logits(model, case.x, **kwargs)
    loss = properties.loss(model, case.x, case.y, **kwargs)
    probs = properties.probs(model, case.x2, 1, **kwargs)
    for strategy in ("auto", "jvp", "double_vjp", "per_example", "vjp", "loop"):
        ntcov.ntcov(logits, probs, strategy=strategy)
        ntcov.ntvar(logits, strategy=strategy)
        ntcov.rate(probs, loss, strategy=strategy)
    logits.value()


def test_module_is_never_mutated(zoo_case: Case) -> None:
    model = zoo_case.model
    before = _snapshot(model)
    _exercise(model, zoo_case)
    _assert_unchanged(model, before)


def test_train_mode_batchnorm_running_stats_are_not_updated() -> None:
    case = ZOO["cnn_bn"]()
    model = case.model.train()
    before = _snapshot(model)
    probe = copy.deepcopy(model)  # sanity: a real forward pass in train mode does update them
    probe(case.x)
    assert not torch.equal(probe[1].running_mean, model[1].running_mean)
    _exercise(model, case, allow_train_mode=True)
    _assert_unchanged(model, before)
    assert model[1].training


def test_repr_and_name(mlp: Case) -> None:
    a = properties.logits(mlp.model, mlp.x)
    assert "logits" in repr(a)
    assert (2.0 * a[:, 0]).name.count("logits") == 1
    assert Property(mlp.model, lambda m: m(mlp.x), name="mine").name == "mine"
