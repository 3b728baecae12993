"""Inputs that tried to break the library: wrong numbers, crashes, bad errors and friction.

Each test names the finding it guards against (A = wrong numbers, B = crashes or bad errors,
C = friction). Expected values come from plain autograd (:func:`tests.zoo.plain_jacobian`).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ntcov
from ntcov import FallbackWarning, Property, Strategy, properties
from ntcov import _autodiff as autodiff
from tests.zoo import ZOO, Case, assert_close, plain_jacobian

STRATEGIES = [s.value for s in Strategy]
DIFFER = "differ from its batch evaluation"
NOT_DEPENDENT = "does not depend on the selected parameters"
REPO = Path(__file__).resolve().parents[1]


def _random(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def mlp() -> Case:
    return ZOO["mlp"]()


def _kernel(model: nn.Module, fn: Callable[[nn.Module], Tensor], shape: tuple[int, ...]) -> Tensor:
    """``J Jᵀ`` of ``fn(model)`` by plain autograd, shaped ``shape + shape``."""
    j = plain_jacobian(model, fn)
    return (j @ j.T).reshape(shape + shape)


def _ntvar(model: nn.Module, fn: Callable[[nn.Module], Tensor], shape: tuple[int, ...]) -> Tensor:
    return plain_jacobian(model, fn).pow(2).sum(1).reshape(shape)


# ----- A1: per-example rows are checked against the batch -------------------------------------


class Centred(nn.Module):
    """Subtracts the batch mean: every row depends on every example."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x).tanh()
        return h - h.mean(0)


class HandNorm(nn.Module):
    """A hand-written batch norm (no nn.BatchNorm, so the mode check cannot see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        return (h - h.mean(0)) / (h.std(0) + 1e-3)


class SequenceFirstRNN(nn.Module):
    """A recurrent net on ``[T, N, D]`` inputs: the examples are on dim 1, not dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], 4)
        for step in x:
            h = torch.tanh(self.inp(step) + self.hidden(h))
        return self.out(h)


MIXING: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "centred": lambda: (Centred().double().eval(), _random(10, 3)),
    "hand_norm": lambda: (HandNorm().double().eval(), _random(10, 3)),
    "rnn_T5_N9": lambda: (SequenceFirstRNN().double().eval(), _random(5, 9, 3)),
    "rnn_T9_N9": lambda: (SequenceFirstRNN().double().eval(), _random(9, 9, 3)),
}


@pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom")  # one example's std
@pytest.mark.parametrize("strategy", ["auto", "per_example"])
@pytest.mark.parametrize("name", list(MIXING))
def test_rows_that_mix_examples_fall_back_and_stay_exact(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    model, x = MIXING[name]()
    logits = properties.logits(model, x)
    shape = tuple(model(x).shape)
    assert shape[0] * shape[1] > 16  # auto picks the per-example path
    with pytest.warns(FallbackWarning, match=DIFFER):
        got = ntcov.ntcov(logits, logits, strategy=strategy)
    assert_close(got, _kernel(model, lambda m: m(x), shape))
    with pytest.warns(FallbackWarning, match=DIFFER):
        got = ntcov.ntvar(logits, strategy=strategy)
    assert_close(got, _ntvar(model, lambda m: m(x), shape))


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's own broadcasting warning
def test_broadcasting_loss_falls_back_and_stays_exact() -> None:
    """MSELoss on ``[N, 1]`` outputs and ``[N]`` targets broadcasts to ``[N, N]``."""
    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 1).double().eval(), _random(20, 4), _random(20, seed=1)
    losses = properties.per_example_loss(model, x, y, nn.MSELoss())
    with pytest.warns(FallbackWarning, match=DIFFER):
        got = ntcov.ntvar(losses)
    fn = lambda m: F.mse_loss(m(x), y, reduction="none").mean(1)  # noqa: E731
    assert_close(got, _ntvar(model, fn, (20,)))


def test_rows_that_disagree_after_the_first_chunk_raise(mlp: Case) -> None:
    def rows(module: nn.Module, xs: Tensor) -> Tensor:
        out = module(xs)
        if xs.shape[0] == 1:  # one example at a time: rows are what they seem
            return out
        mixed = out[3:].sum(0, keepdim=True).expand(xs.shape[0] - 3, -1)
        return out + torch.cat([torch.zeros_like(out[:3]), mixed])  # rows 3.. mix examples

    prop = Property.from_per_example(mlp.model, rows, mlp.x, name="sneaky")
    with pytest.raises(ValueError, match=r"'sneaky' for examples 3\.\.3 differ from its batch"):
        ntcov.ntvar(prop, strategy="per_example", memory_budget=1)


