"""Property-based tests: random small architectures and random properties of them.

Hypothesis draws a network (optional Conv1d front, 1–3 Linear layers of width 2–5, tanh, relu or
gelu, optional LayerNorm, sometimes a layer called twice or two layers sharing a weight) and
properties built from its logits, probabilities and losses (entries, sums, products, scalings).
Every fast strategy must equal the brute-force loop (:mod:`ntcov.reference`, float64, rtol 1e-9),
and ntcov must be linear in its first argument. The settings profile keeps the run short and
deterministic (``derandomize=True``: the same examples on every run, so CI cannot flake).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import ntcov
from ntcov import FallbackWarning, Property, properties
from ntcov.params import select_params
from ntcov.reference import jacobian_loop

settings.register_profile(
    "ntcov-property-based",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("ntcov-property-based")

FAST = ["auto", "jvp", "double_vjp", "per_example", "vjp"]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": F.gelu,
}
CLASSES = 3
EXAMPLES = 4


@dataclass(frozen=True)
class Spec:
    """A random architecture: ``features`` inputs, optional conv front, ``widths`` of the hidden
    Linear layers, the activation, LayerNorm, and the two kinds of weight sharing."""

    features: int
    conv_channels: int  # 0: no Conv1d
    widths: tuple[int, ...]
    activation: str
    layer_norm: bool
    called_twice: bool  # one square layer applied twice before the head
    tied: bool  # the last two hidden layers share one weight (three equal widths)
    seed: int


class RandomNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        width = spec.features
        self.conv = None
        if spec.conv_channels:
            self.conv = nn.Conv1d(1, spec.conv_channels, kernel_size=2)
            width = spec.conv_channels * (spec.features - 1)
        layers = []
        for hidden in spec.widths:
            layers.append(nn.Linear(width, hidden))
            width = hidden
        self.hidden = nn.ModuleList(layers)
        if spec.tied:
            self.hidden[-1].weight = self.hidden[-2].weight
        self.norm = nn.LayerNorm(spec.widths[0]) if spec.layer_norm else None
        self.twice = nn.Linear(width, width) if spec.called_twice else None
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.spec.activation]
        h = x
        if self.conv is not None:
            h = act(self.conv(h.unsqueeze(1))).flatten(1)
        for i, layer in enumerate(self.hidden):
            h = act(layer(h))
            if i == 0 and self.norm is not None:
                h = self.norm(h)
        if self.twice is not None:
            h = act(self.twice(act(self.twice(h))))
        return self.out(h)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    depth = draw(st.integers(1, 3))
    tied = depth == 3 and draw(st.booleans())
    widths = [draw(st.integers(2, 5)) for _ in range(depth)]
    if tied:
        widths = [widths[0]] * 3  # the last two layers square: one weight fits both
    return Spec(
        features=draw(st.integers(2, 4)),
        conv_channels=draw(st.sampled_from([0, 0, 2])),
        widths=tuple(widths),
        activation=draw(st.sampled_from(list(ACTIVATIONS))),
        layer_norm=draw(st.booleans()),
        called_twice=draw(st.booleans()),
        tied=tied,
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass(frozen=True)
class World:
    model: RandomNet
    x: Tensor
    y: Tensor


def build(spec: Spec) -> World:
    torch.manual_seed(spec.seed)
    model = RandomNet(spec).double().eval()
    x = torch.randn(EXAMPLES, spec.features, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (EXAMPLES,))
    return World(model, x, y)


BASES: dict[str, Callable[[World], Property]] = {
    "logits": lambda w: properties.logits(w.model, w.x),
    "probs": lambda w: properties.probs(w.model, w.x, w.y),
    "log_probs": lambda w: properties.log_probs(w.model, w.x, w.y),
    "losses": lambda w: properties.per_example_loss(w.model, w.x, w.y),
    "loss": lambda w: properties.loss(w.model, w.x, w.y),
}


@st.composite
def property_makers(draw: st.DrawFn) -> Callable[[World], Property]:
    """A random property: a base, maybe an entry or row of it, maybe combined with another."""
    first = draw(st.sampled_from(list(BASES)))
    shape_op = draw(st.sampled_from(["whole", "entry", "sum", "scaled"]))
    combine = draw(st.sampled_from(["none", "plus", "times"]))
    other = draw(st.sampled_from(["loss", "probs_sum", "logit_00"]))
    scale = draw(st.floats(-3.0, 3.0, allow_nan=False).filter(lambda c: abs(c) > 0.1))

    def make(world: World) -> Property:
        prop = BASES[first](world)
        if shape_op == "entry" and first != "loss":
            prop = prop[1]
        elif shape_op == "sum":
            prop = prop.sum()
        elif shape_op == "scaled":
            prop = scale * prop
        partner = {
            "loss": lambda: BASES["loss"](world),
            "probs_sum": lambda: BASES["probs"](world).sum(),
            "logit_00": lambda: BASES["logits"](world)[0, 0],
        }[other]()
        if combine == "plus":
            prop = prop + partner  # a scalar partner broadcasts
        elif combine == "times":
            prop = prop * partner  # the product rule, from autodiff
        return prop

    return make


def _close(actual: Tensor, expected: Tensor) -> None:
    atol = 1e-12 * max(1.0, float(expected.abs().max())) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=atol)


def _quietly(fn: Callable[[], Tensor]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # fallbacks are exact, tested elsewhere
        return fn()


@PROFILE
@given(spec=specs(), make_a=property_makers(), make_b=property_makers())
def test_every_fast_strategy_equals_the_brute_force_loop(
    spec: Spec, make_a: Callable[[World], Property], make_b: Callable[[World], Property]
) -> None:
    world = build(spec)
    a, b, loss = make_a(world), make_b(world), BASES["loss"](world)
    weights = select_params(world.model)
    j_a, j_b, j_loss = (jacobian_loop(p, weights) for p in (a, b, loss))
    expected = {
        "ntcov": (j_a @ j_b.T).reshape(a.shape + b.shape),
        "ntvar": j_a.pow(2).sum(1).reshape(a.shape),
        "rate": -(j_a @ j_loss.T).reshape(a.shape),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # fallbacks are exact, tested elsewhere
        for strategy in FAST:
            _close(ntcov.ntcov(a, b, strategy=strategy), expected["ntcov"])
            _close(ntcov.ntvar(a, strategy=strategy), expected["ntvar"])
            _close(ntcov.rate(a, loss, strategy=strategy), expected["rate"])


@PROFILE
@given(
    spec=specs(),
    make_z=property_makers(),
    c1=st.floats(-4.0, 4.0, allow_nan=False),
    c2=st.floats(-4.0, 4.0, allow_nan=False),
    pair=st.sampled_from([("logits", "log_probs"), ("probs", "losses"), ("losses", "log_probs")]),
)
def test_ntcov_is_linear_in_its_first_argument(
    spec: Spec,
    make_z: Callable[[World], Property],
    c1: float,
    c2: float,
    pair: tuple[str, str],
) -> None:
    """``ntcov(c1·a + c2·b, z) = c1·ntcov(a, z) + c2·ntcov(b, z)`` (a, b of the same shape)."""
    world = build(spec)
    a, b = BASES[pair[0]](world), BASES[pair[1]](world)
    if a.shape != b.shape:
        a = a[:, 0] if a.value().dim() == 2 else a
        b = b[:, 0] if b.value().dim() == 2 else b
    z = make_z(world)
    combined = _quietly(lambda: ntcov.ntcov(c1 * a + c2 * b, z))
    parts = c1 * _quietly(lambda: ntcov.ntcov(a, z)) + c2 * _quietly(lambda: ntcov.ntcov(b, z))
    scale = max(1.0, float(parts.abs().max()), abs(c1) + abs(c2))
    torch.testing.assert_close(combined, parts, rtol=1e-9, atol=1e-11 * scale)
