"""Numbers, devices, dtypes and memory: never a silent nan, a crash deep in torch, or an
out-of-memory error — a clear error naming the property, parameter or size, and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import ntcov
from ntcov import Property, properties
from ntcov import _autodiff as autodiff
from ntcov import _safeguards as safeguards
from ntcov.params import select_params
from tests.zoo import ZOO, Case, assert_close, plain_jacobian

STRATEGIES = [s.value for s in ntcov.Strategy]


@pytest.fixture
def mlp() -> Case:
    return ZOO["mlp"]()


def _entry_points(prop: Property, loss: Property, strategy: str) -> list:
    return [
        lambda: ntcov.ntcov(prop, loss, strategy=strategy),
        lambda: ntcov.ntcov(prop, prop, strategy=strategy),
        lambda: ntcov.ntvar(prop, strategy=strategy),
        lambda: ntcov.rate(prop, loss, strategy=strategy),
    ]


# ----- 8. nan and inf --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_property_values_are_refused_naming_the_property(
    mlp: Case, strategy: str
) -> None:
    """``log`` of a probability that underflows to 0: before the fix, a result full of nan."""
    tiny = Property(mlp.model, lambda m: torch.log(torch.sigmoid(m(mlp.x) - 1e4)), name="log_p")
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _entry_points(tiny, loss, strategy):
        with pytest.raises(ValueError, match=r"property 'log_p' has non-finite values \(15 of 15"):
            call()
    with pytest.raises(ValueError, match=r"rate: property 'sum\(log_p\)' has non-finite"):
        ntcov.rate(loss, tiny.sum(), strategy=strategy)  # as the loss


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_gradients_are_refused_naming_the_property(mlp: Case, strategy: str) -> None:
    """``sqrt`` at 0 has a finite value and an infinite derivative."""
    weight = mlp.model[2].weight
    at_zero = Property(mlp.model, lambda m: (m[2].weight - weight.detach()).abs().sqrt().sum(1))
    at_zero.name = "root"
    loss = properties.loss(mlp.model, mlp.x, mlp.y)
    assert torch.isfinite(at_zero.value()).all()
    for call in _entry_points(at_zero, loss, strategy):
        with pytest.raises(ValueError, match=r"the gradient of property 'root'.* is not finite"):
            call()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_diverged_weights_are_named(mlp: Case, strategy: str) -> None:
    with torch.no_grad():
        mlp.model[2].weight[0, 0] = float("inf")
    logits, loss = properties.logits(mlp.model, mlp.x), properties.loss(mlp.model, mlp.x, mlp.y)
    for call in _entry_points(logits, loss, strategy):
        with pytest.raises(ValueError, match=r"parameter '2\.weight' has 1 non-finite entries"):
            call()


def test_finite_results_pass_unchanged(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x)
    j = plain_jacobian(mlp.model, lambda m: m(mlp.x))
    assert_close(ntcov.ntvar(logits), j.pow(2).sum(1).reshape(5, 3))


# ----- 8. complex numbers ----------------------------------------------------------------------


class ComplexLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(torch.complex128) @ self.weight).abs()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_complex_parameters_are_refused(mlp: Case, strategy: str) -> None:
    """Before the fix, jvp gave real numbers and vjp complex ones: both wrong for ntcov."""
    model = ComplexLinear()
    logits = properties.logits(model, mlp.x)
    for call in _entry_points(logits, logits.sum(), strategy):
        with pytest.raises(TypeError, match=r"parameter 'weight' of ComplexLinear is complex"):
            call()


def test_complex_outputs_are_refused(mlp: Case) -> None:
    prop = Property(mlp.model, lambda m: m(mlp.x).to(torch.complex128), name="phase")
    with pytest.raises(
        TypeError, match=r"'phase' returned a torch\.complex128.*needs a real output"
    ):
        ntcov.ntvar(prop)


# ----- 9. devices and dtypes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_dtype", "input_dtype"), [("float32", "float64"), ("float64", "float32")]
)
@pytest.mark.parametrize("strategy", ["auto", "jvp", "per_example", "vjp"])
def test_dtype_mismatch_names_the_property_and_the_dtypes(
    model_dtype: str, input_dtype: str, strategy: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(
        getattr(torch, model_dtype)
    )
    x = torch.randn(5, 4, dtype=getattr(torch, input_dtype))
    logits = properties.logits(model, x)
    pattern = rf"property 'logits': a dtype mismatch .* Sequential are torch\.{model_dtype} on cpu"
    with pytest.raises(TypeError, match=pattern):
        logits.value()
    with pytest.raises(TypeError, match=pattern):
        ntcov.ntvar(logits, strategy=strategy)
    conv = nn.Conv1d(1, 2, 3).to(getattr(torch, model_dtype))
    with pytest.raises(TypeError, match="a dtype mismatch"):
        properties.logits(conv, torch.randn(5, 1, 6, dtype=getattr(torch, input_dtype))).value()


def test_inputs_on_another_device_are_named(mlp: Case) -> None:
    logits = properties.logits(mlp.model, mlp.x.to("meta"))
    with pytest.raises(ValueError, match=r"property 'logits': a device mismatch.*model's device"):
        ntcov.ntvar(logits)


def test_model_on_the_meta_device_is_refused(mlp: Case) -> None:
    model = mlp.model.to("meta")
    logits = properties.logits(model, mlp.x.to("meta"))
    with pytest.raises(ValueError, match=r"parameter '0\.weight' of Sequential is on the meta"):
        ntcov.ntvar(logits)


def test_parameters_on_several_devices_are_refused(mlp: Case) -> None:
    mlp.model[2].to("meta")  # a model split across two devices
    with pytest.raises(ValueError, match=r"on several devices \(cpu: 0\.weight, 0\.bias; meta: "):
        select_params(mlp.model, ["0", "2"])
    assert list(select_params(mlp.model, "0")) == ["0.weight", "0.bias"]  # one device is fine


# ----- 7. memory -------------------------------------------------------------------------------


def test_a_result_too_large_for_memory_is_refused_up_front() -> None:
    """1e6 outputs: the 1e6 × 1e6 kernel (4 TB) cannot be held; nothing is computed first."""
    model = nn.Linear(1, 1_000_000)
    wide = properties.logits(model, torch.ones(1, 1))
    with pytest.raises(
        ValueError,
        match=r"ntcov: the result has shape \[1, 1000000, 1, 1000000\]"
        r" \(3\.64 TiB of torch\.float32\).*in blocks.*ntvar",
    ):
        ntcov.ntcov(wide, wide)
    assert ntcov.ntvar(wide[:, :3]).shape == (1, 3)


def test_memory_checks_are_made_before_any_backward_pass(
    mlp: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safeguards, "available_bytes", lambda device: 1_000)
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    logits = properties.logits(mlp.model, mlp.x)
    with pytest.raises(
        ValueError,
        match=r"the result has shape \[5, 3, 5, 3\] \(1\.76 KiB.*"
        r"more than the 1000 B free on cpu",
    ):
        ntcov.ntcov(logits, logits)
    assert not calls
    monkeypatch.setattr(safeguards, "available_bytes", lambda device: 2_000)
    with pytest.raises(
        ValueError,
        match=r"strategy='loop' holds the full Jacobian of 'logits'"
        r", which has shape \[15, 51\].*use strategy='vjp'",
    ):
        ntcov.ntcov(logits, logits, strategy="loop")
    assert not calls
    assert ntcov.ntcov(logits[:2], logits[:2]).shape == (2, 3, 2, 3)  # 288 bytes fit


class BigVocabulary(nn.Module):
    def __init__(self, vocab: int = 20_000, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens).mean(1)))


@pytest.mark.parametrize("strategy", ["auto", "vjp", "per_example"])
def test_large_vocabulary_is_chunked_under_the_budget(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``K × P`` = 18 × 160k would hold 23 MB at once; a 6 MB budget keeps ≤ 1 row per chunk
    (4 rows' worth with room for the backward pass), and the numbers do not change."""
    torch.manual_seed(0)
    model = BigVocabulary().double().eval()
    tokens = torch.randint(0, 20_000, (6, 2), generator=torch.Generator().manual_seed(1))
    logits = properties.logits(model, tokens)
    p = sum(w.numel() for w in model.parameters())
    budget = 4 * p * 8  # one row of J (×4 for the backward pass) per chunk
    held: list[int] = []
    for name in ("vjp_rows", "per_example_rows"):
        original = getattr(autodiff, name)

        def recording(prop, params, chunk, original=original):  # type: ignore[no-untyped-def]
            for start, rows in original(prop, params, chunk):
                held.append(next(iter(rows.values())).shape[0])
                yield start, rows

        monkeypatch.setattr(autodiff, name, recording)
    j = plain_jacobian(model, lambda m: m(tokens))
    assert_close(
        ntcov.ntcov(logits, logits, strategy=strategy, memory_budget=budget),
        (j @ j.T).reshape(6, 3, 6, 3),
    )
    assert_close(
        ntcov.ntvar(logits, strategy=strategy, memory_budget=budget), j.pow(2).sum(1).reshape(6, 3)
    )
    limit = 3 if strategy != "vjp" else 1  # per-example: one example (3 rows) at least
    assert held and max(held) <= limit


