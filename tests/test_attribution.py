"""ntcov.attribution: per-example, per-layer and per-group parts add up and match brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ntcov
from ntcov import _autodiff
from ntcov import properties as P
from ntcov.attribution import By, TrainingAttribution, attribute
from ntcov.params import select_params
from ntcov.reference import jacobian_loop, ntcov_loop
from tests.zoo import Case, assert_close, mlp

SUM_TOLERANCE = 1e-10


def _setup(case: Case) -> tuple[ntcov.Property, ntcov.Property, dict[str, torch.Tensor]]:
    x = P.probs(case.model, case.x2, 0)
    loss = P.per_example_loss(case.model, case.x, case.y)
    gen = torch.Generator().manual_seed(3)
    metric = {
        n: torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5
        for n, p in case.model.named_parameters()
        if p.requires_grad
    }
    return x, loss, metric


def _sum_error(parts: torch.Tensor, total: torch.Tensor) -> float:
    return float((parts.sum(-1) - total).abs().max() / total.abs().max().clamp_min(1e-300))


@pytest.mark.filterwarnings("ignore::ntcov.FallbackWarning")
def test_every_split_adds_up_to_rate_and_matches_brute_force(zoo_case: Case) -> None:
    x, loss, metric = _setup(zoo_case)
    n = zoo_case.x.shape[0]
    rate = ntcov.rate(x, loss.mean(), metric=metric)
    expected = -ntcov_loop(x, loss, metric=metric) / n  # [K, N]
    examples = attribute(x, loss, metric=metric)
    assert_close(examples.values, expected)
    assert _sum_error(examples.values, rate) < SUM_TOLERANCE
    layers = attribute(x, loss, by="layer", metric=metric)
    assert_close(layers.values, _layer_brute_force(x, loss, metric, layers.labels))
    assert _sum_error(layers.values, rate) < SUM_TOLERANCE
    groups = attribute(x, loss, by=By.GROUP, groups=[0, 1, 0, 2, 1], metric=metric)
    assert groups.labels == (0, 1, 2)
    by_hand = torch.stack([expected[:, [0, 2]].sum(1), expected[:, [1, 4]].sum(1), expected[:, 3]])
    assert_close(groups.values, by_hand.T)
    assert _sum_error(groups.values, rate) < SUM_TOLERANCE


def _layer_brute_force(
    x: ntcov.Property, loss: ntcov.Property, metric: dict, labels: tuple
) -> torch.Tensor:
    """``−J_x^(l) M^(l) ∇L^(l)`` per block from loop Jacobians, blocks by owning module."""
    weights = select_params(x.module)
    jac_x = jacobian_loop(x, weights)  # [K, P]
    grad_l = jacobian_loop(loss.mean(), weights)[0] * torch.cat(
        [metric[n].reshape(-1) for n in weights]
    )
    owners = [n.rpartition(".")[0] or "(root)" for n in weights for _ in range(weights[n].numel())]
    columns = []
    for label in labels:
        mask = torch.tensor([o == label for o in owners], dtype=jac_x.dtype)
        columns.append(-(jac_x * mask) @ grad_l)
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("strategy", ["jvp", "per_example", "vjp", "loop", "auto"])
def test_strategies_agree(strategy: str) -> None:
    case = mlp()
    x, loss, metric = _setup(case)
    reference = attribute(x, loss, metric=metric, strategy="loop").values
    assert_close(attribute(x, loss, metric=metric, strategy=strategy).values, reference)


@pytest.mark.parametrize("by", ["example", "layer", "group"])
def test_no_dependence_on_chunk_or_batch_size(by: str) -> None:
    case = mlp()
    x, loss, metric = _setup(case)
    groups = [1, 0, 1, 0, 2] if by == "group" else None
    base = attribute(x, loss, by=by, groups=groups, metric=metric).values
    for chunk, batch in [(1, None), (3, 2), (None, 1), (2, 3)]:
        other = attribute(
            x, loss, by=by, groups=groups, metric=metric, chunk_size=chunk, batch_size=batch
        )
        assert_close(other.values, base)


def test_frozen_parameters_are_not_attributed() -> None:
    from tests.zoo import frozen

    case = frozen()
    x, loss, _ = _setup(case)
    layers = attribute(x, loss, by="layer")
    assert layers.labels == ("2", "4")  # layer "0" is frozen
    assert _sum_error(layers.values, ntcov.rate(x, loss.mean())) < SUM_TOLERANCE
    with pytest.raises(ValueError, match="not differentiated"):
        attribute(x, loss, by="layer", groups={"first": "0"})


def test_custom_layer_groups_and_rest() -> None:
    case = mlp()
    x, loss, _ = _setup(case)
    parts = attribute(x, loss, by="layer", groups={"weights": ["0.weight", "2.weight"]})
    assert parts.labels == ("weights", "(rest)")
    assert_close(parts.total, ntcov.rate(x, loss.mean()))
    only_biases = ntcov.rate(x, loss.mean(), params=["0.bias", "2.bias"])
    assert_close(parts.values[..., 1], only_biases)
    with pytest.raises(ValueError, match="disjoint"):
        attribute(x, loss, by="layer", groups={"a": "0", "b": "0.weight"})


def test_weights_give_other_reductions() -> None:
    case = mlp()
    x, loss, _ = _setup(case)
    summed = attribute(x, loss, weights=torch.ones(5, dtype=torch.float64))
    assert _sum_error(summed.values, ntcov.rate(x, loss.sum())) < SUM_TOLERANCE


def test_group_mapping_with_rest_and_top_k() -> None:
    case = mlp()
    x, loss, _ = _setup(case)
    examples = attribute(x, loss)
    groups = attribute(x, loss, by="group", groups={"a": [0, 3], "b": torch.tensor([4])})
    assert groups.labels == ("a", "b", "(rest)")
    values = examples.values
    assert_close(groups.values[..., 2], values[..., [1, 2]].sum(-1))
    up, down = examples.helpful(2), examples.harmful(2)
    assert torch.equal(up.positions, values.argsort(-1, descending=True)[..., :2])
    assert torch.equal(down.positions, values.argsort(-1)[..., :2])
    assert up.labels == up.positions.tolist()  # labels of examples are their indices
    scalar = attribute(x[0], loss)
    assert scalar.helpful(1).labels == [int(scalar.values.argmax())]


def test_bad_input_is_refused_clearly() -> None:
    case = mlp()
    x, loss, _ = _setup(case)
    with pytest.raises(ValueError, match="unknown by"):
        attribute(x, loss, by="neuron")
    with pytest.raises(ValueError, match="groups is only used"):
        attribute(x, loss, groups=[0] * 5)
    with pytest.raises(ValueError, match="disjoint"):
        attribute(x, loss, by="group", groups={"a": [0, 1], "b": [1]})
    with pytest.raises(ValueError, match=r"\[5\]"):
        attribute(x, loss, by="group", groups=torch.zeros(4))
    with pytest.raises(ValueError, match="shape \\[5\\]"):
        attribute(x, loss, weights=torch.ones(3))
    with pytest.raises(ValueError, match="one loss per example"):
        attribute(x, P.loss(case.model, case.x, case.y))
    other = mlp(seed=1)
    with pytest.raises(ValueError, match="same module"):
        attribute(x, P.per_example_loss(other.model, other.x, other.y))
    with pytest.raises(ValueError, match="k must be"):
        attribute(x, loss).helpful(6)


def test_wrong_loss_shapes_and_metric_types_are_named() -> None:
    case = mlp()
    x, loss, metric = _setup(case)
    logits = P.logits(case.model, case.x)  # [N, C] given as the per-example loss
    for by in ("example", "layer", "group"):
        groups = [0, 1, 0, 1, 0] if by == "group" else None
        with pytest.raises(ValueError, match=r"one loss per example, shape \[5\], got \[5, 3\]"):
            attribute(x, logits, by=by, groups=groups)
    with pytest.raises(ValueError, match="one loss per example"):
        attribute(x, logits, strategy="per_example")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    step = ntcov.optimizer_step(opt, case.model, metric)
    with pytest.raises(TypeError, match=r"got OptimizerStep \(pass its .metric\)"):
        attribute(x, loss, metric=step)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metric must be a dict"):
        attribute(x, loss, metric=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metric must be a dict"):
        ntcov.sketch_ntcov(x, loss, dims=2, metric=0.1)  # type: ignore[arg-type]


def test_group_indices_masks_and_numpy_labels() -> None:
    import numpy as np

    case = mlp()
    x, loss, _ = _setup(case)
    values = attribute(x, loss).values
    mask = torch.tensor([True, False, True, True, False])
    groups = attribute(x, loss, by="group", groups={"m": mask, "n": np.array([1])})
    assert groups.labels == ("m", "n", "(rest)")
    assert_close(groups.values[..., 0], values[..., [0, 2, 3]].sum(-1))
    assert_close(groups.values[..., 2], values[..., 4])
    labels = np.array([2, 0, 2, 1, 0])
    assert_close(
        attribute(x, loss, by="group", groups=labels).values,
        attribute(x, loss, by="group", groups=labels.tolist()).values,
    )
    with pytest.raises(TypeError, match="non-integer example indices"):
        attribute(x, loss, by="group", groups={"a": [0.9, 2.7]})
    with pytest.raises(ValueError, match="more than once"):
        attribute(x, loss, by="group", groups={"a": [0, 0, 1]})
    with pytest.raises(ValueError, match="boolean mask of shape \\[2\\]"):
        attribute(x, loss, by="group", groups={"a": [True, False]})


def test_groups_more_than_properties_and_fewer_agree_with_the_examples() -> None:
    """``K ≤ G`` sums the per-example parts; ``K > G`` takes group gradients, a chunk of groups
    at a time under ``memory_budget`` (here one group per chunk)."""
    case = mlp()
    x, loss, metric = _setup(case)
    values = attribute(x, loss, metric=metric).values  # [K, N]
    assert values.shape[0] > 2
    membership = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 1, 1]], dtype=values.dtype)
    few = attribute(x, loss, by="group", groups=[0, 1, 0, 1, 1], metric=metric, memory_budget=1)
    assert_close(few.values, values @ membership.T)
    many = attribute(x[0], loss, by="group", groups=[0, 1, 2, 3, 4], metric=metric)
    assert_close(many.values, values[0])


def test_an_empty_property_gives_empty_parts() -> None:
    case = mlp()
    _, loss, _ = _setup(case)
    empty = P.probs(case.model, case.x2[:0], 0)
    assert attribute(empty, loss).values.shape == (0, 5)
    assert attribute(empty, loss, by="group", groups=[0, 1, 0, 1, 1]).values.shape == (0, 2)
    assert ntcov.sketch_ntcov(empty, loss, dims=3).matrix.shape == (0, 5)
    assert ntcov.sketch_ntcov(empty, dims=3).matrix.shape == (0, 0)


class _Centred(nn.Module):
    """Eval mode, but every row depends on the batch (its mean is subtracted)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))