def test_per_example_check_has_no_false_alarm_in_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    x = torch.randn(40, 6)
    logits = properties.logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = ntcov.ntcov(logits, logits, strategy="per_example")
        chunked = ntcov.ntvar(logits, strategy="per_example", memory_budget=60_000)  # 10 chunks
    torch.testing.assert_close(fast, ntcov.ntcov(logits, logits, strategy="vjp"))
    torch.testing.assert_close(chunked, ntcov.ntvar(logits, strategy="vjp"))


# ----- A2: dependence is decided from the gradients --------------------------------------------


def _entry_points(prop: Property, loss: Property, strategy: str, **kwargs: object) -> list:
    return [
        lambda: ntcov.rate(prop, loss, strategy=strategy, **kwargs),
        lambda: ntcov.ntcov(prop, loss, strategy=strategy, **kwargs),
        lambda: ntcov.ntcov(loss, prop, strategy=strategy, **kwargs),
        lambda: ntcov.ntvar(prop, strategy=strategy, **kwargs),
    ]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_property_of_weights_that_are_not_selected(mlp: Case, strategy: str) -> None:
    # its graph reaches weights (layer 0, held fixed), just not the selected ones (layer 2)
    first_layer = Property(mlp.model, lambda m: m[0](mlp.x), name="first_layer")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _entry_points(first_layer, loss, strategy, params="2"):
        with pytest.raises(ValueError, match=f"'first_layer' {NOT_DEPENDENT}"):
            call()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_property_of_a_copy_of_the_model(mlp: Case, strategy: str) -> None:
    other = copy.deepcopy(mlp.model)
    copied = Property(mlp.model, lambda m: other(mlp.x), name="copied")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _entry_points(copied, loss, strategy):
        with pytest.raises(ValueError, match=f"'copied' {NOT_DEPENDENT}"):
            call()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_property_of_an_input_that_requires_grad(mlp: Case, strategy: str) -> None:
    x = mlp.x.clone().requires_grad_(True)
    of_input = Property(mlp.model, lambda m: (x**2).sum(1), name="of_input")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _entry_points(of_input, loss, strategy):
        with pytest.raises(ValueError, match=f"'of_input' {NOT_DEPENDENT}"):
            call()
    with pytest.raises(ValueError, match=rf"'sum\(of_input\)' {NOT_DEPENDENT}"):
        ntcov.rate(loss, of_input.sum(), strategy=strategy)  # as the loss


def test_per_example_property_of_a_copy_is_refused(mlp: Case) -> None:
    other = copy.deepcopy(mlp.model)
    copied = Property.from_per_example(mlp.model, lambda m, xs: other(xs), mlp.x, name="copied")
    with pytest.raises(ValueError, match=f"'copied' {NOT_DEPENDENT}"):
        ntcov.ntvar(copied, strategy="per_example")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zero_derivative_is_not_independence(mlp: Case, strategy: str) -> None:
    """``floor`` uses the weights with derivative zero: zeros are the right answer."""
    floored = Property(mlp.model, lambda m: torch.floor(m[0].weight).sum() * torch.ones(3))
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    assert ntcov.rate(floored, loss, strategy=strategy).abs().max() == 0
    assert ntcov.ntvar(floored, strategy=strategy).abs().max() == 0


