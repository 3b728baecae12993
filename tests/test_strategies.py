"""Every strategy against brute-force Jacobians, for every model of the zoo, in float64.

The expected values come from :func:`tests.zoo.plain_jacobian` (plain autograd on the model's own
parameters, no ntcov machinery); the package's own reference loop is checked against it too.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ntcov
from ntcov import FallbackWarning, Property, Strategy, properties
from ntcov import _autodiff as autodiff
from ntcov.params import select_params
from ntcov.reference import jacobian_loop, ntcov_loop
from tests.zoo import ZOO, Case, assert_close, plain_jacobian

STRATEGIES = [s.value for s in Strategy]


@dataclass(frozen=True)
class Setup:
    """A zoo model, three properties of it and the brute-force results of every operation."""

    case: Case
    logits: Property  # [N, C] on x
    probs: Property  # [M] on x2: probability of class 1
    loss: Property  # scalar cross-entropy on (x, y)
    expected: dict[str, Tensor]


@functools.cache
def setup(name: str) -> Setup:
    """Built once per model; tests using it must not change the model."""
    case = ZOO[name]()
    model, x, x2, y = case.model, case.x, case.x2, case.y
    j_logits = plain_jacobian(model, lambda m: m(x))
    j_probs = plain_jacobian(model, lambda m: torch.softmax(m(x2), -1)[:, 1])
    j_loss = plain_jacobian(model, lambda m: F.cross_entropy(m(x), y))
    n, c, m = x.shape[0], j_logits.shape[0] // x.shape[0], x2.shape[0]
    expected = {
        "vector_scalar": (j_logits @ j_loss.T).reshape(n, c),
        "vector_vector": (j_logits @ j_probs.T).reshape(n, c, m),
        "matrix": (j_logits @ j_logits.T).reshape(n, c, n, c),
        "ntvar": j_logits.pow(2).sum(1).reshape(n, c),
        "rate": -(j_logits @ j_loss.T).reshape(n, c),
        "scalar_scalar": (j_loss @ j_loss.T).reshape(()),
        "rate_of_the_loss": -j_loss.pow(2).sum().reshape(()),
    }
    return Setup(
        case,
        properties.logits(model, x),
        properties.probs(model, x2, 1),
        properties.loss(model, x, y),
        expected,
    )


OPERATIONS: dict[str, Callable[[Setup, str], Tensor]] = {
    "vector_scalar": lambda s, strategy: ntcov.ntcov(s.logits, s.loss, strategy=strategy),
    "vector_vector": lambda s, strategy: ntcov.ntcov(s.logits, s.probs, strategy=strategy),
    "matrix": lambda s, strategy: ntcov.ntcov(s.logits, s.logits, strategy=strategy),
    "ntvar": lambda s, strategy: ntcov.ntvar(s.logits, strategy=strategy),
    "rate": lambda s, strategy: ntcov.rate(s.logits, s.loss, strategy=strategy),
    "scalar_scalar": lambda s, strategy: ntcov.ntcov(s.loss, s.loss, strategy=strategy),
    "rate_of_the_loss": lambda s, strategy: ntcov.rate(s.loss, s.loss, strategy=strategy),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("name", list(ZOO))
def test_strategy_matches_brute_force(name: str, operation: str, strategy: str) -> None:
    s = setup(name)
    assert_close(OPERATIONS[operation](s, strategy), s.expected[operation])


@pytest.mark.parametrize("name", list(ZOO))
def test_reference_loop_matches_plain_autograd(name: str) -> None:
    s = setup(name)
    model, x = s.case.model, s.case.x
    assert_close(
        jacobian_loop(s.logits, select_params(model)), plain_jacobian(model, lambda m: m(x))
    )
    assert_close(ntcov_loop(s.logits, s.loss), s.expected["vector_scalar"])
    assert plain_jacobian(model, lambda m: m(x)).abs().sum() > 0


def test_strategies_accept_the_enum_and_its_string() -> None:
    s = setup("mlp")
    for strategy in Strategy:
        assert_close(ntcov.ntcov(s.logits, s.probs, strategy=strategy), s.expected["vector_vector"])


# ----- fallbacks ------------------------------------------------------------------------------


def test_transformer_jvp_falls_back_to_double_vjp_and_stays_exact() -> None:
    s = setup("transformer")
    with pytest.warns(FallbackWarning, match="forward-mode AD is not available"):
        got = ntcov.rate(s.logits, s.loss, strategy="jvp")
    assert_close(got, s.expected["rate"])


def test_gru_per_example_falls_back_to_vjp_rows_and_stays_exact() -> None:
    s = setup("gru")
    with pytest.warns(FallbackWarning, match="per-example vmap failed"):
        got = ntcov.ntvar(s.logits, strategy="per_example")
    assert_close(got, s.expected["ntvar"])


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "sdpa", "tied", "frozen"])
@pytest.mark.parametrize("strategy", ["jvp", "per_example", "vjp"])
def test_fast_paths_do_not_fall_back(name: str, strategy: str) -> None:
    s = setup(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntcov.ntcov(s.logits, s.probs, strategy=strategy)
        ntcov.rate(s.logits, s.loss, strategy=strategy)


def test_per_example_fallback_after_the_first_chunk_keeps_rows_in_order() -> None:
    """vmap failing on a later chunk must not repeat the rows already produced."""
    s = setup("mlp")
    calls = {"single": 0}

    def rows(module: nn.Module, xs: Tensor) -> Tensor:
        if xs.shape[0] == 1:  # one example: inside the per-example vmap
            calls["single"] += 1
            if calls["single"] > 1:
                raise RuntimeError("simulated: this chunk cannot be vmapped")
        return module(xs)

    prop = Property.from_per_example(s.case.model, rows, s.case.x)
    with pytest.warns(FallbackWarning, match="per-example vmap failed"):
        got = ntcov.ntvar(prop, strategy="per_example", memory_budget=1)
    assert calls["single"] == 2
    assert_close(got, s.expected["ntvar"])


def test_double_vjp_is_exact_through_ops_with_zero_derivative() -> None:
    s = setup("mlp")
    model, x = s.case.model, s.case.x
    prop = Property(model, lambda m: m(x) + torch.floor(m[0].weight).sum())
    expected = ntcov_loop(prop, s.loss)
    assert_close(ntcov.ntcov(prop, s.loss, strategy="double_vjp"), expected)
    assert_close(ntcov.ntcov(prop, s.loss, strategy="jvp"), expected)


def test_forward_mode_works_when_warnings_are_errors() -> None:
    """torch's first forward-mode call warns internally; ``-W error`` must not break ntcov."""
    code = (
        "import torch, ntcov\n"
        "m = torch.nn.Linear(3, 2).double()\n"
        "x = torch.randn(4, 3, dtype=torch.float64)\n"
        "p = ntcov.Property(m, lambda m: m(x))\n"
        "L = ntcov.Property(m, lambda m: m(x).pow(2).mean())\n"
        "r = ntcov.rate(p, L, strategy='jvp')\n"
        "ref = ntcov.rate(p, L, strategy='loop')\n"
        "assert torch.allclose(r, ref), (r, ref)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


# ----- frozen and tied weights ----------------------------------------------------------------


def test_frozen_parameters_are_excluded_by_default() -> None:
    s = setup("frozen")
    model = s.case.model
    assert "0.weight" not in select_params(model)
    assert list(select_params(model)) == [n for n, p in model.named_parameters() if p.requires_grad]
    with_frozen = ntcov.ntcov(s.logits, s.loss, params=list(dict(model.named_parameters())))
    default = ntcov.ntcov(s.logits, s.loss)
    assert_close(default, s.expected["vector_scalar"])
    assert not torch.allclose(with_frozen, default)


def test_tied_weight_appears_once_and_gets_both_uses() -> None:
    s = setup("tied")
    model = s.case.model
    assert "out.weight" not in select_params(model)
    # untie a copy: the tied gradient is the sum of the two uses' gradients
    untied = copy.deepcopy(model)
    untied.out.weight = nn.Parameter(model.emb.weight.detach().clone())
    j_tied = plain_jacobian(model, lambda m: m(s.case.x), ["emb.weight"])
    j_untied = plain_jacobian(untied, lambda m: m(s.case.x), ["emb.weight", "out.weight"])
    half = j_tied.shape[1]
    assert_close(j_tied, j_untied[:, :half] + j_untied[:, half:])


# ----- chunking and memory budget -------------------------------------------------------------


@pytest.fixture
def chunk_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of rows in every chunk produced by the VJP row source."""
    sizes: list[int] = []
    original = autodiff.vjp_rows

    def recording(prop: Property, params: dict[str, Tensor], chunk_size: int):  # type: ignore[no-untyped-def]
        for start, rows in original(prop, params, chunk_size):
            sizes.append(next(iter(rows.values())).shape[0])
            yield start, rows

    monkeypatch.setattr(autodiff, "vjp_rows", recording)
    return sizes


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "gru", "tied"])
@pytest.mark.parametrize("strategy", ["vjp", "per_example", "auto"])
def test_results_do_not_depend_on_memory_budget(name: str, strategy: str) -> None:
    s = setup(name)
    for operation, small_budget in [("vector_vector", 1), ("matrix", 1), ("matrix", 3000)]:
        a, b = (s.logits, s.probs) if operation == "vector_vector" else (s.logits, s.logits)
        chunked = ntcov.ntcov(a, b, strategy=strategy, memory_budget=small_budget)
        assert_close(chunked, ntcov.ntcov(a, b, strategy=strategy))
        assert_close(chunked, s.expected[operation])
    assert_close(ntcov.ntvar(s.logits, strategy=strategy, memory_budget=1), s.expected["ntvar"])


def test_tiny_memory_budget_really_chunks_one_row_at_a_time(chunk_sizes: list[int]) -> None:
    s = setup("mlp")
    ntcov.ntcov(s.logits, s.probs, strategy="vjp", memory_budget=1)
    assert chunk_sizes and set(chunk_sizes) == {1}
    chunk_sizes.clear()
    ntcov.ntcov(s.logits, s.probs, strategy="vjp")
    assert max(chunk_sizes) == s.logits.shape.numel()


# ----- batch statistics -----------------------------------------------------------------------


def _bn_model(track_running_stats: bool) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2, track_running_stats=track_running_stats),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("train", [True, False])
def test_batch_statistics_with_allow_train_mode_are_exact(strategy: str, train: bool) -> None:
    """Rows of BatchNorm with batch statistics mix examples: per-example must not be used."""
    model = _bn_model(track_running_stats=not train).train(train)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits = properties.logits(model, x, allow_train_mode=True)
    j = plain_jacobian(copy.deepcopy(model), lambda m: m(x))
    assert_close(ntcov.ntcov(logits, logits, strategy=strategy), (j @ j.T).reshape(4, 3, 4, 3))
    assert_close(ntcov.ntvar(logits, strategy=strategy), j.pow(2).sum(1).reshape(4, 3))
