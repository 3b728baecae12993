"""Per-layer structured rules: a layer's weight gradient as a sum of outer products.

For one scalar ``p`` (an entry of one example's row) and a layer call with output ``y``, the
gradient of ``p`` with respect to the layer's weight, seen as a matrix ``[a, b]``, is a sum over
the call's positions ``t`` (tokens, convolution output locations):

    ∂p/∂W = Σ_t A_tᵀ B_t        A_t ∈ R^a, B_t ∈ R^b

- ``nn.Linear`` ``y = W h + b``: ``A_t = δ_t = ∂p/∂y_t``, ``B_t = h_t`` (and for the bias
  ``B_t = 1``), over every leading position of the input;
- ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``): the same over the unfolded input patches and the
  output locations, with ``W`` seen as ``[C_out, C_in·k]``;
- ``nn.Embedding`` ``y_t = W[i_t]``: ``A_t = e_{i_t}`` (kept as the index ``i_t``), ``B_t = δ_t``.

So ``∇p · ∇q = Σ_{t,s} (A_t·A'_s)(B_t·B'_s)`` without ever forming ``∂p/∂W``: that is the
structured rule of :mod:`ntcov.structured`. A :class:`Factor` holds one side (``A`` or ``B``) for a
chunk of examples.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

__all__ = ["Factor", "LayerRule", "rule_for"]


@dataclass(frozen=True)
class Factor:
    """One side of the outer products ``Σ_t A_tᵀ B_t``, for ``n`` examples.

    ``values`` is ``[n, r, T, size]`` (``index=False``) or ``[n, 1, T]`` integer indices into
    ``range(size)`` with ``−1`` for "no entry" (``index=True``, the one-hot vectors of an
    embedding). ``r`` is ``1`` when the factor is shared by all entries of an example's row
    (layer inputs) and ``m`` (the entries per example) when it is not (back-propagated signals).
    """

    values: Tensor
    size: int
    index: bool = False
    ones: bool = False  # every B_t is 1 (a bias): its gram is all ones

    @property
    def entries(self) -> int:
        """``r``: 1 (shared by the entries of an example) or ``m``."""
        return self.values.shape[1]

    @property
    def positions(self) -> int:
        """``T``: the positions summed over."""
        return self.values.shape[2]


Pair = tuple[Factor, Factor]


@dataclass(frozen=True)
class LayerRule:
    """How one layer type's weights are written as ``Σ_t A_tᵀ B_t``.

    ``unsupported(module)`` says why a module cannot use the rule (``None`` when it can);
    ``channels(module)`` is the size of the last output axis (Linear, Embedding) or of the channel
    axis (convolutions), so that the output has ``numel / channels`` positions;
    ``pairs(module, inputs, deltas)`` maps the layer inputs ``[n, *in]`` and the signals
    ``δ = ∂p/∂y`` ``[n, m, *out]`` of ``n`` examples to ``{attribute: (A, B)}`` for its
    ``weight`` and ``bias``; ``matrix(module, attribute)`` is the ``(a, b)`` shape of that
    parameter as a matrix; ``gradients(module, inputs, deltas, attributes)`` gives the per-row
    gradients ``{attribute: [n, m, *p]}`` of the named attributes directly (the
    per-example-gradient rule).
    """

    base: type[nn.Module]
    unsupported: Callable[[nn.Module], str | None]
    channels: Callable[[nn.Module], int]
    pairs: Callable[[nn.Module, Tensor, Tensor], dict[str, Pair]]
    matrix: Callable[[nn.Module, str], tuple[int, int]]
    gradients: Callable[[nn.Module, Tensor, Tensor, Collection[str]], dict[str, Tensor]]


def _weight(module: nn.Module) -> Tensor:
    """The layer's weight (a tensor for every layer with a rule)."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def _ones(deltas: Factor) -> Factor:
    """``B_t = 1`` for a bias: ``[n, 1, T, 1]``."""
    n, _, t, _ = deltas.values.shape
    return Factor(deltas.values.new_ones(n, 1, t, 1), 1, ones=True)


# ----- nn.Linear ------------------------------------------------------------------------------


def _linear_pairs(module: nn.Module, inputs: Tensor, deltas: Tensor) -> dict[str, Pair]:
    n, m = deltas.shape[:2]
    d_in, d_out = inputs.shape[-1], deltas.shape[-1]
    delta = Factor(deltas.reshape(n, m, -1, d_out), d_out)
    pairs = {"weight": (delta, Factor(inputs.reshape(n, 1, -1, d_in), d_in))}
    pairs["bias"] = (delta, _ones(delta))
    return pairs


