"""The structured strategy against brute-force Jacobians, in float64, on the zoo and on layers that
exercise each rule (sequences, convolutions, embeddings, tied and reused layers, fallbacks)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ntcov
from ntcov import FallbackWarning, Property, properties
from ntcov import structured as structured_module
from ntcov.params import select_params
from ntcov.structured import choose_rules, make_plan
from ntcov.structured_layers import rule_for
from tests.zoo import ZOO, assert_close, plain_jacobian

DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected(
    model: nn.Module, fa: Callable, fb: Callable, names: list[str] | None = None
) -> Tensor:
    ja, jb = plain_jacobian(model, fa, names), plain_jacobian(model, fb, names)
    return ja @ jb.T


def _structured(a: Property, b: Property, **kwargs: object) -> Tensor:
    """``ntcov(a, b, strategy='structured')`` as ``[A, B]``, failing on any fallback warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        out = ntcov.ntcov(a, b, strategy="structured", **kwargs)  # type: ignore[arg-type]
    return out.reshape(a.shape.numel(), b.shape.numel())


# ----- the zoo --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ZOO if n != "gru"])
def test_zoo_matches_brute_force(name: str) -> None:
    case = ZOO[name]()
    model, x, x2, y = case.model, case.x, case.x2, case.y
    logits = properties.logits(model, x)
    probs = properties.probs(model, x2, 1)
    losses = properties.per_example_loss(model, x, y)
    assert_close(_structured(logits, logits), _expected(model, model_of(x), model_of(x)))
    softmax = lambda m: torch.softmax(m(x2), -1)[:, 1]  # noqa: E731
    assert_close(_structured(logits, probs), _expected(model, model_of(x), softmax))
    loss_rows = lambda m: F.cross_entropy(m(x), y, reduction="none")  # noqa: E731
    assert_close(_structured(probs, losses), _expected(model, softmax, loss_rows))


def model_of(x: Tensor) -> Callable[[nn.Module], Tensor]:
    return lambda m: m(x)


def test_gru_falls_back_with_a_reason_and_stays_exact() -> None:
    case = ZOO["gru"]()
    logits = properties.logits(case.model, case.x)
    with pytest.warns(FallbackWarning, match="structured strategy is not available.*vmap"):
        got = ntcov.ntcov(logits, logits, strategy="structured")
    expected = _expected(case.model, model_of(case.x), model_of(case.x))
    assert_close(got.reshape(expected.shape), expected)


def test_zoo_parameters_take_the_expected_paths() -> None:
    """Attention projections used through F.linear and norms get per-example gradients."""
    case = ZOO["transformer"]()
    plan = make_plan(properties.logits(case.model, case.x), select_params(case.model))
    assert "encoder.linear1.weight" in plan.structured
    assert "encoder.self_attn.out_proj.weight" in plan.other  # MHA uses it without calling it
    assert "encoder.self_attn.in_proj_weight" in plan.other
    tied = ZOO["tied"]()
    plan = make_plan(properties.logits(tied.model, tied.x), select_params(tied.model))
    assert [s.path for s in plan.calls if "emb.weight" in s.names.values()] == ["emb", "out"]


# ----- layers ---------------------------------------------------------------------------------


class Reused(nn.Module):
    """One linear layer applied twice, over a sequence, plus a weight also used directly."""

    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.direct = direct

    def forward(self, x: Tensor) -> Tensor:  # x: [N, L, 4]
        h = torch.tanh(self.inner(torch.tanh(self.inner(x))))
        if self.direct:
            h = h + 0.1 * F.linear(x, self.inner.weight)
        return self.head(h).mean(1)


