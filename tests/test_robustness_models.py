"""Awkward real models: stateful layers, randomness, forward-mode gaps, recurrent layers, shared
and selected parameters. Each answer equals plain autograd in float64 (:func:`tests.zoo.
plain_jacobian`) or ntcov's brute-force loop, or the call raises an error naming the culprit.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

import ntcov
from ntcov import FallbackWarning, Property, properties
from ntcov.params import select_params
from ntcov.property import RANDOMNESS_SEED
from tests.zoo import ZOO, assert_close, plain_jacobian

# the strategies of issue 7 (a later one is tested by its own author before it joins this list)
STRATEGIES = [s.value for s in ntcov.Strategy]
FAST = [s for s in STRATEGIES if s != "loop"]


def _random(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _kernel(j: Tensor, shape: tuple[int, ...]) -> Tensor:
    return (j @ j.T).reshape(shape + shape)


def _all_results(prop: Property, loss: Property, strategy: str) -> dict[str, Tensor]:
    return {
        "matrix": ntcov.ntcov(prop, prop, strategy=strategy),
        "ntvar": ntcov.ntvar(prop, strategy=strategy),
        "rate": ntcov.rate(prop, loss, strategy=strategy),
    }


def _expected(model: nn.Module, fn: Callable, loss_fn: Callable, shape: tuple) -> dict:
    j, j_loss = plain_jacobian(model, fn), plain_jacobian(model, loss_fn)
    return {
        "matrix": _kernel(j, shape),
        "ntvar": j.pow(2).sum(1).reshape(shape),
        "rate": -(j @ j_loss.T).reshape(shape),
    }


# ----- 1. stateful layers ----------------------------------------------------------------------


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batchnorm_in_train_mode_never_changes_running_statistics(strategy: str) -> None:
    """Opted in: batch statistics, differentiated through; running stats and step counter kept."""
    case = ZOO["cnn_bn"]()
    model = case.model.train()
    before = _buffers(model)
    logits = properties.logits(model, case.x, allow_train_mode=True)
    loss = properties.loss(model, case.x, case.y, allow_train_mode=True)
    got = _all_results(logits, loss, strategy)
    logits.value()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert model[1].num_batches_tracked.item() == before["1.num_batches_tracked"].item() > 0
    expected = _expected(
        copy.deepcopy(model),
        lambda m: m(case.x),
        lambda m: F.cross_entropy(m(case.x), case.y),
        (5, 3),
    )  # plain autograd on a copy in train mode: the same batch statistics
    for key, value in got.items():
        assert_close(value, expected[key])


def test_batchnorm_buffers_are_never_differentiated() -> None:
    model = ZOO["cnn_bn"]().model
    assert "1.num_batches_tracked" not in select_params(model)
    assert not any("running" in n for n in select_params(model))
    for buffer in ("1.num_batches_tracked", "1.running_mean"):
        with pytest.raises(ValueError, match=f"'{buffer}' is neither a parameter"):
            select_params(model, buffer)


class WithCounterParameter(nn.Module):
    """An integer *parameter* (frozen): a counter registered in the wrong place."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.steps = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x) + self.steps


def test_integer_parameters_are_skipped_by_default_and_refused_when_named() -> None:
    model, x = WithCounterParameter().double().eval(), _random(5, 4)
    logits = properties.logits(model, x)
    assert list(select_params(model)) == ["layer.weight", "layer.bias"]
    j = plain_jacobian(model, lambda m: m(x))
    assert_close(ntcov.ntvar(logits), j.pow(2).sum(1).reshape(5, 3))
    for params in ["steps", ["layer", "steps"]]:
        with pytest.raises(
            TypeError,
            match=r"parameter 'steps' of WithCounterParameter has dtype "
            r"torch\.int64.*Leave it out of params=",
        ):
            ntcov.ntvar(logits, params=params)


# ----- 2. randomness ---------------------------------------------------------------------------


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    )