def test_batch_size_falls_back_to_one_batch_when_rows_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    model = _Centred().double().eval()
    xs = torch.randn(8, 4, dtype=torch.float64)
    ys = torch.randint(0, 3, (8,))
    p = P.probs(model, xs[:1], ys[:1])[0]
    loss = P.per_example_loss(model, xs, ys)
    whole = attribute(p, loss)
    assert _sum_error(whole.values, ntcov.rate(p, P.loss(model, xs, ys))) < SUM_TOLERANCE
    for by, groups in (("example", None), ("layer", None), ("group", [0, 1] * 4)):
        with pytest.warns(ntcov.FallbackWarning, match="batch_size is ignored"):
            parts = attribute(p, loss, by=by, groups=groups, batch_size=3)
        assert_close(parts.values, attribute(p, loss, by=by, groups=groups).values)


# ----- over a training run -------------------------------------------------------------------


def _actual_first_order(x: ntcov.Property, before: dict, after: dict) -> torch.Tensor:
    """``J_x(w_after − w_before)`` at ``w_before``: what the step did, to first order."""
    delta = {n: after[n] - before[n] for n in before}
    return _autodiff.directional(x, before, delta, force_reverse=False)[1]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
    ],
    ids=["sgd_momentum_decay", "adamw"],
)
def test_training_attribution_is_the_real_first_order_step(make_optimizer) -> None:
    case = mlp()
    model = case.model
    x_train = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y_train = torch.arange(12) % 3
    x = P.probs(model, case.x2, 0)
    optimizer = make_optimizer(model.parameters())
    tracker = TrainingAttribution(x, optimizer, num_examples=12)
    batches = [torch.arange(0, 6), torch.arange(6, 12), torch.tensor([1, 7, 7, 3])]
    per_step = torch.zeros(*x.shape, 12, dtype=torch.float64)
    first_orders = []
    for _ in range(2):
        for index in batches:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            step = tracker.record(P.per_example_loss(model, x_train[index], y_train[index]), index)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
            optimizer.step()
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            actual = _actual_first_order(x, before, after)
            assert_close(step.first_order, actual, rtol=1e-9)
            assert_close(step.layers.sum(-1), step.first_order, rtol=1e-9)
            assert_close(step.contributions.sum(-1), step.force)
            per_step.index_add_(-1, index, step.contributions)
            first_orders.append(step.first_order)
    assert tracker.steps == 6
    assert_close(tracker.contributions, per_step)
    assert_close(tracker.predicted_change, torch.stack(first_orders).sum(0))
    assert tracker.bias.abs().max() > 0  # momentum / weight decay are reported separately
    assert_close(tracker.layer_result().total, tracker.predicted_change, rtol=1e-9)
    actual_change = x.value() - tracker.start_value
    assert tracker.unexplained().abs().max() < 0.1 * actual_change.abs().max()