class Convs(nn.Module):
    """Conv1d (reflect padding, stride, dilation), Conv2d ('same' with an even kernel),
    a grouped Conv2d (no rule: per-example gradients) and a linear head."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(1, 4, (2, 3), padding="same")
        self.c3 = nn.Conv2d(4, 4, 3, groups=groups, padding=1, padding_mode="circular")
        self.head = nn.Linear(3 * 4 + 5 * 5, 3)

    def forward(self, x: Tensor, images: Tensor) -> Tensor:
        a = torch.tanh(self.c1(x)).flatten(1)
        b = torch.tanh(self.c3(torch.tanh(self.c2(images)))).mean(1).flatten(1)
        return self.head(torch.cat([a, b], 1))


class Tokens(nn.Module):
    """Embedding with padding_idx, a position-wise linear over tokens, attention pooling."""

    def __init__(self, vocab: int = 7, width: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(tokens)))
        attended, _ = self.attn(h, h, h, need_weights=False)
        return self.head(attended.mean(1))


def _reused_case(direct: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Reused(direct).to(DTYPE).eval(), torch.randn(5, 3, 4, dtype=DTYPE, generator=_gen(1))


@pytest.mark.parametrize("direct", [False, True])
def test_layer_used_twice_over_a_sequence(direct: bool) -> None:
    model, x = _reused_case(direct)
    logits = properties.logits(model, x)
    assert_close(_structured(logits, logits), _expected(model, model_of(x), model_of(x)))
    plan = make_plan(logits, select_params(model))
    uses = [s for s in plan.calls if "inner.weight" in s.names.values()]
    assert len(uses) == (0 if direct else 2)
    assert len([s for s in plan.calls if s.path == "inner"]) == 2  # the bias stays structured
    assert ("inner.weight" in plan.other) is direct


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
def test_convolutions() -> None:
    torch.manual_seed(0)
    model = Convs().to(DTYPE).eval()
    x = torch.randn(4, 2, 7, dtype=DTYPE, generator=_gen(2))
    images = torch.randn(4, 1, 5, 5, dtype=DTYPE, generator=_gen(3))
    prop = Property.from_per_example(model, lambda m, a, b: m(a, b), (x, images))
    fn = lambda m: m(x, images)  # noqa: E731
    assert_close(_structured(prop, prop), _expected(model, fn, fn))
    plan = make_plan(prop, select_params(model))
    assert {"c1.weight", "c2.weight"} <= set(plan.structured)
    assert "c3.weight" in plan.other  # groups=2: no rule
    assert rule_for(model.c3) is None


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_convolution_rules_with_padding_modes_in_the_batch_pass() -> None:
    """Every layer has a rule (``groups=1``): the signals come from the batch pass, and with a
    metric every convolution's per-example gradients come from its rule (reflect, 'same',
    circular padding)."""
    torch.manual_seed(0)
    model = Convs(groups=1).to(DTYPE).eval()
    x = torch.randn(4, 2, 7, dtype=DTYPE, generator=_gen(2))
    images = torch.randn(4, 1, 5, 5, dtype=DTYPE, generator=_gen(3))
    prop = Property.from_per_example(model, lambda m, a, b: m(a, b), (x, images))
    weights = select_params(model)
    plan = make_plan(prop, weights)
    assert plan.other == [] and choose_rules(plan, plan, weights, None).batch_pass
    fn = lambda m: m(x, images)  # noqa: E731
    j = plain_jacobian(model, fn)
    assert_close(_structured(prop, prop), j @ j.T)
    metric = {n: torch.rand(w.shape, dtype=DTYPE, generator=_gen(12)) for n, w in weights.items()}
    scale = torch.cat([metric[n].reshape(-1) for n in weights])
    assert_close(_structured(prop, prop, metric=metric), (j * scale) @ j.T)


def test_embeddings_padding_and_attention() -> None:
    torch.manual_seed(0)
    model = Tokens().to(DTYPE).eval()
    tokens = torch.randint(0, 7, (5, 4), generator=_gen(4))
    tokens[0, :2] = 0  # padding
    logits = properties.logits(model, tokens)
    other = properties.logits(model, tokens[:3].flip(1))
    fa, fb = model_of(tokens), model_of(tokens[:3].flip(1))
    assert_close(_structured(logits, other), _expected(model, fa, fb))
    assert "emb.weight" in make_plan(logits, select_params(model)).structured


def test_params_subset_frozen_and_metric() -> None:
    case = ZOO["frozen"]()
    model, x = case.model, case.x
    logits = properties.logits(model, x)
    names = ["2.weight", "4.bias"]
    got = _structured(logits, logits, params=names)
    assert_close(got, _expected(model, model_of(x), model_of(x), names))
    weights = select_params(model)
    metric = {n: torch.rand(w.shape, dtype=DTYPE, generator=_gen(5)) for n, w in weights.items()}
    j = plain_jacobian(model, model_of(x))
    scale = torch.cat([metric[n].reshape(-1) for n in weights])
    assert_close(_structured(logits, logits, metric=metric), (j * scale) @ j.T)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "transformer", "tied"])
def test_constant_metric_per_parameter_keeps_the_structured_rule(name: str) -> None:
    """SGD's metric is one constant per parameter (``η``, ``η(1 − d)``...): the structured
    blocks are scaled by it; a parameter with a varying metric goes to the dense rule."""
    case = ZOO[name]()
    model, x = case.model, case.x
    logits = properties.logits(model, x)
    losses = properties.per_example_loss(model, x, case.y)
    weights = select_params(model)
    metric = {n: torch.full_like(w, 0.1 + 0.05 * i) for i, (n, w) in enumerate(weights.items())}
    varying = next(iter(make_plan(logits, weights).structured))
    metric[varying] = torch.rand(weights[varying].shape, dtype=DTYPE, generator=_gen(13))
    plan_a, plan_b = make_plan(logits, weights), make_plan(losses, weights)
    choice = choose_rules(plan_a, plan_b, weights, metric)
    assert varying not in choice.structured and varying in choice.dense
    if name == "mlp":
        assert choice.structured and set(choice.scales) == set(choice.structured)
    ja, jb = (
        plain_jacobian(model, model_of(x)),
        plain_jacobian(model, lambda m: F.cross_entropy(m(x), case.y, reduction="none")),
    )
    scale = torch.cat([metric[n].reshape(-1) for n in weights])
    assert_close(_structured(logits, losses, metric=metric), (ja * scale) @ jb.T)
    assert_close(_structured(logits, logits, metric=metric), (ja * scale) @ ja.T)


def test_auto_counts_a_varying_metric_as_per_example_work() -> None:
    mlp = ZOO["mlp"]()
    logits = properties.logits(mlp.model, mlp.x)
    weights = select_params(mlp.model)
    constant = {n: torch.full_like(w, 0.5) for n, w in weights.items()}
    varying = {n: torch.rand(w.shape, dtype=DTYPE, generator=_gen(14)) for n, w in weights.items()}
    assert structured_module.cheaper_than_per_example(logits, logits, weights, constant)
    assert not structured_module.cheaper_than_per_example(logits, logits, weights, varying)


class Doubled(nn.Linear):
    """A subclass that changes the computation: must not be treated as nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x) ** 2