def test_dropout_in_train_mode_is_refused_by_default() -> None:
    model, x = _dropout_model(), _random(5, 4)
    with pytest.raises(ValueError, match=r"module '2' \(Dropout\) is in training mode"):
        ntcov.ntvar(properties.logits(model, x))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropout_opted_in_is_one_fixed_mask_for_every_evaluation(strategy: str) -> None:
    """Every evaluation seeds torch's generator with RANDOMNESS_SEED: one deterministic function
    of the weights, the same for forward mode, reverse mode and the loop (before the fix each
    strategy drew its own masks and they disagreed)."""
    model, x, y = _dropout_model(), _random(5, 4), torch.tensor([0, 1, 2, 0, 1])
    logits = properties.logits(model, x, allow_train_mode=True)
    loss = properties.loss(model, x, y, allow_train_mode=True)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # vmap refuses random ops
        first, second = (_all_results(logits, loss, strategy) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched

    def seeded(fn: Callable[[nn.Module], Tensor]) -> Callable[[nn.Module], Tensor]:
        def run(m: nn.Module) -> Tensor:
            with torch.random.fork_rng():
                torch.manual_seed(RANDOMNESS_SEED)
                return fn(m)

        return run

    fns = (seeded(lambda m: m(x)), seeded(lambda m: F.cross_entropy(m(x), y)))
    expected = _expected(model, *fns, (5, 3))
    for key in first:
        assert torch.equal(first[key], second[key])
        assert_close(first[key], expected[key])
    assert torch.equal(logits.value(), logits.value())
    assert not torch.allclose(logits.value(), model.eval()(x))  # dropout really was active


# ----- 3. forward-mode gaps --------------------------------------------------------------------


class SquareWithoutJvp(torch.autograd.Function):
    """A custom op with a backward but no ``jvp``: forward mode cannot go through it."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_custom_function_without_jvp_falls_back_once_naming_it() -> None:
    case = ZOO["mlp"]()
    model, x, y = case.model, case.x, case.y
    squared = Property(model, lambda m: SquareWithoutJvp.apply(m(x)), name="squared")
    loss = properties.loss(model, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = {
            "rate": ntcov.rate(squared, loss, strategy="jvp"),
            "columns": ntcov.ntcov(squared, squared[:2], strategy="jvp"),  # 6 JVP columns
        }
    messages = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(messages) == 2  # one per call, not one per column
    assert all("'squared' (in SquareWithoutJvp: You must implement the jvp" in m for m in messages)
    j = plain_jacobian(model, lambda m: m(x) ** 2)
    j_loss = plain_jacobian(model, lambda m: F.cross_entropy(m(x), y))
    assert_close(got["rate"], -(j @ j_loss.T).reshape(5, 3))
    assert_close(got["columns"], (j @ j[:6].T).reshape(5, 3, 2, 3))


INPLACE = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
}


@pytest.mark.parametrize("strategy", FAST)
@pytest.mark.parametrize("name", list(INPLACE))
def test_inplace_activations_are_exact(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), INPLACE[name](), nn.Linear(6, 3)).double().eval()
    x, y = _random(5, 4), torch.tensor([0, 1, 2, 0, 1])
    got = _all_results(properties.logits(model, x), properties.loss(model, x, y), strategy)
    expected = _expected(model, lambda m: m(x), lambda m: F.cross_entropy(m(x), y), (5, 3))
    for key, value in got.items():
        assert_close(value, expected[key])


def test_op_without_double_backward_is_explained_in_double_vjp() -> None:
    """hardsigmoid has forward-mode AD but no double backward: jvp works, double_vjp explains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardsigmoid(), nn.Linear(6, 3)).double().eval()
    x, y = _random(5, 4), torch.tensor([0, 1, 2, 0, 1])
    logits, loss = properties.logits(model, x), properties.loss(model, x, y)
    with pytest.raises(
        RuntimeError,
        match=r"double-VJP: the backward pass of property 'logits' "
        r"is not differentiable \(derivative for aten::hardsigmoid_backward",
    ):
        ntcov.rate(logits, loss, strategy="double_vjp")
    assert_close(
        ntcov.rate(logits, loss, strategy="jvp"), ntcov.rate(logits, loss, strategy="loop")
    )


# ----- 4. recurrent layers ---------------------------------------------------------------------


class LstmClassifier(nn.Module):
    def __init__(self, **options: object) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 3, batch_first=True, **options)  # type: ignore[arg-type]
        width = (options.get("proj_size") or 3) * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(int(width), 3)  # type: ignore[call-overload]

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


LSTMS = {
    "plain": {},
    "two_layers": {"num_layers": 2},
    "bidirectional": {"bidirectional": True},
    "projected": {"proj_size": 2},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(LSTMS))