def test_training_attribution_refuses_an_unmodelled_optimizer_at_construction() -> None:
    case = mlp()
    x = P.probs(case.model, case.x2, 0)
    nadam = torch.optim.NAdam(case.model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match=r"TrainingAttribution: .*NAdam"):
        TrainingAttribution(x, nadam, num_examples=12)
    with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
        TrainingAttribution(x, torch.optim.SGD(case.model.parameters(), lr=0.1), num_examples=0)
    sgd = torch.optim.SGD(case.model.parameters(), lr=0.1)
    assert TrainingAttribution(x, sgd, num_examples=np.int64(12)).num_examples == 12


def test_training_attribution_full_batch_equals_attribute_with_the_optimizer_metric() -> None:
    case = mlp()
    model = case.model
    x, loss, _ = _setup(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = TrainingAttribution(x, optimizer, num_examples=5, layers=False)
    step = tracker.record(loss)
    metric = {n: torch.full_like(p, 0.3) for n, p in model.named_parameters()}
    assert_close(step.contributions, attribute(x, loss, metric=metric).values)
    assert_close(step.force, ntcov.rate(x, loss.mean(), metric=metric))
    assert not step.bias.any()
    with pytest.raises(ValueError, match="indices"):
        tracker.record(P.per_example_loss(model, case.x[:3], case.y[:3]))
    with pytest.raises(ValueError, match="no layer split"):
        tracker.layer_result()