def test_default_rate_is_one_backward_and_one_forward_mode_pass(
    mlp: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dependence checks must not cost ``rate`` an extra pass."""
    x, loss = properties.probs(mlp.model, mlp.x, mlp.y), properties.loss(mlp.model, mlp.x, mlp.y)
    forwards, backwards = [], []
    handle = mlp.model.register_forward_hook(lambda *args: forwards.append(1))
    original = torch.autograd.grad

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        backwards.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    try:
        ntcov.rate(x, loss)
    finally:
        handle.remove()
    assert (len(forwards), len(backwards)) == (2, 1)


# ----- B1, B2: grad modes ----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_works_inside_no_grad(mlp: Case, strategy: str) -> None:
    logits, loss = properties.logits(mlp.model, mlp.x), properties.loss(mlp.model, mlp.x, mlp.y)
    expected = [
        ntcov.rate(logits, loss, strategy=strategy),
        ntcov.ntcov(logits, loss, strategy=strategy),
        ntcov.ntvar(logits, strategy=strategy),
    ]
    with torch.no_grad():
        got = [
            ntcov.rate(logits, loss, strategy=strategy),
            ntcov.ntcov(logits, loss, strategy=strategy),
            ntcov.ntvar(logits, strategy=strategy),
        ]
        assert not torch.is_grad_enabled()
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


def test_inference_mode_is_refused_clearly(mlp: Case) -> None:
    logits, loss = properties.logits(mlp.model, mlp.x), properties.loss(mlp.model, mlp.x, mlp.y)
    with torch.inference_mode():
        for name, call in [
            ("rate", lambda: ntcov.rate(logits, loss)),
            ("ntcov", lambda: ntcov.ntcov(logits, loss)),
            ("ntvar", lambda: ntcov.ntvar(logits)),
        ]:
            with pytest.raises(RuntimeError, match=f"{name}: torch.inference_mode.*no_grad"):
                call()


# ----- B3: empty properties --------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_properties_give_empty_results(mlp: Case, strategy: str) -> None:
    model, x, y = mlp.model, mlp.x, mlp.y
    logits, loss = properties.logits(model, x), properties.loss(model, x, y)
    probs = properties.probs(model, x, y)
    assert ntcov.rate(logits[:0], loss, strategy=strategy).shape == (0, 3)
    assert ntcov.ntcov(logits[:0], logits, strategy=strategy).shape == (0, 3, 5, 3)
    assert ntcov.ntcov(logits, probs[:0], strategy=strategy).shape == (5, 3, 0)
    assert ntcov.ntvar(probs[:0], strategy=strategy).shape == (0,)
    assert ntcov.ntvar(properties.probs(model, x[:0], y[:0]), strategy=strategy).shape == (0,)
    no_columns = Property(model, lambda m: m(x)[:, :0])
    assert ntcov.ntvar(no_columns, strategy=strategy).shape == (5, 0)
    assert ntcov.ntvar(no_columns, strategy=strategy).dtype == torch.float64


# ----- B4: outputs that are not tensors --------------------------------------------------------


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.layer(x)
        return h, {"out": h.tanh()}


def test_model_returning_a_tuple_is_explained(mlp: Case) -> None:
    model = TupleModel().double().eval()
    logits = properties.logits(model, mlp.x)
    hint = r"'logits' returned a tuple, expected a Tensor.*lambda m: m\(x\)\[0\]"
    for call in [
        lambda: logits.value(),
        lambda: logits.shape,
        lambda: ntcov.ntcov(logits, logits),
        lambda: ntcov.ntvar(logits),
        lambda: ntcov.rate(logits, Property(model, lambda m: m(mlp.x)[0].sum())),
    ]:
        with pytest.raises(TypeError, match=hint):
            call()
    indexed = Property(model, lambda m: m(mlp.x)[1]["out"])
    assert ntcov.ntvar(indexed).shape == (5, 3)


def test_property_returning_a_number_is_explained(mlp: Case) -> None:
    number = Property(mlp.model, lambda m: float(m(mlp.x).sum()), name="number")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in [number.value, lambda: ntcov.rate(number, loss), lambda: ntcov.ntvar(number)]:
        with pytest.raises(TypeError, match="'number' returned a float, expected a Tensor"):
            call()


# ----- B6, B7: the user's module is not written to ---------------------------------------------


class Counter(nn.Module):
    """Counts its forward passes in a buffer, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.layer(x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_buffers_updated_in_place_stay_untouched(mlp: Case, strategy: str) -> None:
    model = Counter().double().eval()
    logits, loss = properties.logits(model, mlp.x), properties.loss(model, mlp.x, mlp.y)
    ntcov.rate(logits, loss, strategy=strategy)
    ntcov.ntcov(logits, logits, strategy=strategy)
    ntcov.ntvar(logits, strategy=strategy)
    logits.value()
    assert model.calls.item() == 0


class RenormEmbedding(nn.Module):
    """``nn.Embedding(max_norm=1)`` renormalises the rows it looks up, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, max_norm=1.0)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of embedding_renorm_
@pytest.mark.parametrize("params", [None, "head"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_written_in_place_by_the_forward_stay_untouched(
    strategy: str, params: str | None
) -> None:
    torch.manual_seed(0)
    model = RenormEmbedding().double().eval()
    with torch.no_grad():
        model.embed.weight.mul_(3.0)  # rows well above max_norm
    before = model.embed.weight.detach().clone()
    tokens = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
    logits, loss = properties.logits(model, tokens), properties.loss(model, tokens, y)
    ntcov.rate(logits, loss, strategy=strategy, params=params)
    ntcov.ntvar(logits, strategy=strategy, params=params)
    logits.value()
    assert torch.equal(model.embed.weight, before)


# ----- B9, B10: arguments ----------------------------------------------------------------------


def test_memory_budget_accepts_integral_floats_only(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    expected = ntcov.ntvar(logits, strategy="vjp")
    assert_close(ntcov.ntvar(logits, strategy="vjp", memory_budget=1e9), expected)
    assert_close(ntcov.ntcov(logits, logits, memory_budget=3e3), ntcov.ntcov(logits, logits))
    for bad in [1.5, "1GB", True, None, float("inf")]:
        with pytest.raises(TypeError, match="ntvar: memory_budget must be a whole number"):
            ntcov.ntvar(logits, memory_budget=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ntcov: memory_budget must be a positive number"):
        ntcov.ntcov(logits, logits, memory_budget=-1.0)  # type: ignore[arg-type]


def test_property_is_not_iterable(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    with pytest.raises(TypeError, match=r"a Property is not iterable; index it with prop\[i\]"):
        list(logits)
    with pytest.raises(TypeError, match="not iterable"):
        _first, *_rest = logits


# ----- B12: inputs and targets of the ready-made properties ------------------------------------


def test_numpy_inputs_are_refused_with_a_hint(mlp: Case) -> None:
    for make in [
        lambda x: properties.logits(mlp.model, x),
        lambda x: properties.probs(mlp.model, x, 0),
        lambda x: properties.loss(mlp.model, x, mlp.y),
        lambda x: properties.per_example_loss(mlp.model, x, mlp.y),
    ]:
        with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got ndarray"):
            make(mlp.x.numpy())
    with pytest.raises(ValueError, match="examples on dim 0"):
        properties.probs(mlp.model, torch.tensor(1.0), 0)


def test_targets_shaped_n_by_one_are_refused(mlp: Case) -> None:
    with pytest.raises(ValueError, match=r"probs: target must be one class index.*\[5, 1\]"):
        properties.probs(mlp.model, mlp.x, mlp.y[:, None])
    with pytest.raises(ValueError, match=r"log_probs: target must be one class index"):
        properties.log_probs(mlp.model, mlp.x, mlp.y[:, None])


def test_numpy_targets_are_accepted(mlp: Case) -> None:
    expected = properties.probs(mlp.model, mlp.x, mlp.y).value()
    assert_close(properties.probs(mlp.model, mlp.x, mlp.y.numpy()).value(), expected)
    assert_close(
        properties.probs(mlp.model, mlp.x, mlp.y.numpy().astype(np.int32)).value(), expected
    )
    one = properties.probs(mlp.model, mlp.x, np.int64(2)).value()
    assert_close(one, properties.probs(mlp.model, mlp.x, 2).value())
    loss = properties.loss(mlp.model, mlp.x, mlp.y.numpy()).value()
    assert_close(loss, properties.loss(mlp.model, mlp.x, mlp.y).value())
    losses = properties.per_example_loss(mlp.model, mlp.x, mlp.y.numpy()).value()
    assert_close(losses, properties.per_example_loss(mlp.model, mlp.x, mlp.y).value())
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        properties.probs(mlp.model, mlp.x, mlp.y.numpy().astype(np.float64))


# ----- A3: how per-example losses add up to the loss -------------------------------------------

_WEIGHT = torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)


@pytest.mark.parametrize(
    ("loss_fn", "normaliser"),
    [
        (nn.CrossEntropyLoss(reduction="sum"), lambda y: torch.tensor(1.0)),
        (nn.CrossEntropyLoss(weight=_WEIGHT), lambda y: _WEIGHT[y].sum()),
        (nn.CrossEntropyLoss(ignore_index=1), lambda y: (y != 1).sum()),
    ],
    ids=["sum", "weight", "ignore_index"],
)
def test_per_example_losses_add_up_as_documented(
    mlp: Case, loss_fn: nn.Module, normaliser: Callable[[Tensor], Tensor]
) -> None:
    """``loss = Σ_i ℓ_i / Σ_i w_i``, not ``mean_i ℓ_i``, for these losses."""
    x = properties.probs(mlp.model, mlp.x2, 0)
    loss = properties.loss(mlp.model, mlp.x, mlp.y, loss_fn)
    losses = properties.per_example_loss(mlp.model, mlp.x, mlp.y, loss_fn)
    total = normaliser(mlp.y).double()
    assert_close(losses.value().sum() / total, loss.value())
    assert_close(ntcov.rate(x, loss), -ntcov.ntcov(x, losses).sum(-1) / total)
    assert not torch.allclose(losses.value().mean(), loss.value())


# ----- C1: one warning per cause ---------------------------------------------------------------


def test_one_fallback_warning_per_ntcov_call() -> None:
    case = ZOO["transformer"]()
    logits = properties.logits(case.model, case.x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ntcov.ntcov(logits, logits[:4], strategy="jvp")  # 4 JVP columns, none in forward mode
        ntcov.ntcov(logits, logits[:4], strategy="jvp")
    messages = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(messages) == 2 and "forward-mode AD is not available" in messages[0]
    assert all(w.filename == __file__ for w in caught)  # points at the user's line


def test_one_per_example_warning_per_call_under_a_tiny_budget() -> None:
    case = ZOO["gru"]()
    logits = properties.logits(case.model, case.x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ntcov.ntcov(logits, logits, strategy="per_example", memory_budget=1)
    kinds = [str(w.message).split(" failed")[0] for w in caught]
    assert sorted(kinds) == ["per-example vmap"]


def test_forward_mode_import_is_done_once() -> None:
    autodiff._load_forward_ad()
    assert autodiff._load_forward_ad.cache_info().hits >= 1  # type: ignore[attr-defined]


# ----- C2, C3, C5: README and strategy names ---------------------------------------------------


def test_strategy_names_are_case_insensitive(mlp: Case) -> None:
    assert Strategy("AUTO") is Strategy.AUTO and Strategy("Per_Example") is Strategy.PER_EXAMPLE
    logits = properties.logits(mlp.model, mlp.x)
    assert_close(ntcov.ntvar(logits, strategy="VJP"), ntcov.ntvar(logits, strategy="vjp"))
    with pytest.raises(ValueError, match="unknown strategy 'FAST'"):
        ntcov.ntvar(logits, strategy="FAST")


def test_readme_links_stay_inside_the_repository() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)", text):
        if "://" in target:
            continue
        path = (REPO / target).resolve()
        assert path.is_relative_to(REPO) and path.exists(), target


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the monitor example writes runs/ntcov
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    for code in blocks:  # later blocks build on the names of earlier ones
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["kernel"].shape == (20, 10, 20)  # type: ignore[attr-defined]
    assert namespace["low"].shape == (20,)  # type: ignore[attr-defined]
    assert (tmp_path / "runs" / "ntcov" / "steps.jsonl").read_text().count("\n") == 10
    assert namespace["parts"].values.shape == (500,)  # type: ignore[attr-defined]
    for word in [".value()", "map_rows", "from_per_example", "dim 0"]:
        assert word in text, word


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.head(x)}


def test_builders_name_a_model_that_returns_a_dict() -> None:
    model, x = _DictOutput(), torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    builders = {
        "probs": lambda: properties.probs(model, x, 0),
        "log_probs": lambda: properties.log_probs(model, x, y),
        "per_example_loss": lambda: properties.per_example_loss(model, x, y),
        "loss": lambda: properties.loss(model, x, y),
    }
    for name, build in builders.items():
        with pytest.raises(TypeError, match=rf"^{name}: _DictOutput\(x\) returned a dict"):
            ntcov.ntvar(build())
    # the way the message suggests works
    rows = Property.from_per_example(model, lambda m, xs: m(xs)["logits"], x)
    jac = plain_jacobian(model, lambda m: m(x)["logits"])
    assert_close(ntcov.ntvar(rows).reshape(-1), (jac * jac).sum(1))
