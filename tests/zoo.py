"""A zoo of small float64 models for testing every strategy against the brute-force loop.

Each factory returns a :class:`Case`: an eval-mode model, a batch of inputs ``x`` (``[N, ...]``)
with integer class targets ``y`` (``[N]``), and a second, differently sized batch ``x2``.
Sizes are tiny so that the loop reference stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPE = torch.float64
NUM_CLASSES = 3


@dataclass(frozen=True)
class Case:
    """A model with data: ``x`` ``[N, ...]``, ``y`` ``[N]`` class indices, ``x2`` ``[M, ...]``."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    x2: Tensor


def _targets(n: int, seed: int) -> Tensor:
    return torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def _case(name: str, model: nn.Module, make_input: Callable[[int], Tensor]) -> Case:
    return Case(name, model.to(DTYPE).eval(), make_input(5), _targets(5, 1), make_input(4))


def mlp(seed: int = 0) -> Case:
    """``4 → 6 (tanh) → 3``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, NUM_CLASSES))
    return _case("mlp", model, lambda n: torch.randn(n, 4, dtype=DTYPE))


def cnn_bn(seed: int = 0) -> Case:
    """Conv → BatchNorm2d (eval, with non-trivial running statistics) → ReLU → pool → linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, NUM_CLASSES),
    ).to(DTYPE)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(2.0 * torch.randn(8, 1, 4, 4, dtype=DTYPE) + 0.5)
    return _case("cnn_bn", model, lambda n: torch.randn(n, 1, 4, 4, dtype=DTYPE))


class EncoderClassifier(nn.Module):
    """Linear embedding → ``nn.TransformerEncoderLayer`` (batch first, no dropout) → mean → head."""

    def __init__(self, features: int = 3, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.encoder = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def transformer(seed: int = 0) -> Case:
    """A transformer encoder layer; its fused eval fast path has no forward-mode AD."""
    torch.manual_seed(seed)
    return _case("transformer", EncoderClassifier(), lambda n: torch.randn(n, 3, 3, dtype=DTYPE))


class SdpaClassifier(nn.Module):
    """Two-head attention written with ``F.scaled_dot_product_attention`` on ``[N, h, L, d]``."""

    def __init__(self, features: int = 3, heads: int = 2, head_width: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(features, 3 * heads * head_width)
        self.head = nn.Linear(heads * head_width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # [N, h, L, d]
        return self.head(attended.transpose(1, 2).reshape(n, length, -1).mean(1))


def sdpa(seed: int = 0) -> Case:
    """Attention through ``F.scaled_dot_product_attention``."""
    torch.manual_seed(seed)
    return _case("sdpa", SdpaClassifier(), lambda n: torch.randn(n, 3, 3, dtype=DTYPE))


class GruClassifier(nn.Module):
    """``nn.GRU`` over a sequence, linear head on the last hidden state."""

    def __init__(self, features: int = 2, hidden: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        _, last = self.gru(x)
        return self.head(last[-1])


def gru(seed: int = 0) -> Case:
    """A GRU; ``vmap`` cannot batch it, so per-example rows fall back to VJPs."""
    torch.manual_seed(seed)
    return _case("gru", GruClassifier(), lambda n: torch.randn(n, 3, 2, dtype=DTYPE))


class TiedLM(nn.Module):
    """Embedding → tanh linear → output layer whose weight *is* the embedding weight."""

    def __init__(self, vocab: int = NUM_CLASSES, width: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.emb(tokens).mean(1))))


def tied(seed: int = 0) -> Case:
    """Tied weights: ``emb.weight`` is ``out.weight``. Inputs are token ids ``[N, 3]``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    return _case("tied", TiedLM(), lambda n: torch.randint(0, NUM_CLASSES, (n, 3), generator=gen))


def frozen(seed: int = 0) -> Case:
    """An MLP whose first layer is frozen (``requires_grad=False``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)
    )
    model[0].requires_grad_(False)
    return _case("frozen", model, lambda n: torch.randn(n, 4, dtype=DTYPE))


ZOO: dict[str, Callable[[], Case]] = {
    "mlp": mlp,
    "cnn_bn": cnn_bn,
    "transformer": transformer,
    "sdpa": sdpa,
    "gru": gru,
    "tied": tied,
    "frozen": frozen,
}


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float = 1e-10) -> None:
    """Equal up to ``rtol`` of the values and ``1e-12`` of the largest magnitude (float64)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol = 1e-12 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def plain_jacobian(
    model: nn.Module, fn: Callable[[nn.Module], Tensor], names: list[str] | None = None
) -> Tensor:
    """``∂fn(model)/∂w`` by plain autograd on the model's own parameters, ``[K, P]``.

    Independent of ntcov's machinery (no ``functional_call``): ``names`` picks parameters of
    ``model.named_parameters()`` (default: those with ``requires_grad``), concatenated in order.
    """
    params = dict(model.named_parameters())
    chosen = (
        [params[n] for n in names] if names else [p for p in params.values() if p.requires_grad]
    )
    out = fn(model).reshape(-1)
    rows = []
    for i in range(out.numel()):
        grads = torch.autograd.grad(out[i], chosen, retain_graph=True, allow_unused=True)
        parts = [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(chosen, grads, strict=True)
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows)