def test_subclass_with_its_own_forward_gets_per_example_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Doubled(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE).eval()
    x = torch.randn(5, 3, dtype=DTYPE, generator=_gen(6))
    logits = properties.logits(model, x)
    assert rule_for(model[0]) is None
    assert_close(_structured(logits, logits), _expected(model, model_of(x), model_of(x)))


# ----- checks and fallbacks -------------------------------------------------------------------


def test_rows_that_mix_examples_fall_back_and_stay_exact() -> None:
    case = ZOO["mlp"]()
    model, x = case.model, case.x
    centred = Property.from_per_example(model, lambda m, xs: m(xs) - m(xs).mean(0), x)
    with pytest.warns(FallbackWarning, match="structured strategy is not available"):
        got = ntcov.ntcov(centred, centred, strategy="structured")
    fn = lambda m: m(x) - m(x).mean(0)  # noqa: E731
    assert_close(got.reshape(15, 15), _expected(model, fn, fn))


def test_hooks_are_removed_after_success_and_error() -> None:
    case = ZOO["mlp"]()
    model, x = case.model, case.x
    logits = properties.logits(model, x)
    _structured(logits, logits)

    def failing(m: nn.Module, xs: Tensor) -> Tensor:
        if xs.shape[0] == 1:
            raise KeyError("simulated failure inside the per-example pass")
        return m(xs)

    bad = Property.from_per_example(model, failing, x)
    with pytest.raises(KeyError):
        ntcov.ntcov(bad, bad, strategy="structured")
    assert all(not sub._forward_hooks for sub in model.modules())


