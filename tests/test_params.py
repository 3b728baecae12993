"""``params=`` selection: by parameter name, submodule name or module object; tied and frozen
weights; per-parameter decomposition of ntcov."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import ntcov
from ntcov import Strategy, properties
from ntcov.params import ParamSelection, select_params
from tests.zoo import ZOO, Case, assert_close, plain_jacobian


def _expected(case: Case, names: list[str]) -> tuple[Tensor, Tensor]:
    """``ntcov(logits, probs)`` and ``ntvar(logits)`` over just the parameters ``names``."""
    j_a = plain_jacobian(case.model, lambda m: m(case.x), names)
    j_b = plain_jacobian(case.model, lambda m: torch.softmax(m(case.x2), -1)[:, 1], names)
    n, m = case.x.shape[0], case.x2.shape[0]
    return (j_a @ j_b.T).reshape(n, -1, m), j_a.pow(2).sum(1).reshape(n, -1)


SELECTIONS: list[tuple[str, Callable[[nn.Module], ParamSelection], list[str]]] = [
    ("mlp", lambda m: "2.weight", ["2.weight"]),
    ("mlp", lambda m: "0", ["0.weight", "0.bias"]),
    ("mlp", lambda m: m[2], ["2.weight", "2.bias"]),
    ("mlp", lambda m: ["0.bias", m[2]], ["0.bias", "2.weight", "2.bias"]),
    ("mlp", lambda m: ("2.bias", "2"), ["2.weight", "2.bias"]),
    ("cnn_bn", lambda m: "1", ["1.weight", "1.bias"]),
    ("cnn_bn", lambda m: [m[0], "5.bias"], ["0.weight", "0.bias", "5.bias"]),
    ("transformer", lambda m: "encoder.self_attn", None),
    ("gru", lambda m: m.gru, None),
    ("frozen", lambda m: "2", ["2.weight", "2.bias"]),
]


@pytest.mark.parametrize(
    ("name", "select", "names"), SELECTIONS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SELECTIONS)]
)
def test_selection_equals_the_jacobian_restricted_to_it(
    name: str, select: Callable[[nn.Module], ParamSelection], names: list[str] | None
) -> None:
    case = ZOO[name]()
    selection = select(case.model)
    chosen = list(select_params(case.model, selection))
    if names is not None:
        assert sorted(chosen) == sorted(names)
    assert 0 < len(chosen) < len(list(case.model.parameters()))
    a = properties.logits(case.model, case.x)
    b = properties.probs(case.model, case.x2, 1)
    expected_ab, expected_var = _expected(case, chosen)
    for strategy in ("auto", "vjp", "loop"):
        assert_close(ntcov.ntcov(a, b, params=selection, strategy=strategy), expected_ab)
        assert_close(ntcov.ntvar(a, params=selection, strategy=strategy), expected_var)
    # a strict subset really differs from all the parameters
    assert not torch.allclose(ntcov.ntvar(a, params=selection), ntcov.ntvar(a))


@pytest.mark.parametrize("strategy", [s.value for s in Strategy])
def test_every_strategy_honours_the_selection(strategy: str) -> None:
    case = ZOO["cnn_bn"]()
    a = properties.logits(case.model, case.x)
    b = properties.probs(case.model, case.x2, 1)
    expected_ab, _ = _expected(case, ["0.weight", "5.bias"])
    got = ntcov.ntcov(a, b, params=["0.weight", "5.bias"], strategy=strategy)
    assert_close(got, expected_ab)
    loss = properties.loss(case.model, case.x, case.y)
    assert_close(
        ntcov.rate(a, loss, params="0", strategy=strategy),
        -ntcov.ntcov(a, loss, params="0", strategy="loop"),
    )


@pytest.mark.parametrize(
    "select",
    [
        lambda m: "out",
        lambda m: m.out,
        lambda m: ["out.weight", "out.bias"],
    ],
    ids=["name", "module", "parameter_names"],
)
def test_tied_weight_is_selected_through_either_module(
    select: Callable[[nn.Module], ParamSelection],
) -> None:
    case = ZOO["tied"]()
    selection = select(case.model)
    assert list(select_params(case.model, selection)) == ["emb.weight", "out.bias"]
    expected_ab, expected_var = _expected(case, ["emb.weight", "out.bias"])
    a = properties.logits(case.model, case.x)
    b = properties.probs(case.model, case.x2, 1)
    assert_close(ntcov.ntcov(a, b, params=selection), expected_ab)
    assert_close(ntcov.ntvar(a, params=selection, strategy="per_example"), expected_var)


def test_tied_weight_selected_by_the_embedding() -> None:
    case = ZOO["tied"]()
    for selection in ("emb", case.model.emb, "emb.weight", "out.weight"):
        assert list(select_params(case.model, selection)) == ["emb.weight"]
    _, expected_var = _expected(case, ["emb.weight"])
    a = properties.logits(case.model, case.x)
    assert_close(ntcov.ntvar(a, params="out.weight"), expected_var)
    assert_close(ntcov.ntvar(a, params=case.model.emb), expected_var)


def test_frozen_parameters_selected_explicitly_are_included() -> None:
    case = ZOO["frozen"]()
    assert list(select_params(case.model, "0")) == ["0.weight", "0.bias"]
    unfrozen = copy.deepcopy(case.model).requires_grad_(True)
    _, expected_var = _expected(
        Case(case.name, unfrozen, case.x, case.y, case.x2), ["0.weight", "0.bias"]
    )
    a = properties.logits(case.model, case.x)
    assert_close(ntcov.ntvar(a, params="0"), expected_var)
    assert_close(ntcov.ntvar(a, params=case.model[0], strategy="per_example"), expected_var)
    assert not case.model[0].weight.requires_grad  # still frozen


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "tied", "frozen"])
def test_per_parameter_parts_add_up_to_the_total(name: str) -> None:
    case = ZOO[name]()
    a = properties.logits(case.model, case.x)
    b = properties.probs(case.model, case.x2, 1)
    names = list(select_params(case.model))
    parts = [ntcov.ntcov(a, b, params=n) for n in names]
    assert_close(torch.stack(parts).sum(0), ntcov.ntcov(a, b))
    assert_close(torch.stack([ntcov.ntvar(a, params=n) for n in names]).sum(0), ntcov.ntvar(a))


def test_select_params_copies_and_leaves_the_module_alone() -> None:
    model = ZOO["frozen"]().model
    chosen = select_params(model)
    for n, p in model.named_parameters():
        if n in chosen:
            assert not chosen[n].requires_grad
            assert torch.equal(chosen[n], p)
            assert chosen[n].data_ptr() != p.data_ptr()  # an in-place write cannot reach p
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]