@pytest.mark.parametrize("strategy", ["jvp", "double_vjp"])
def test_forward_strategies_hold_at_most_16_gradients(
    mlp: Case, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit ``jvp`` on 27 × 27 entries used to hold all 27 gradients (27 × P) at once."""
    x = torch.cat([mlp.x, mlp.x2])
    logits = properties.logits(mlp.model, x)
    held: list[int] = []
    original = autodiff.directions

    def recording(prop, params, tangents, *, force_reverse):  # type: ignore[no-untyped-def]
        held.append(len(tangents))
        return original(prop, params, tangents, force_reverse=force_reverse)

    monkeypatch.setattr(autodiff, "directions", recording)
    j = plain_jacobian(mlp.model, lambda m: m(x))
    assert_close(ntcov.ntcov(logits, logits, strategy=strategy), (j @ j.T).reshape(9, 3, 9, 3))
    assert held == [16, 11]


@pytest.mark.parametrize("by", ["example", "layer", "group"])
def test_attribution_and_sketch_refuse_a_loss_with_nan_entries(by: str) -> None:
    """One non-finite training loss would make every layer and group part nan (and one
    example's part nan): refused, naming the property."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    x[4, 1] = float("nan")
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    p = properties.probs(model, x[:1], y[:1])[0]
    loss = properties.per_example_loss(model, x, y)
    groups = y if by == "group" else None
    with pytest.raises(ValueError, match="attribute: property 'per_example_loss' has non-finite"):
        ntcov.attribute(p, loss, by=by, groups=groups)
    if by == "example":
        with pytest.raises(ValueError, match="sketch_ntcov: property 'per_example_loss' has non"):
            ntcov.sketch_ntcov(p, loss, dims=4)