def test_no_structure_side_falls_back() -> None:
    case = ZOO["mlp"]()
    model, x, y = case.model, case.x, case.y
    logits, loss = properties.logits(model, x), properties.loss(model, x, y)
    with pytest.warns(FallbackWarning, match="no per-example structure"):
        got = ntcov.ntcov(logits, loss, strategy="structured")
    expected = _expected(model, model_of(x), lambda m: F.cross_entropy(m(x), y).reshape(1))
    assert_close(got.reshape(15, 1), expected)


def test_ntvar_and_rate_accept_the_strategy() -> None:
    case = ZOO["mlp"]()
    model, x, y = case.model, case.x, case.y
    logits, loss = properties.logits(model, x), properties.loss(model, x, y)
    j = plain_jacobian(model, model_of(x))
    assert_close(ntcov.ntvar(logits, strategy="structured").reshape(-1), j.pow(2).sum(1))
    assert_close(ntcov.rate(logits, loss, strategy="structured"), ntcov.rate(logits, loss))


# ----- auto, cost model, memory ---------------------------------------------------------------


def test_auto_picks_structured_for_two_per_example_properties(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    original = structured_module.structured_ntcov

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("structured")
        return original(*args, **kwargs)

    monkeypatch.setattr("ntcov.covariance.structured_ntcov", recording)
    case = ZOO["mlp"]()
    logits = properties.logits(case.model, torch.randn(7, 4, dtype=DTYPE, generator=_gen(7)))
    ntcov.ntcov(logits, logits)
    assert calls == ["structured"]


def test_cost_model_prefers_the_cheaper_rule() -> None:
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)).to(DTYPE).eval()
    x = torch.randn(6, 32, dtype=DTYPE, generator=_gen(8))
    plan = make_plan(properties.logits(wide, x), select_params(wide))
    choice = choose_rules(plan, plan, select_params(wide), None)
    assert "0.weight" in choice.structured  # T = 1: (32 + 32) ≪ 32·32
    conv = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2 * 7 * 7, 2)).double()
    images = torch.randn(6, 1, 8, 8, dtype=DTYPE, generator=_gen(9))
    plan = make_plan(properties.logits(conv.eval(), images), select_params(conv))
    choice = choose_rules(plan, plan, select_params(conv), None)
    assert "0.weight" not in choice.structured  # 49² positions: per-example gradients win


@pytest.mark.parametrize("budget", [1, 20_000, 1 << 30])
def test_results_do_not_depend_on_memory_budget(budget: int) -> None:
    model, x = _reused_case(direct=False)
    logits = properties.logits(model, x)
    probs = properties.probs(model, x[:4], 2)
    got = _structured(logits, probs, memory_budget=budget)
    softmax = lambda m: torch.softmax(m(x[:4]), -1)[:, 2]  # noqa: E731
    assert_close(got, _expected(model, model_of(x), softmax))


def test_small_budget_really_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = structured_module.row_chunks

    def recording(plan, weights, choice, examples, start=0):  # type: ignore[no-untyped-def]
        for chunk in original(plan, weights, choice, examples, start):
            sizes.append(chunk.examples)
            yield chunk

    monkeypatch.setattr(structured_module, "row_chunks", recording)
    model, x = _reused_case(direct=False)
    logits = properties.logits(model, x)
    _structured(logits, logits, memory_budget=1)
    assert set(sizes) == {1}
    sizes.clear()
    _structured(logits, logits)
    assert sizes == [5]