def _linear_gradients(
    module: nn.Module, inputs: Tensor, deltas: Tensor, attributes: Collection[str]
) -> dict[str, Tensor]:
    """``δ_tᵀ h_t`` summed over positions, ``[n, m, d_out, d_in]``, and ``Σ_t δ_t``."""
    n, m = deltas.shape[:2]
    d_in, d_out = inputs.shape[-1], deltas.shape[-1]
    delta, layer_input = deltas.reshape(n, m, -1, d_out), inputs.reshape(n, -1, d_in)
    grads = {}
    if "weight" in attributes:  # a batched matrix product [n, m·d_out, T] @ [n, T, d_in]
        rows = delta.transpose(1, 2).reshape(n, -1, m * d_out).transpose(1, 2)
        grads["weight"] = torch.bmm(rows, layer_input).reshape(n, m, d_out, d_in)
    if "bias" in attributes:
        grads["bias"] = delta.sum(2)
    return grads


def _linear_matrix(module: nn.Module, attribute: str) -> tuple[int, int]:
    weight = _weight(module)
    return (weight.shape[0], weight.shape[1]) if attribute == "weight" else (weight.shape[0], 1)


# ----- nn.Conv1d / nn.Conv2d ------------------------------------------------------------------


def _conv_unsupported(module: nn.Module) -> str | None:
    if getattr(module, "groups", 1) != 1:
        return f"{type(module).__name__} with groups={module.groups} (only groups=1)"
    return None


def _conv_pairs(module: nn.Module, inputs: Tensor, deltas: Tensor) -> dict[str, Pair]:
    """Patches ``[n, 1, lead·L, C_in·k]`` and signals ``[n, m, lead·L, C_out]``."""
    n, m = deltas.shape[:2]
    spatial = _spatial(module)
    c_out = _weight(module).shape[0]
    patches = _unfold(module, inputs.reshape(-1, *inputs.shape[-spatial - 1 :]), spatial)
    deltas = deltas.reshape(n, m, -1, c_out, deltas.shape[-spatial:].numel()).transpose(-1, -2)
    delta = Factor(deltas.reshape(n, m, -1, c_out), c_out)
    size = patches.shape[-1]
    pairs = {"weight": (delta, Factor(patches.reshape(n, 1, -1, size), size))}
    pairs["bias"] = (delta, _ones(delta))
    return pairs


def _unfold(module: nn.Module, images: Tensor, spatial: int) -> Tensor:
    """Input patches ``[B, L, C_in·k]`` (channel-major, as ``weight.reshape(C_out, -1)``)."""
    padding_mode = str(module.padding_mode)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padding = [int(p) for p in module._reversed_padding_repeated_twice]  # type: ignore[union-attr]
    padded = F.pad(images, padding, mode=mode)
    if spatial == 1:
        padded = padded.unsqueeze(-2)
    kernel, dilation, stride = (
        tuple(getattr(module, name)) if spatial == 2 else (1, getattr(module, name)[0])
        for name in ("kernel_size", "dilation", "stride")
    )
    patches = F.unfold(padded, kernel, dilation=dilation, padding=0, stride=stride)
    return patches.transpose(1, 2)


def _conv_gradients(
    module: nn.Module, inputs: Tensor, deltas: Tensor, attributes: Collection[str]
) -> dict[str, Tensor]:
    """Per-row weight gradients by ``vmap`` of the convolution's weight backward (the batched
    convolution backward of torch.func, cheaper than unfolding), and ``Σ δ`` for the bias."""
    n, m = deltas.shape[:2]
    weight = _weight(module).detach()  # a convolution's VJP w.r.t. its weight ignores its value
    one = _weight_backward(module, weight)
    grads = {}
    if "weight" in attributes:
        grads["weight"] = vmap(vmap(one, in_dims=(None, 0)), in_dims=(0, 0))(inputs, deltas)
    if "bias" in attributes:
        spatial = deltas.shape[-_spatial(module) :].numel()
        grads["bias"] = deltas.reshape(n, m, -1, weight.shape[0], spatial).sum((2, 4))
    return grads