def test_lstm_is_exact_and_per_example_falls_back(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    model = LstmClassifier(**LSTMS[name]).double().eval()
    x = _random(4, 3, 2)
    logits = Property.from_per_example(model, lambda m, xs: m(xs), x, name="logits")
    j = plain_jacobian(model, lambda m: m(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ntcov.ntcov(logits, logits, strategy=strategy)
        variance = ntcov.ntvar(logits, strategy=strategy)
    assert_close(got, _kernel(j, (4, 3)))
    assert_close(variance, j.pow(2).sum(1).reshape(4, 3))
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    if strategy == "per_example":
        assert fallbacks and all("per-example vmap failed" in m for m in fallbacks)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_weights_substituted_are_really_used(kind: str) -> None:
    """RNNs cache their flat weights; the substituted ones must be the ones used."""
    torch.manual_seed(0)
    model = LstmClassifier().double().eval() if kind == "lstm" else ZOO["gru"]().model
    x = _random(4, 3, 2)
    logits = properties.logits(model, x)
    shifted = {n: p + 0.1 * _random(*p.shape, seed=7) for n, p in select_params(model).items()}
    moved = copy.deepcopy(model)
    moved.load_state_dict(shifted, strict=False)
    assert_close(logits(shifted), moved(x).detach())
    assert not torch.allclose(logits(shifted), model(x))
    assert_close(logits.value(), model(x).detach())  # and the model was left alone


# ----- 5. sharing and structure ----------------------------------------------------------------


class CalledTwice(nn.Module):
    """The same hidden layer applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        return self.out(torch.tanh(self.hidden(h)))


class TwoNames(nn.Module):
    """One parameter under two names (``register_parameter``) and one module under two."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_parameter("scale", nn.Parameter(torch.ones(5)))
        self.register_parameter("gain", self.scale)  # the same Parameter object
        self.alias = self.out  # the same module

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x)) * self.scale
        return self.out(h) + self.alias(h * self.gain)


SHARED = {"called_twice": CalledTwice, "two_names": TwoNames, "tied": None}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(SHARED))
def test_shared_parameters_count_once_with_the_sum_of_their_uses(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    if SHARED[name] is None:
        case = ZOO["tied"]()
        model, x, y = case.model, case.x, case.y
    else:
        model = SHARED[name]().double().eval()  # type: ignore[misc]
        x, y = _random(5, 4), torch.tensor([0, 1, 2, 0, 1])
    names = list(select_params(model))
    assert len(names) == len({id(p) for p in model.parameters()})  # each weight once
    before = dict(model.named_parameters(remove_duplicate=False))
    got = _all_results(properties.logits(model, x), properties.loss(model, x, y), strategy)
    # the user's model keeps its Parameter objects under every name (functional_call used to
    # leave a plain tensor behind in a module reachable under two names)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    expected = _expected(model, lambda m: m(x), lambda m: F.cross_entropy(m(x), y), (5, 3))
    for key, value in got.items():
        assert_close(value, expected[key])


def test_a_parameter_under_two_names_is_selected_by_either() -> None:
    model, x = TwoNames().double().eval(), _random(5, 4)
    assert list(select_params(model, "gain")) == ["scale"]
    assert list(select_params(model, ["scale", "gain", "alias.weight"])) == ["scale", "out.weight"]
    assert list(select_params(model, model.alias)) == ["out.weight", "out.bias"]
    logits = properties.logits(model, x)
    j = plain_jacobian(model, lambda m: m(x), ["scale"])
    assert_close(ntcov.ntvar(logits, params="gain"), j.pow(2).sum(1).reshape(5, 3))
    # the gradient of the shared weight is the sum over its two uses
    untied = copy.deepcopy(model)
    untied.gain = nn.Parameter(model.scale.detach().clone())
    j_two = plain_jacobian(untied, lambda m: m(x), ["scale", "gain"])
    assert_close(j, j_two[:, :5] + j_two[:, 5:])
    assert not torch.allclose(j, j_two[:, :5])


# ----- 6. frozen and selected parameters -------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_is_honoured_exactly_with_frozen_weights_around(strategy: str) -> None:
    case = ZOO["frozen"]()
    model, x, y = case.model, case.x, case.y
    logits, loss = properties.logits(model, x), properties.loss(model, x, y)
    selection = ["4.bias", "2.weight", "4.bias"]  # a repeat counts once
    assert list(select_params(model, selection)) == ["4.bias", "2.weight"]
    j = plain_jacobian(model, lambda m: m(x), ["4.bias", "2.weight"])
    j_loss = plain_jacobian(model, lambda m: F.cross_entropy(m(x), y), ["4.bias", "2.weight"])
    assert_close(
        ntcov.ntcov(logits, logits, params=selection, strategy=strategy), _kernel(j, (5, 3))
    )
    assert_close(
        ntcov.rate(logits, loss, params=selection, strategy=strategy), -(j @ j_loss.T).reshape(5, 3)
    )
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]