# ----- the batch pass, symmetric tiles, auto's cost model -------------------------------------


def _wide_mlp(examples: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE).eval()
    return model, torch.randn(examples, 5, dtype=DTYPE, generator=_gen(10))


@pytest.mark.parametrize("budget", [1 << 30, 2 << 20])
def test_symmetric_tiles_are_mirrored_exactly(budget: int) -> None:
    """``ntcov(p, p)`` computes the tiles on and above the diagonal only (here 3×3 tiles of
    64 examples; with 2 MiB two row chunks of 76 examples, recomputed, in tiles of 19)."""
    model, x = _wide_mlp(150)
    logits = properties.logits(model, x)
    weights = select_params(model)
    plan = make_plan(logits, weights)
    sizes = structured_module.chunk_sizes(
        plan, plan, choose_rules(plan, plan, weights, None), weights, budget
    )
    assert sizes.tile_a == sizes.tile_b < 150 and (budget > 2 << 20 or sizes.chunk_a < 150)
    expected = _expected(model, model_of(x), model_of(x))
    got = _structured(logits, logits, memory_budget=budget)
    assert_close(got, expected)
    assert torch.equal(got, got.T)
    twin = properties.logits(model, x)  # the same values, another property: no mirroring
    assert_close(_structured(logits, twin, memory_budget=budget), expected)


def test_biases_share_the_signal_gram_of_their_weight() -> None:
    model, x = _wide_mlp(6)
    weights = select_params(model)
    plan = make_plan(properties.probs(model, x, 1), weights)
    choice = choose_rules(plan, plan, weights, None)
    assert choice.structured == frozenset(weights)  # T = 1: every parameter, biases too
    assert choice.dense == []


class SequenceFirst(nn.Module):
    """A linear layer applied to ``[L, N, d]``: its examples are on dim 1, not dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, L, 4]
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


def test_layer_with_examples_off_dim_0_falls_back_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = SequenceFirst().to(DTYPE).eval()
    x = torch.randn(5, 3, 4, dtype=DTYPE, generator=_gen(11))
    logits = properties.logits(model, x)
    with pytest.warns(FallbackWarning, match="examples are not on dim 0"):
        got = ntcov.ntcov(logits, logits, strategy="structured")
    assert_close(got.reshape(10, 10), _expected(model, model_of(x), model_of(x)))


def test_auto_takes_per_example_gradients_when_no_layer_has_a_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = ZOO["gru"]()
    logits = properties.logits(case.model, case.x)
    weights = select_params(case.model)
    assert not structured_module.cheaper_than_per_example(logits, logits, weights)
    mlp = ZOO["mlp"]()
    mlp_logits = properties.logits(mlp.model, mlp.x)
    assert structured_module.cheaper_than_per_example(
        mlp_logits, mlp_logits, select_params(mlp.model)
    )

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("auto must not try the structured path here")

    monkeypatch.setattr("ntcov.covariance.structured_ntcov", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = ntcov.ntcov(logits, logits)
    expected = _expected(case.model, model_of(case.x), model_of(case.x))
    assert_close(got.reshape(expected.shape), expected)


def test_chunk_sizes_keep_the_tiles_within_the_budget() -> None:
    model, x = _wide_mlp(300)
    weights = select_params(model)
    plan = make_plan(properties.logits(model, x), weights)
    choice = choose_rules(plan, plan, weights, None)
    budget = 16 << 20
    sizes = structured_module.chunk_sizes(plan, plan, choice, weights, budget)
    result = (300 * 3) ** 2 * 8
    pair = structured_module._pair_elements(plan, plan, choice) * 8
    assert sizes.tile_a == sizes.tile_b <= 75  # square tiles, at least four per side
    assert sizes.tile_a * sizes.tile_b * pair <= (budget - result) // 2