def _weight_backward(module: nn.Module, weight: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``(input, δ) -> ∂/∂W`` for one call: ``aten.convolution_backward`` for the weight only
    (no forward pass; non-zero padding modes pad the input first), or the VJP of the
    recomputed convolution for string padding (``'same'`` may pad asymmetrically)."""
    if isinstance(module.padding, str):

        def by_vjp(layer_input: Tensor, delta: Tensor) -> Tensor:
            pull = vjp(lambda w: recompute(module, layer_input, w, None), weight)[1]
            return pull(delta)[0]

        return by_vjp
    spatial = _spatial(module)
    padded = str(module.padding_mode) != "zeros"
    padding = [0] * spatial if padded else [int(p) for p in module.padding]  # type: ignore[union-attr]
    pads = [int(p) for p in module._reversed_padding_repeated_twice]  # type: ignore[union-attr]
    stride = [int(v) for v in module.stride]  # type: ignore[union-attr]
    dilation = [int(v) for v in module.dilation]  # type: ignore[union-attr]

    def direct(layer_input: Tensor, delta: Tensor) -> Tensor:
        if padded:
            layer_input = F.pad(layer_input, pads, mode=str(module.padding_mode))
        return torch.ops.aten.convolution_backward(
            delta,
            layer_input,
            weight,
            None,
            stride,
            padding,
            dilation,
            False,
            [0] * spatial,
            1,
            [False, True, False],
        )[1]

    return direct


def _spatial(module: nn.Module) -> int:
    return 2 if isinstance(module, nn.Conv2d) else 1


def _conv_matrix(module: nn.Module, attribute: str) -> tuple[int, int]:
    weight = _weight(module)
    if attribute == "weight":
        return weight.shape[0], weight[0].numel()
    return weight.shape[0], 1


# ----- nn.Embedding ---------------------------------------------------------------------------


def _embedding_unsupported(module: nn.Module) -> str | None:
    if module.max_norm is not None:
        return "nn.Embedding with max_norm (renormalises its weight in the forward pass)"
    if module.scale_grad_by_freq:
        return "nn.Embedding with scale_grad_by_freq (its gradient depends on the whole batch)"
    return None


def _embedding_pairs(module: nn.Module, inputs: Tensor, deltas: Tensor) -> dict[str, Pair]:
    n, m = deltas.shape[:2]
    ids = inputs.reshape(n, 1, -1).long()
    padding = module.padding_idx
    if isinstance(padding, int):  # no gradient reaches the padding row
        ids = ids.masked_fill(ids.eq(padding), -1)
    width = deltas.shape[-1]
    tokens = Factor(ids, _weight(module).shape[0], index=True)
    return {"weight": (tokens, Factor(deltas.reshape(n, m, -1, width), width))}


def _embedding_gradients(
    module: nn.Module, inputs: Tensor, deltas: Tensor, attributes: Collection[str]
) -> dict[str, Tensor]:
    pair = _embedding_pairs(module, inputs, deltas)["weight"]
    return {"weight": per_row_gradient(pair, deltas.shape[1])}


def _embedding_matrix(module: nn.Module, attribute: str) -> tuple[int, int]:
    weight = _weight(module)
    return weight.shape[0], weight.shape[1]


def _out_channels(module: nn.Module) -> int:
    return _weight(module).shape[0]


def _embedding_width(module: nn.Module) -> int:
    return _weight(module).shape[1]


RULES: tuple[LayerRule, ...] = (
    LayerRule(
        nn.Linear,
        lambda module: None,
        _out_channels,
        _linear_pairs,
        _linear_matrix,
        _linear_gradients,
    ),
    LayerRule(
        nn.Conv1d, _conv_unsupported, _out_channels, _conv_pairs, _conv_matrix, _conv_gradients
    ),
    LayerRule(
        nn.Conv2d, _conv_unsupported, _out_channels, _conv_pairs, _conv_matrix, _conv_gradients
    ),
    LayerRule(
        nn.Embedding,
        _embedding_unsupported,
        _embedding_width,
        _embedding_pairs,
        _embedding_matrix,
        _embedding_gradients,
    ),
)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The structured rule for ``module``, or ``None`` for any other layer.

    Subclasses qualify only when they keep the base class's forward computation (a subclass
    that overrides ``forward``, a LoRA layer say, computes something else).
    """
    for rule in RULES:
        if isinstance(module, rule.base) and _same_computation(type(module), rule.base):
            return None if rule.unsupported(module) is not None else rule
    return None


def _same_computation(cls: type, base: type[nn.Module]) -> bool:
    names = ("forward", "_conv_forward")
    return all(getattr(cls, n, None) is getattr(base, n, None) for n in names)


def recompute(
    module: nn.Module, inputs: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """The layer's output with the given weight and bias (the same computation as ``forward``)."""
    if weight is None:
        raise TypeError(f"{type(module).__name__} has no weight to recompute with")
    if isinstance(module, nn.Embedding):
        return F.embedding(inputs, weight, module.padding_idx, None, 2.0, False, module.sparse)
    if isinstance(module, nn.Linear):
        return F.linear(inputs, weight, bias)
    return module._conv_forward(inputs, weight, bias)  # type: ignore[operator]


def gram(x: Factor, y: Factor) -> Tensor:
    """``x_{i,r,t} · y_{j,u,s}`` for every pair, ``[n, r, n', u, T, T']``."""
    if not x.index and not y.index:  # one matrix product [n·r·T, d] @ [d, n'·u·T']
        n, r, t, d = x.values.shape
        n2, u, s = y.values.shape[:3]
        flat = x.values.reshape(n * r * t, d) @ y.values.reshape(n2 * u * s, d).T
        return flat.view(n, r, t, n2, u, s).permute(0, 1, 3, 4, 2, 5)
    if x.index and y.index:
        same = x.values[:, :, None, None, :, None] == y.values[None, None, :, :, None, :]
        valid = (x.values >= 0)[:, :, None, None, :, None]
        return (same & valid).to(_float_dtype(x, y))
    if y.index:
        return gram(y, x).permute(2, 3, 0, 1, 5, 4)
    ids = x.values  # [n, 1, T]
    n, _, t = ids.shape
    picked = y.values[..., ids.clamp(min=0).reshape(-1)]  # [n', u, T', n·T]
    picked = picked.reshape(*y.values.shape[:3], n, 1, t).permute(3, 4, 0, 1, 5, 2)
    return picked * (ids >= 0)[:, :, None, None, :, None].to(picked.dtype)


def _float_dtype(x: Factor, y: Factor) -> torch.dtype:
    for factor in (x, y):
        if factor.values.is_floating_point():
            return factor.values.dtype
    return torch.get_default_dtype()


def per_row_gradient(pair: Pair, entries: int) -> Tensor:
    """``Σ_t A_tᵀ B_t`` for every row, ``[n, m, a, b]`` (the per-example-gradient rule)."""
    a, b = pair
    n = a.values.shape[0]
    if a.index:
        return _scatter_rows(a, b, entries)
    left = a.values.expand(n, entries, *a.values.shape[2:])
    right = b.values.expand(n, entries, *b.values.shape[2:])
    return torch.einsum("imta,imtb->imab", left, right)


def _scatter_rows(a: Factor, b: Factor, entries: int) -> Tensor:
    """``Σ_t e_{i_t} ⊗ B_t``: rows of ``B`` added at the token ids, ``[n, m, V, b]``."""
    values = b.values.expand(b.values.shape[0], entries, *b.values.shape[2:])
    n, m, t, width = values.shape
    ids = a.values.expand(n, m, t)
    valid = (ids >= 0).unsqueeze(-1).to(values.dtype)
    index = ids.clamp(min=0).reshape(n * m, t, 1).expand(n * m, t, width)
    out = values.new_zeros(n * m, a.size, width)
    out.scatter_add_(1, index, (values * valid).reshape(n * m, t, width))
    return out.reshape(n, m, a.size, width)


def weighted_gradient(pair: Pair, weights: Tensor) -> Tensor:
    """``Σ_{i,k} w_{ik} Σ_t A_tᵀ B_t`` for row weights ``w`` ``[n, m]``: ``[a, b]``.

    Cost ``n·T·a·b`` (one backward pass's worth): per-example matrices are not formed."""
    a, b = pair
    if a.entries > 1 and b.entries > 1:
        rows = per_row_gradient(pair, weights.shape[1])
        return torch.einsum("imab,im->ab", rows, weights)
    if a.entries > 1 or (b.entries == 1 and not a.index):
        a = _weighted(a, weights)
    else:
        b = _weighted(b, weights)
    right = b.values[:, 0].reshape(-1, b.size)  # [n·T, b]
    if a.index:
        ids = a.values[:, 0].reshape(-1)
        valid = (ids >= 0).unsqueeze(-1).to(right.dtype)
        return right.new_zeros(a.size, b.size).index_add_(0, ids.clamp(min=0), right * valid)
    return a.values[:, 0].reshape(-1, a.size).T @ right


def _weighted(factor: Factor, weights: Tensor) -> Factor:
    """``Σ_k w_{ik} F_{ik}``: a per-row factor folded into one per example, ``[n, 1, T, d]``."""
    if factor.entries == 1:  # shared by the entries: their weights add up
        weights = weights.sum(1, keepdim=True)
    return Factor(torch.einsum("imtd,im->itd", factor.values, weights).unsqueeze(1), factor.size)
