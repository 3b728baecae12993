"""Forecasts over many steps, tested against what training actually does.

Small float64 MLPs on 200 real digits: re-linearising every step is real training; a frozen kernel
is exact for a model linear in its weights, starts at ``η · rate`` and drifts with the horizon.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import ntcov
from ntcov import Property, properties
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_mlp
from tests.zoo import assert_close

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
LOSS = nn.CrossEntropyLoss()


def sgd(lr: float, momentum: float = 0.0) -> OptimizerFactory:
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)


def adam(lr: float) -> OptimizerFactory:
    return lambda ps: torch.optim.Adam(ps, lr=lr)


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor]:
    """200 training digits ``[200, 64]`` with labels, and 50 held-out digits ``[50, 64]``."""
    split = load_digits_split()
    return split.x_train[:200], split.y_train[:200], split.x_test[:50]


def setup(
    digits: tuple[Tensor, Tensor, Tensor], depth: int = 2
) -> tuple[nn.Module, Property, Property, Tensor]:
    """A fresh ``64 → 16 → … → 10`` MLP, its held-out logits ``x`` and training logits ``f``."""
    x_train, y_train, x_test = digits
    model = digits_mlp(hidden=16, depth=depth)
    return model, properties.logits(model, x_test), properties.logits(model, x_train), y_train


@pytest.mark.parametrize(
    "factory", [sgd(0.2, momentum=0.9), adam(0.01)], ids=["sgd_momentum", "adam"]
)
def test_relinearising_every_step_is_actual_training(
    digits: tuple[Tensor, Tensor, Tensor], factory: OptimizerFactory
) -> None:
    _, x, f, y = setup(digits)
    actual = ntcov.actual_trajectory(x, f, y, LOSS, factory, 30)
    predicted = ntcov.forecast(x, f, y, LOSS, factory, 30, relinearize_every=1)
    assert predicted.trajectory.shape == (31, 50, 10)
    assert (actual[-1] - actual[0]).abs().max() > 0.1  # training really moved the logits
    assert_close(predicted.trajectory, actual)
    assert ntcov.forecast_horizon(predicted, actual, threshold=1e-8) is None


def test_first_frozen_step_is_learning_rate_times_rate(
    digits: tuple[Tensor, Tensor, Tensor],
) -> None:
    model, x, f, y = setup(digits)
    predicted = ntcov.forecast(x, f, y, LOSS, sgd(0.2), 1).trajectory
    loss = properties.loss(model, digits[0], y, LOSS)
    assert_close(predicted[0], x.value())
    assert_close(predicted[1] - predicted[0], 0.2 * ntcov.rate(x, loss))


@pytest.mark.parametrize("factory", [sgd(0.5, momentum=0.5), adam(0.05)], ids=["sgd", "adam"])
def test_frozen_kernel_is_exact_when_outputs_are_linear_in_the_weights(
    digits: tuple[Tensor, Tensor, Tensor], factory: OptimizerFactory
) -> None:
    """Training only the last layer: the logits are linear in those weights, the kernel fixed."""
    _, x, f, y = setup(digits, depth=1)
    head = {"params": "2"}
    actual = ntcov.actual_trajectory(x, f, y, LOSS, factory, 40, **head)
    predicted = ntcov.forecast(x, f, y, LOSS, factory, 40, **head)
    assert predicted.relinearize_every is None and predicted.steps == 40
    assert (actual[-1] - actual[0]).abs().max() > 0.1
    assert_close(predicted.trajectory, actual)


def test_frozen_kernel_error_is_small_early_and_grows_with_the_horizon(
    digits: tuple[Tensor, Tensor, Tensor],
) -> None:
    _, x, f, y = setup(digits)
    actual = ntcov.actual_trajectory(x, f, y, LOSS, sgd(0.05), 100)
    error = ntcov.forecast_error(ntcov.forecast(x, f, y, LOSS, sgd(0.05), 100), actual)
    assert error.shape == (101,)
    assert error[0] == 0
    assert error[1:6].max() < 0.02
    assert error[100] > 5 * error[10]
    assert error[100] > 0.1
    first_above = int(torch.nonzero(error > 0.1)[0, 0])
    horizon = ntcov.forecast_horizon(ntcov.forecast(x, f, y, LOSS, sgd(0.05), 100), actual)
    assert horizon == first_above and 10 < horizon < 100


def test_relinearising_beats_the_frozen_kernel_at_long_horizons(
    digits: tuple[Tensor, Tensor, Tensor],
) -> None:
    _, x, f, y = setup(digits)
    factory = sgd(0.05)
    actual = ntcov.actual_trajectory(x, f, y, LOSS, factory, 100)
    frozen = ntcov.forecast_error(ntcov.forecast(x, f, y, LOSS, factory, 100), actual)
    every_10 = ntcov.forecast(x, f, y, LOSS, factory, 100, relinearize_every=10)
    relinearised = ntcov.forecast_error(every_10, actual)
    assert_close(relinearised[:10], frozen[:10])  # the same forecast until the first re-centring
    assert relinearised[100] < frozen[100] / 3
    assert (ntcov.forecast_horizon(every_10, actual) or 101) > ntcov.forecast_horizon(
        ntcov.forecast(x, f, y, LOSS, factory, 100), actual
    )


def test_adam_forecast_follows_training_at_short_horizons(
    digits: tuple[Tensor, Tensor, Tensor],
) -> None:
    _, x, f, y = setup(digits)
    actual = ntcov.actual_trajectory(x, f, y, LOSS, adam(0.001), 10)
    error = ntcov.forecast_error(ntcov.forecast(x, f, y, LOSS, adam(0.001), 10), actual)
    assert error[1:4].max() < 0.05
    assert error[10] > error[1]


def test_model_and_optimizer_are_untouched(digits: tuple[Tensor, Tensor, Tensor]) -> None:
    model, x, f, y = setup(digits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = copy.deepcopy(model.state_dict())
    ntcov.forecast(x, f, y, LOSS, sgd(0.2, momentum=0.9), 5, relinearize_every=2)
    ntcov.actual_trajectory(x, f, y, LOSS, sgd(0.2, momentum=0.9), 5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state_dict()["state"] == {}


def test_a_factory_returning_another_optimizer_is_refused(
    digits: tuple[Tensor, Tensor, Tensor],
) -> None:
    model, x, f, y = setup(digits)
    users = torch.optim.SGD(model.parameters(), lr=0.1)
    for run in (ntcov.forecast, ntcov.actual_trajectory):
        with pytest.raises(ValueError, match="new optimizer over exactly the parameters"):
            run(x, f, y, LOSS, lambda ps: users, 3)
        with pytest.raises(TypeError, match=r"expected a torch\.optim\.Optimizer"):
            run(x, f, y, LOSS, lambda ps: None, 3)  # type: ignore[arg-type, return-value]
        with pytest.raises(TypeError, match=r"LBFGS\.step needs a closure"):
            run(x, f, y, LOSS, lambda ps: torch.optim.LBFGS(ps), 3)


def test_scalar_property_and_zero_steps(digits: tuple[Tensor, Tensor, Tensor]) -> None:
    model, _, f, y = setup(digits)
    held_out = properties.loss(model, digits[2], torch.zeros(50, dtype=torch.long), LOSS)
    predicted = ntcov.forecast(held_out, f, y, LOSS, sgd(0.1), 3)
    assert predicted.trajectory.shape == (4,)
    none = ntcov.forecast(held_out, f, y, LOSS, sgd(0.1), 0)
    assert none.trajectory.shape == (1,)
    assert_close(none.trajectory[0], held_out.value())


def test_forecast_error_and_horizon_on_hand_made_trajectories() -> None:
    actual = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [9.0, 12.0]])
    predicted = actual + torch.tensor([[0.0, 0.0], [0.0, 0.25], [0.0, 1.0], [0.0, 3.0]])
    error = ntcov.forecast_error(predicted, actual)
    torch.testing.assert_close(error, torch.tensor([0.0, 0.05, 0.1, 0.2]))
    assert ntcov.forecast_horizon(predicted, actual, threshold=0.1) == 3
    assert ntcov.forecast_horizon(predicted, actual, threshold=0.04) == 1
    assert ntcov.forecast_horizon(predicted, actual, threshold=0.5) is None
    wrong_start = ntcov.forecast_error(predicted + 1.0, actual)
    assert wrong_start[0] == float("inf")


def test_bad_inputs_are_refused(digits: tuple[Tensor, Tensor, Tensor]) -> None:
    _, x, f, y = setup(digits)
    with pytest.raises(ValueError, match="relinearize_every"):
        ntcov.forecast(x, f, y, LOSS, sgd(0.1), 3, relinearize_every=0)
    with pytest.raises(ValueError, match="steps"):
        ntcov.forecast(x, f, y, LOSS, sgd(0.1), -1)
    with pytest.raises(ValueError, match="must return a scalar"):
        ntcov.forecast(x, f, y, nn.CrossEntropyLoss(reduction="none"), sgd(0.1), 2)
    with pytest.raises(TypeError, match="optimizer_factory must be callable"):
        ntcov.forecast(x, f, y, LOSS, "sgd", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same module"):
        ntcov.forecast(properties.logits(digits_mlp(hidden=4), digits[2]), f, y, LOSS, sgd(0.1), 2)
    with pytest.raises(ValueError, match="same shape"):
        ntcov.forecast_error(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="threshold"):
        ntcov.forecast_horizon(torch.zeros(3), torch.zeros(3), threshold=0.0)


class _TwoHeads(nn.Module):
    """``forward`` uses ``head``; ``aux`` uses ``other``, which the training loss never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.other = nn.Linear(64, 16), nn.Linear(16, 10), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))

    def aux(self, x: Tensor) -> Tensor:
        return self.other(torch.tanh(self.body(x)))


def test_a_weight_the_loss_does_not_use_is_skipped_like_real_training(
    digits: tuple[Tensor, Tensor, Tensor],
) -> None:
    """AdamW's decoupled decay must not touch ``other``: real autograd leaves its grad unset."""
    x_train, y_train, x_test = digits
    torch.manual_seed(0)
    model = _TwoHeads().double()
    aux = ntcov.Property(model, lambda m: m.aux(x_test))
    outputs = properties.logits(model, x_train)

    def factory(ps: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5)

    actual = ntcov.actual_trajectory(aux, outputs, y_train, LOSS, factory, 5)
    twin = copy.deepcopy(model)
    optimizer = factory(twin.parameters())
    real = [twin.aux(x_test).detach()]
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        LOSS(twin(x_train), y_train).backward()
        optimizer.step()
        real.append(twin.aux(x_test).detach())
    assert twin.other.weight.grad is None
    assert_close(actual, torch.stack(real), rtol=1e-12)
    relinearised = ntcov.forecast(aux, outputs, y_train, LOSS, factory, 5, relinearize_every=1)
    assert_close(relinearised.trajectory, actual, rtol=1e-10)
