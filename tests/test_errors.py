"""Bad input raises ValueError/TypeError naming the offending thing, for every strategy."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import ntcov
from ntcov import FallbackWarning, Property, Strategy, properties
from ntcov.params import select_params
from tests.zoo import ZOO, Case

STRATEGIES = [s.value for s in Strategy]


@pytest.fixture
def mlp() -> Case:
    return ZOO["mlp"]()


def _all_entry_points(prop: Property, loss: Property, strategy: str) -> list:
    return [
        lambda: ntcov.ntcov(prop, loss, strategy=strategy),
        lambda: ntcov.ntcov(loss, prop, strategy=strategy),
        lambda: ntcov.ntvar(prop, strategy=strategy),
        lambda: ntcov.rate(prop, loss, strategy=strategy),
    ]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_property_that_does_not_depend_on_the_weights(mlp: Case, strategy: str) -> None:
    constant = Property(mlp.model, lambda m: mlp.x.sum(1), name="constant")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _all_entry_points(constant, loss, strategy):
        with pytest.raises(ValueError, match="'constant' does not depend on the selected param"):
            call()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_property_of_frozen_weights_only(strategy: str) -> None:
    case = ZOO["frozen"]()
    first_layer = Property(case.model, lambda m: m[0](case.x), name="first_layer")
    with pytest.raises(ValueError, match="'first_layer' does not depend"):
        ntcov.ntvar(first_layer, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_integer_output(mlp: Case, strategy: str) -> None:
    predicted = Property(mlp.model, lambda m: m(mlp.x).argmax(-1), name="predicted")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _all_entry_points(predicted, loss, strategy):
        with pytest.raises(TypeError, match=r"'predicted' returned a torch.int64 tensor.*\[5\]"):
            call()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rate_needs_a_scalar_loss(mlp: Case, strategy: str) -> None:
    x = properties.logits(mlp.model, mlp.x)
    losses = properties.per_example_loss(mlp.model, mlp.x, mlp.y)
    with pytest.raises(ValueError, match=r"rate: 'per_example_loss' must be a scalar.*\[5\]"):
        ntcov.rate(x, losses, strategy=strategy)


# ----- training mode --------------------------------------------------------------------------


def _dropout_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()


def test_batchnorm_in_train_mode_is_refused_naming_it() -> None:
    case = ZOO["cnn_bn"]()
    case.model.train()
    logits = properties.logits(case.model, case.x)
    loss = properties.loss(case.model, case.x, case.y)
    for call in [
        lambda: ntcov.ntcov(logits, loss),
        lambda: ntcov.ntvar(logits),
        lambda: ntcov.rate(logits, loss),
        lambda: logits.value(),
    ]:
        with pytest.raises(ValueError, match=r"module '1' \(BatchNorm2d\) is in training mode"):
            call()


def test_dropout_in_train_mode_is_refused_naming_it(mlp: Case) -> None:
    model = _dropout_mlp().train()
    logits = properties.logits(model, mlp.x)
    with pytest.raises(ValueError, match=r"module '1' \(Dropout\) is in training mode"):
        ntcov.ntvar(logits)
    model.eval()
    ntcov.ntvar(logits)


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda: nn.GRU(2, 3, num_layers=2, dropout=0.2), "<root>"),
        (lambda: nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(2, 1, dropout=0.1)), "1"),
    ],
)
def test_dropout_arguments_in_train_mode_are_refused(make, path: str) -> None:  # type: ignore[no-untyped-def]
    model = make().double().train()
    prop = Property(model, lambda m: sum(p.sum() for p in m.parameters()))
    with pytest.raises(ValueError, match=f"module '{path}'"):
        ntcov.ntvar(prop)


def test_train_mode_without_batchnorm_or_dropout_is_fine(mlp: Case) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.0), nn.Linear(6, 3)).double().train()
    assert ntcov.ntvar(properties.logits(model, mlp.x)).shape == (5, 3)


def test_allow_train_mode_accepts(mlp: Case) -> None:
    case = ZOO["cnn_bn"]()
    case.model.train()
    logits = properties.logits(case.model, case.x, allow_train_mode=True)
    loss = properties.loss(case.model, case.x, case.y, allow_train_mode=True)
    assert torch.isfinite(ntcov.rate(logits, loss)).all()
    dropped = properties.logits(_dropout_mlp().train(), mlp.x, allow_train_mode=True)
    assert torch.isfinite(ntcov.ntvar(dropped, strategy="vjp")).all()
    # one property allowing it is enough for a combination
    plain = properties.logits(case.model, case.x)
    assert (plain + logits).allow_train_mode


def test_batchnorm_without_running_stats_is_refused_even_in_eval(mlp: Case) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    model = model.double().eval()
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) has no running statistics"):
        ntcov.ntvar(properties.logits(model, mlp.x))
    assert ntcov.ntvar(properties.logits(model, mlp.x, allow_train_mode=True)).shape == (5, 3)


# ----- arguments ------------------------------------------------------------------------------


def test_unknown_strategy_lists_the_choices(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    for call in [
        lambda: ntcov.ntcov(logits, logits, strategy="fast"),
        lambda: ntcov.ntvar(logits, strategy="fast"),
        lambda: ntcov.rate(logits, logits.sum(), strategy="fast"),
    ]:
        with pytest.raises(ValueError, match=r"unknown strategy 'fast'.*'jvp'.*'per_example'"):
            call()


def test_unknown_parameter_name_lists_the_names(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    with pytest.raises(ValueError, match=r"'nope' is neither.*Parameters are: 0\.weight, 0\.bias"):
        ntcov.ntvar(logits, params="nope")
    with pytest.raises(ValueError, match=r"'0\.weigh' is neither"):
        ntcov.ntvar(logits, params=["2", "0.weigh"])


def test_bad_params_entries(mlp: Case) -> None:
    with pytest.raises(ValueError, match="not a submodule"):
        select_params(mlp.model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"must be str or nn\.Module, got int"):
        select_params(mlp.model, ["0", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        select_params(mlp.model, [])
    frozen = ZOO["frozen"]().model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_params(frozen)


def test_properties_of_two_modules(mlp: Case) -> None:
    other = ZOO["mlp"]().model
    a, b = properties.logits(mlp.model, mlp.x), properties.logits(other, mlp.x)
    two = r"two different module objects \(Sequential and Sequential\); build both properties "
    with pytest.raises(ValueError, match=f"same module; got {two}from the same model"):
        ntcov.ntcov(a, b)
    with pytest.raises(ValueError, match="same module"):
        ntcov.rate(a, b.sum())
    with pytest.raises(ValueError, match=rf"Property \+: both properties.*same module, got {two}"):
        a + b


def test_non_property_arguments(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    tensor = mlp.model(mlp.x)
    with pytest.raises(TypeError, match=r"expected ntcov\.Property arguments, got Tensor"):
        ntcov.ntcov(tensor, logits)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ntvar: expected ntcov\.Property"):
        ntcov.ntvar(tensor)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rate: expected ntcov\.Property"):
        ntcov.rate(logits, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got function"):
        Property(lambda m: m, lambda m: m)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn must be callable"):
        Property(mlp.model, "logits")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a Property, a number or a tensor, got object"):
        logits + object()  # type: ignore[operator]


def test_mismatched_lengths_in_constructors(mlp: Case) -> None:
    model, x, y = mlp.model, mlp.x, mlp.y
    with pytest.raises(ValueError, match=r"loss: x and targets.*\[5, 4\] and \[3\]"):
        properties.loss(model, x, y[:3])
    with pytest.raises(ValueError, match=r"per_example_loss: .*\[5, 4\] and \[4\]"):
        properties.per_example_loss(model, x, y[:4])
    with pytest.raises(ValueError, match="probs: x and targets"):
        properties.probs(model, x, y[:2])
    with pytest.raises(ValueError, match="log_probs: x and targets"):
        properties.log_probs(model, x, y[:2])
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        properties.probs(model, x, y.double())
    with pytest.raises(ValueError, match=r"share their first.*\[\(5, 4\), \(4,\)\]"):
        Property.from_per_example(model, lambda m, a, b: m(a), (x, y[:4]))


def test_per_example_loss_needs_one_loss_per_example(mlp: Case) -> None:
    losses = properties.per_example_loss(
        mlp.model, mlp.x, mlp.y, lambda out, y: nn.functional.cross_entropy(out, y)
    )
    with pytest.raises(ValueError, match=r"returned shape \[\] for a batch of 5"):
        losses.value()


def test_memory_budget_must_be_positive(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        ntcov.ntcov(logits, logits, strategy="vjp", memory_budget=0)


class _OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize("strategy", ["auto", "jvp", "double_vjp"])
def test_double_vjp_refuses_a_backward_that_is_not_differentiable(mlp: Case, strategy: str) -> None:
    """Without forward AD, such an op would make the double-VJP trick silently return 0: asked
    for explicitly it refuses; as a fallback it gives way to the Jacobian's rows (exact)."""
    prop = Property(mlp.model, lambda m: _OnceDifferentiableSquare.apply(m(mlp.x)), name="sq")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    expected = ntcov.rate(prop, loss, strategy="loop")  # the row strategies need first derivatives
    assert expected.abs().sum() > 0
    torch.testing.assert_close(ntcov.rate(prop, loss, strategy="vjp"), expected)
    if strategy == "double_vjp":
        with pytest.raises(RuntimeError, match="backward pass of property 'sq' is not different"):
            ntcov.rate(prop, loss, strategy=strategy)
        return
    with pytest.warns(FallbackWarning, match="neither forward-mode AD nor double backward"):
        torch.testing.assert_close(ntcov.rate(prop, loss, strategy=strategy), expected)