# ----- parametrizations and activation checkpointing -------------------------------------------


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        hidden = checkpoint(lambda h: torch.tanh(self.first(h)), x, use_reentrant=False)
        return self.second(hidden)


WRAPPED = {
    "weight_norm": lambda: nn.Sequential(
        parametrizations.weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)
    ),
    "spectral_norm_train": lambda: nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)
    ).train(),  # its power iteration updates buffers in place: on copies, the same every call
    "checkpoint": Checkpointed,
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap of weight_norm
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(WRAPPED))
def test_parametrized_and_checkpointed_modules_are_exact(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    model = WRAPPED[name]().double()
    model.train(name.endswith("train"))
    x, y = _random(5, 4), torch.tensor([0, 1, 2, 0, 1])
    before = _buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # weight_norm has no forward-mode AD
        got = _all_results(properties.logits(model, x), properties.loss(model, x, y), strategy)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    # plain autograd on fresh copies: spectral_norm's forward moves the copy's buffers
    j = plain_jacobian(copy.deepcopy(model), lambda m: m(x))
    j_loss = plain_jacobian(copy.deepcopy(model), lambda m: F.cross_entropy(m(x), y))
    expected = {
        "matrix": _kernel(j, (5, 3)),
        "ntvar": j.pow(2).sum(1).reshape(5, 3),
        "rate": -(j @ j_loss.T).reshape(5, 3),
    }
    for key, value in got.items():
        assert_close(value, expected[key])


@pytest.mark.parametrize("flag", ["scale_grad_by_freq", "sparse"])
@pytest.mark.parametrize("layer", [nn.Embedding, nn.EmbeddingBag])
def test_embeddings_whose_backward_is_not_the_derivative_are_refused(
    layer: type[nn.Module], flag: str
) -> None:
    """``scale_grad_by_freq`` rescales gradients by token counts (reverse mode would disagree
    with forward mode and with the derivative); ``sparse`` gives sparse gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(layer(20, 6, **{flag: True}), nn.Linear(6, 3)).double()
    tokens = torch.tensor([[0, 1, 1, 2], [3, 3, 3, 0]])
    if layer is nn.Embedding:
        model = nn.Sequential(model[0], nn.Flatten(), nn.Linear(24, 3)).double()
    prop = Property(model, lambda m: m(tokens)[:, 0], name="first_logit")
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match=f"'0' has {flag}=True.*{flag}=False"):
            ntcov.ntvar(prop, strategy=strategy)
    names = [n for n, _ in model.named_parameters() if not n.startswith("0.")]
    assert ntcov.ntvar(prop, params=names).shape == (2,)  # the embedding left out: fine


def test_embedding_bag_without_forward_mode_or_double_backward_is_still_exact() -> None:
    """``nn.EmbeddingBag`` has neither forward-mode AD nor double backward: ``rate``, the JVP
    strategy and ``predict_step`` fall back to Jacobian rows (with a warning) and agree with the
    brute-force Jacobian; the second-order term and ``strategy='double_vjp'`` say why they
    cannot run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(20, 6, mode="mean"), nn.Tanh(), nn.Linear(6, 2))
    model = model.double().eval()
    tokens, labels = torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 1, 0])

    def first_logit(m: nn.Module) -> Tensor:
        return m(tokens)[:, 0]

    def mean_loss(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(tokens), labels)

    x, loss = Property(model, first_logit), Property(model, mean_loss)
    j, j_loss = plain_jacobian(model, first_logit), plain_jacobian(model, mean_loss)
    with pytest.warns(FallbackWarning, match="neither forward-mode AD nor double backward"):
        assert_close(ntcov.rate(x, loss), -(j @ j_loss.T).reshape(4))
    with pytest.warns(FallbackWarning, match="from the Jacobian's rows"):
        assert_close(ntcov.ntcov(x, x, strategy="jvp"), j @ j.T)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(FallbackWarning):
        first = ntcov.predict_step(x, loss, optimizer).first_order
    assert_close(first, -0.1 * (j @ j_loss.T).reshape(4))
    with pytest.warns(FallbackWarning), pytest.raises(RuntimeError, match="use order=1"):
        ntcov.predict_step(x, loss, optimizer, order=2)
    with pytest.raises(RuntimeError, match="strategy='vjp'"):
        ntcov.rate(x, loss, strategy="double_vjp")
