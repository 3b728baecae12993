"""``ntcov validate``: where Price's equation predicts real training steps, and where it stops.

Small networks (:func:`~ntcov.experiments.models.digits_mlp`, :func:`~ntcov.experiments.models.
digits_cnn`) are trained on scikit-learn's digits (float64) in a grid of *cells*, one factor at a
time around a baseline (plain SGD, full batch, ``η·λ₀ = 0.5``, where ``λ₀`` is the sharpness
``λ_max`` of the training loss at initialisation, :func:`ntcov.curvature.sharpness`):

- learning rate: ``η·λ₀ ∈ {0.1, 0.5, 1.0, 1.8}`` (up to the edge of stability ``η·λ_max = 2``);
- batch size: ``B ∈ {1, 8, 64}`` (and full), at a small rate ``η·λ₀ = 0.02`` so that the
  curvature bias of a noisy step is negligible next to its noise;
- optimizer: SGD, SGD + momentum 0.9 (same ``η``), Adam and AdamW (``lr = 1e-3``).

Before each step the change of ``K`` tracked properties ``x`` (the correct-class probabilities of
128 held-out images, the training loss and the held-out loss, in that order) is predicted three
ways, and after the step the actual change is measured:

1. ``plain``: Price's equation ignoring the optimizer, ``Δx = η·ntcov(x, −L) = η·rate(x, L)``
   (for minibatches: the full-batch prediction);
2. ``first_order``: metric-aware, ``Δx = J_x Δw`` with ``Δw = −M ∇L + b`` read from the
   optimizer (:func:`ntcov.predict_step`; for Adam ``M`` is built at the full-batch gradient);
3. ``second_order``: ``+ ½ Δwᵀ H_x Δw`` (``predict_step(..., order=2).total``).

For minibatch cells the step uses a random minibatch (drawn without replacement) and the
prediction carries the minibatch standard deviation, giving 95% intervals whose coverage is
measured. Full-batch cells also get a frozen-kernel forecast (:func:`ntcov.forecast`) of the
whole run, and the step at which its error passes 10% (the *forecast horizon*). The SGD cells
measure the sharpness along the run (it grows: progressive sharpening). Separate runs check loss
scaling (``L → 10 L`` scales SGD's step by 10 and leaves Adam's nearly unchanged).

Headline checks (the issue's done criteria): (a) full-batch GD with ``η·λ₀ < 1`` — first-order
R² ≥ 0.99 and the second-order term cutting the median error ≥ 10×; (a′) the same for the cells
whose *measured* ``η·λ_max(t)`` stayed below 1; (b) Spearman ≥ 0.8 between the per-step
linearity number and the realised first-order error; (c) 95% intervals covering 93–97% per
batch size; (d) Adam: metric-aware R² ≥ 0.95, against plain ntcov; (e) loss scaling.

The run writes ``report.md``, ``results.json``, ``changes.npz`` (every predicted and actual
change) and PNG plots to its output folder; partial results survive an interruption.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ntcov import properties, report
from ntcov.covariance import rate
from ntcov.curvature import hessian_vector_product, sharpness
from ntcov.data import Split, load_digits_split
from ntcov.experiments.models import digits_cnn, digits_mlp
from ntcov.forecast import forecast, forecast_error, forecast_horizon
from ntcov.params import ParamDict, select_params
from ntcov.predict import StepPrediction, predict_step
from ntcov.property import Property

__all__ = ["Cell", "CellRun", "Check", "ValidateConfig", "ValidateResult", "plan_cells", "run"]

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SGD_FAMILY = ("sgd", "momentum")
PREDICTORS = ("plain", "first_order", "second_order")
PREDICTOR_LABELS = {
    "plain": "plain η·ntcov",
    "first_order": "metric-aware 1st order",
    "second_order": "metric-aware 2nd order",
}
R2_IDEAL = 0.99  # (a): the ideal law
R2_ADAM = 0.95  # (d)
R2_NEAR = 0.95  # the "~" mark of the cell table
ERROR_RATIO_TARGET = 10.0  # (a): the second-order term cuts the median error this much
SPEARMAN_TARGET = 0.8  # (b)
COVERAGE_BAND = (0.93, 0.97)  # (c)
INTERVAL_LEVEL = 0.95
Z_INTERVAL = NormalDist().inv_cdf(0.5 + INTERVAL_LEVEL / 2)  # 1.96
FORECAST_THRESHOLD = 0.1
LOSS_SPIKE = 1.5  # a training loss above 1.5× its initial value marks a blow-up
SCALING_FACTOR = 10.0
SCALING_TOLERANCE = 0.1  # (e): the ratios within 10% of 1 (Adam) and of 10 (SGD)
Echo = Callable[[str], None]


# ----- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidateConfig:
    """Settings of ``ntcov validate`` (validated on construction); see the module docstring.

    Learning rates of the SGD cells are ``lr_scale / λ₀`` (``λ₀``: the sharpness at
    initialisation of each model). ``steps`` is the length of the MLP's full-batch cells,
    ``cnn_steps`` of the CNN's, and ``minibatch_steps`` of the minibatch cells (coverage is
    pooled over their steps). Float64 convolutions are slow on CPUs (a CNN step on all 1,438
    training images costs ~20 MLP steps), so the CNN trains on its first
    ``cnn_train_examples`` training images (``None``: all of them).
    ``minibatch_models`` lists the models that get minibatch cells, ``sharpness_models`` those
    whose SGD cells measure ``λ_max(t)`` every ``sharpness_every`` steps (warm-started power
    iteration, ``sharpness_iterations`` Hessian-vector products). ``threads`` is torch's
    intra-op thread count during the run (restored afterwards).
    """

    models: tuple[str, ...] = MODELS
    steps: int = 60
    cnn_steps: int = 30
    cnn_train_examples: int | None = 512
    minibatch_steps: int = 100
    lr_scales: tuple[float, ...] = (0.1, 0.5, 1.0, 1.8)
    baseline_lr_scale: float = 0.5
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    minibatch_lr_scale: float = 0.02
    minibatch_models: tuple[str, ...] = ("mlp",)
    optimizers: tuple[str, ...] = ("momentum", "adam", "adamw")
    momentum: float = 0.9
    adam_lr: float = 1e-3
    adamw_weight_decay: float = 0.1
    tracked_images: int = 128
    scaling_steps: int = 3
    scaling_lr_scale: float = 0.01
    forecast: bool = True
    sharpness_models: tuple[str, ...] = MODELS
    sharpness_every: int = 10
    sharpness_iterations: int = 20
    hidden: int = 64
    depth: int = 2
    channels: int = 8
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "cnn_steps", "minibatch_steps", "tracked_images", "hidden"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("sharpness_every", "sharpness_iterations", "channels", "threads"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("depth", "seed", "scaling_steps"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.cnn_train_examples is not None:
            _check_int("cnn_train_examples", self.cnn_train_examples, minimum=2)
        _check_choices("models", self.models, MODELS, allow_empty=False)
        _check_choices("minibatch_models", self.minibatch_models, MODELS)
        _check_choices("sharpness_models", self.sharpness_models, MODELS)
        _check_choices("optimizers", self.optimizers, OPTIMIZERS)
        for name in ("baseline_lr_scale", "minibatch_lr_scale", "scaling_lr_scale", "adam_lr"):
            object.__setattr__(self, name, _positive_float(name, getattr(self, name)))
        object.__setattr__(self, "lr_scales", _positive_floats("lr_scales", self.lr_scales))
        for size in self.batch_sizes:
            _check_int("batch_sizes entries", size, minimum=1)
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        _check_fraction("momentum", self.momentum)
        if not isinstance(self.forecast, bool):
            raise ValueError(
                f"ValidateConfig: forecast must be True or False, got {self.forecast!r}."
            )
        if self.adamw_weight_decay < 0 or not math.isfinite(self.adamw_weight_decay):
            raise ValueError(
                f"ValidateConfig: adamw_weight_decay must be >= 0, got {self.adamw_weight_decay!r}."
            )

    @classmethod
    def quick(cls, **overrides: Any) -> ValidateConfig:
        """The MLP only, fewer and shorter cells (well under two minutes on two cores)."""
        settings: dict[str, Any] = {
            "models": ("mlp",),
            "steps": 20,
            "minibatch_steps": 40,
            "lr_scales": (0.1, 0.5, 1.8),
            "batch_sizes": (8, 64),
            "optimizers": ("momentum", "adam"),
            "scaling_steps": 2,
            "sharpness_every": 5,
        }
        return cls(**{**settings, **overrides})

    def with_steps(self, steps: int) -> ValidateConfig:
        """The same grid with every cell (full-batch, CNN and minibatch) ``steps`` long."""
        return replace(self, steps=steps, cnn_steps=steps, minibatch_steps=steps)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ValidateConfig: {name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"ValidateConfig: {name} must be >= {minimum}, got {value}.")


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"ValidateConfig: {name} must be a finite number > 0, got {value!r}.")
    if value <= 0:
        raise ValueError(f"ValidateConfig: {name} must be > 0, got {value}.")
    return float(value)


def _positive_floats(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, tuple | list) or not values:
        raise ValueError(f"ValidateConfig: {name} must be a non-empty tuple, got {values!r}.")
    return tuple(_positive_float(f"{name} entries", v) for v in values)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"ValidateConfig: {name} must be in [0, 1), got {value!r}.")


def _check_choices(
    name: str, values: Any, choices: Sequence[str], *, allow_empty: bool = True
) -> None:
    if not isinstance(values, tuple) or (not values and not allow_empty):
        raise ValueError(f"ValidateConfig: {name} must be a non-empty tuple, got {values!r}.")
    unknown = [v for v in values if v not in choices]
    if unknown or len(set(values)) != len(values):
        raise ValueError(
            f"ValidateConfig: {name} must be distinct entries of {', '.join(choices)}; "
            f"got {values!r}."
        )


# ----- the grid of cells ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One training run: a model, an optimizer, a rate ``η·λ₀`` (SGD) and a batch size.

    ``factor`` says which sweep the cell belongs to: "baseline", "lr", "batch" or
    "optimizer". ``lr_scale`` is ``None`` for Adam and AdamW (their rate is ``adam_lr``);
    ``batch_size`` is ``None`` for full batch.
    """

    model: str
    factor: str
    optimizer: str
    lr_scale: float | None
    batch_size: int | None

    @property
    def name(self) -> str:
        rate_text = f"η·λ₀={self.lr_scale:g}" if self.lr_scale is not None else "lr=adam"
        batch = "full" if self.batch_size is None else f"B={self.batch_size}"
        return f"{self.model} {self.optimizer} {rate_text} {batch}"

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None


def plan_cells(config: ValidateConfig) -> list[Cell]:
    """The baseline, then the learning-rate, batch-size and optimizer sweeps, per model."""
    cells = []
    for model in config.models:
        base = config.baseline_lr_scale
        cells.append(Cell(model, "baseline", "sgd", base, None))
        cells += [Cell(model, "lr", "sgd", s, None) for s in config.lr_scales if s != base]
        if model in config.minibatch_models:
            scale = config.minibatch_lr_scale
            cells += [Cell(model, "batch", "sgd", scale, b) for b in config.batch_sizes]
        for name in config.optimizers:
            if name != "sgd":
                scale_or_none = base if name == "momentum" else None
                cells.append(Cell(model, "optimizer", name, scale_or_none, None))
    return cells


def steps_for(cell: Cell, config: ValidateConfig) -> int:
    """How many steps ``cell`` trains for."""
    if not cell.full_batch:
        return config.minibatch_steps
    return config.cnn_steps if cell.model == "cnn" else config.steps


# ----- models, properties and optimizers -----------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What every cell of one model shares: the data and the sharpness at initialisation."""

    name: str
    split: Split
    sharpness: float
    num_params: int


def build_model(name: str, config: ValidateConfig) -> nn.Module:
    """A fresh model (the same weights for every cell of a model: seeded by ``config.seed``)."""
    if name == "mlp":
        return digits_mlp(hidden=config.hidden, depth=config.depth, seed=config.seed)
    return digits_cnn(channels=config.channels, seed=config.seed)


def prepare_model(name: str, config: ValidateConfig) -> ModelInfo:
    """Data (images for the CNN, the first ``cnn_train_examples`` of its training images)
    and ``λ₀ = λ_max`` of the training loss at initialisation."""
    split = load_digits_split(seed=config.seed, images=name == "cnn")
    if name == "cnn" and config.cnn_train_examples is not None:
        keep = config.cnn_train_examples
        split = Split(split.x_train[:keep], split.y_train[:keep], split.x_test, split.y_test)
    if config.tracked_images > split.x_test.shape[0]:
        raise ValueError(
            f"ValidateConfig: tracked_images={config.tracked_images} exceeds the "
            f"{split.x_test.shape[0]} held-out images."
        )
    too_big = [b for b in config.batch_sizes if b >= split.x_train.shape[0]]
    if name in config.minibatch_models and too_big:
        raise ValueError(
            f"ValidateConfig: batch_sizes {too_big} are not smaller than the "
            f"{split.x_train.shape[0]} training examples of the {name}; full batch is the "
            "baseline cell."
        )
    model = build_model(name, config)
    lam = sharpness(properties.loss(model, split.x_train, split.y_train), seed=config.seed)
    count = sum(p.numel() for p in model.parameters())
    return ModelInfo(name=name, split=split, sharpness=lam, num_params=count)


@dataclass(frozen=True)
class Tracked:
    """The tracked properties of one model.

    ``combined`` is ``[K]``: the ``n`` held-out probabilities, then the training loss and the
    held-out loss. ``groups`` are the same three as separate properties (the probabilities
    keep their per-example structure, which makes the minibatch noise cheap).
    """

    combined: Property
    groups: tuple[Property, Property, Property]
    train_loss: Property
    per_example_loss: Property
    outputs: Property  # training logits [N, 10], what the loss is computed on (forecasts)


def tracked_properties(model: nn.Module, split: Split, count: int) -> Tracked:
    """The tracked properties of ``model`` (module docstring); ``count`` held-out images."""
    images, labels = split.x_test[:count], split.y_test[:count]
    cross_entropy = nn.functional.cross_entropy

    def combined(m: nn.Module) -> Tensor:
        probs = torch.softmax(m(images), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        train = cross_entropy(m(split.x_train), split.y_train).reshape(1)
        test = cross_entropy(m(split.x_test), split.y_test).reshape(1)
        return torch.cat([probs, train, test])

    train_loss = properties.loss(model, split.x_train, split.y_train)
    groups = (
        properties.probs(model, images, labels),
        train_loss,
        properties.loss(model, split.x_test, split.y_test),
    )
    return Tracked(
        combined=Property(model, combined, name="tracked"),
        groups=groups,
        train_loss=train_loss,
        per_example_loss=properties.per_example_loss(model, split.x_train, split.y_train),
        outputs=properties.logits(model, split.x_train),
    )


def learning_rate(cell: Cell, config: ValidateConfig, info: ModelInfo) -> float:
    """``η = lr_scale / λ₀`` for SGD cells; ``adam_lr`` for Adam and AdamW."""
    if cell.lr_scale is None:
        return config.adam_lr
    return cell.lr_scale / info.sharpness


def make_optimizer(
    kind: str, lr: float, config: ValidateConfig, params: Sequence[Tensor]
) -> torch.optim.Optimizer:
    """The optimizer of a cell over ``params`` (also the factory of its forecast)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.adamw_weight_decay)


@dataclass(frozen=True)
class Setup:
    """A cell ready to train: model, data, tracked properties, optimizer and its rate."""

    model: nn.Module
    split: Split
    tracked: Tracked
    optimizer: torch.optim.Optimizer
    lr: float


def build_setup(cell: Cell, config: ValidateConfig, info: ModelInfo) -> Setup:
    model = build_model(cell.model, config)
    lr = learning_rate(cell, config, info)
    return Setup(
        model=model,
        split=info.split,
        tracked=tracked_properties(model, info.split, config.tracked_images),
        optimizer=make_optimizer(cell.optimizer, lr, config, list(model.parameters())),
        lr=lr,
    )


# ----- one measured step ---------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One step, ``[K]`` arrays: the predictions made before it and the actual change.

    ``lower``/``upper`` bound the 95% interval around the second-order prediction (equal to
    it for full batch); ``train_loss`` is the loss of the batch the step was taken on.
    ``linearity`` is :attr:`ntcov.StepPrediction.linearity` (``|2nd| / |1st|`` per entry).
    ``plain_identity_error`` is ``‖force − η·rate‖ / ‖η·rate‖`` when it was checked (SGD).
    """

    actual: np.ndarray
    plain: np.ndarray
    first_order: np.ndarray
    second_order: np.ndarray
    std: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    linearity: np.ndarray
    train_loss: float
    plain_identity_error: float | None = None

    def predicted(self, predictor: str) -> np.ndarray:
        return np.asarray(getattr(self, predictor))


def _flat(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).double().cpu().numpy()


def _joined(steps: Sequence[StepPrediction], pick: Callable[[StepPrediction], Tensor]) -> Tensor:
    return torch.cat([pick(s).reshape(-1) for s in steps])


def predict(setup: Setup, cell: Cell, *, verify_plain: bool = False) -> dict[str, Any]:
    """The three predictions (and std, interval) of the tracked change over the next step.

    Full batch: one :func:`predict_step` of the combined property. Minibatch: one per group
    with ``batch_size`` and the per-example losses (``std`` and the 95% interval).

    For SGD with or without momentum the plain prediction ``η·rate(x, L)`` *is* the force
    term ``J_x(−M∇L)`` of :func:`predict_step` (``M = ηI``), so it is taken from there;
    ``verify_plain=True`` computes ``η·rate`` as well and records how far apart they are.
    For Adam and AdamW it is always ``lr·rate(x, L)``.
    """
    tracked = setup.tracked
    if cell.full_batch:
        steps = [predict_step(tracked.combined, tracked.train_loss, setup.optimizer, order=2)]
    else:
        steps = [
            predict_step(
                group,
                tracked.train_loss,
                setup.optimizer,
                order=2,
                batch_size=cell.batch_size,
                per_example_loss=tracked.per_example_loss,
            )
            for group in tracked.groups
        ]
    intervals = [s.interval(INTERVAL_LEVEL) for s in steps]
    plain, identity_error = _joined(steps, lambda s: s.force), None
    if cell.optimizer not in SGD_FAMILY or verify_plain:
        by_rate = setup.lr * rate(tracked.combined, tracked.train_loss)
        if cell.optimizer in SGD_FAMILY:
            identity_error = report.relative_error(plain, by_rate)
        plain = by_rate
    return {
        "plain": _flat(plain),
        "plain_identity_error": identity_error,
        "first_order": _flat(_joined(steps, lambda s: s.first_order)),
        "second_order": _flat(_joined(steps, lambda s: s.total)),
        "std": _flat(_joined(steps, lambda s: s.std)),
        "linearity": _flat(_joined(steps, lambda s: s.linearity)),
        "lower": _flat(torch.cat([lo.reshape(-1) for lo, _ in intervals])),
        "upper": _flat(torch.cat([hi.reshape(-1) for _, hi in intervals])),
    }


def draw_batch(cell: Cell, count: int, generator: torch.Generator) -> Tensor | None:
    """``B`` distinct example indices (``None`` for full batch)."""
    if cell.batch_size is None:
        return None
    return torch.randperm(count, generator=generator)[: cell.batch_size]


def take_step(setup: Setup, batch: Tensor | None) -> float:
    """One optimizer step on the mean cross-entropy of ``batch``; returns that loss."""
    x, y = setup.split.x_train, setup.split.y_train
    if batch is not None:
        x, y = x[batch], y[batch]
    setup.optimizer.zero_grad()
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(setup.model(x), y)
        loss.backward()
    setup.optimizer.step()
    return float(loss.detach())


def tracked_values(setup: Setup) -> np.ndarray:
    with torch.no_grad():
        return _flat(setup.tracked.combined.value())


def measure_step(
    setup: Setup, cell: Cell, generator: torch.Generator, *, verify_plain: bool = False
) -> StepRecord:
    """Predict, take one step, and measure the actual change of the tracked properties."""
    before = tracked_values(setup)
    predicted = predict(setup, cell, verify_plain=verify_plain)
    batch = draw_batch(cell, setup.split.x_train.shape[0], generator)
    loss = take_step(setup, batch)
    return StepRecord(actual=tracked_values(setup) - before, train_loss=loss, **predicted)


# ----- per-step and per-cell metrics ---------------------------------------------------------


def sign_threshold() -> float:
    """Changes at or below this (100 float64 epsilons) have no reliable sign."""
    return 100.0 * float(np.finfo(np.float64).eps)


def best_scale_r2(pred: np.ndarray, act: np.ndarray) -> float:
    """R² of ``a·pred`` with the least-squares scale ``a = pred·act / pred·pred``.

    High when the prediction has the right direction but the wrong size.
    """
    norm = float(pred @ pred)
    return report.r_squared(pred * (float(pred @ act) / norm), act) if norm > 0 else math.nan


def linearity_numbers(record: StepRecord) -> dict[str, float]:
    """The step's linearity number: the median over its ``K`` properties of
    :attr:`ntcov.StepPrediction.linearity` (``|½ Δwᵀ H_x Δw| / |J_x Δw|``); and the norm
    ratio ``‖second‖ / ‖first‖`` over the ``K`` entries, which large entries dominate."""
    first = record.first_order
    norm = float(np.linalg.norm(first))
    second = float(np.linalg.norm(record.second_order - first))
    return {
        "linearity": float(np.median(record.linearity)),
        "linearity_norm": second / norm if norm > 0 else math.inf,
    }


def step_metrics(record: StepRecord, count: int, step: int) -> dict[str, Any]:
    """Per predictor: R² over all ``K`` and over the ``count`` probabilities, relative error,
    sign agreement, best-scale R²; the linearity numbers; the interval coverage."""
    act, probs = record.actual, slice(0, count)
    metrics: dict[str, Any] = {"step": step, "train_loss": record.train_loss}
    for name in PREDICTORS:
        pred = record.predicted(name)
        metrics[name] = {
            "r2": report.r_squared(pred, act),
            "r2_probs": report.r_squared(pred[probs], act[probs]),
            "relative_error": report.relative_error(pred, act),
            "sign_agreement": report.sign_agreement(pred, act, threshold=sign_threshold()),
            "best_scale_r2": best_scale_r2(pred, act),
        }
    metrics.update(linearity_numbers(record))
    if record.plain_identity_error is not None:
        metrics["plain_identity_error"] = record.plain_identity_error
    if np.any(record.std > 0):
        inside = (act >= record.lower) & (act <= record.upper)
        metrics["coverage"] = float(np.mean(inside))
    return metrics


@dataclass
class CellRun:
    """Everything measured in one cell so far (filled step by step, so partial on interrupt)."""

    cell: Cell
    lr: float
    steps: int
    values: list[np.ndarray] = field(default_factory=list)  # [K] before each step, then after
    records: list[StepRecord] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sharpness: list[tuple[int, float]] = field(default_factory=list)  # (step, λ_max)
    forecast: dict[str, Any] | None = None
    final_accuracy: float | None = None
    wall_time_s: float = 0.0

    @property
    def completed(self) -> bool:
        return len(self.records) == self.steps

    def stacked(self, name: str) -> np.ndarray:
        """``[T, K]``: a predictor's predictions (or "actual", "std") at every step."""
        if not self.records:
            return np.zeros((0, 0))
        return np.stack([getattr(r, name) for r in self.records])


def _median(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=float)
    return float(np.nanmedian(array)) if np.isfinite(array).any() else math.nan


def _minimum(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=float)
    return float(np.nanmin(array)) if np.isfinite(array).any() else math.nan


def predictor_summary(run: CellRun, name: str, count: int) -> dict[str, Any]:
    """Medians over steps, sign agreement pooled over steps and properties, and the R² of the
    training loss's per-step changes as a series over the steps."""
    per_step = [m[name] for m in run.metrics]
    pred, act = run.stacked(name), run.stacked("actual")
    summary = {
        key: _median([m[key] for m in per_step])
        for key in ("r2", "r2_probs", "relative_error", "best_scale_r2")
    }
    summary["min_r2"] = _minimum([m["r2"] for m in per_step])
    summary["min_r2_probs"] = _minimum([m["r2_probs"] for m in per_step])
    summary["sign_agreement"] = report.sign_agreement(pred, act, threshold=sign_threshold())
    summary["train_loss_r2"] = report.r_squared(pred[:, count], act[:, count])
    return summary


def interval_summary(run: CellRun) -> dict[str, Any] | None:
    """Coverage of the 95% intervals pooled over steps and properties, and the standardised
    residuals ``z = (actual − predicted) / std`` (mean ≈ 0 and std ≈ 1 if the law holds)."""
    if run.cell.full_batch or not run.records:
        return None
    act, std = run.stacked("actual"), run.stacked("std")
    inside = (act >= run.stacked("lower")) & (act <= run.stacked("upper"))
    inside_first = np.abs(act - run.stacked("first_order")) <= Z_INTERVAL * std
    z = (act - run.stacked("second_order")) / np.where(std > 0, std, np.nan)
    return {
        "coverage": float(np.mean(inside)),
        "coverage_first_order": float(np.mean(inside_first)),
        "z_mean": float(np.nanmean(z)),
        "z_std": float(np.nanstd(z)),
        "fraction_within_1_std": float(np.nanmean(np.abs(z) <= 1.0)),
        "count": int(act.size),
    }


def summarise_cell(run: CellRun, count: int) -> dict[str, Any]:
    """The cell's row: per-predictor summaries, linearity, intervals, sharpness, forecast."""
    if not run.records:
        return {"steps_completed": 0}
    summary: dict[str, Any] = {
        "steps_completed": len(run.records),
        "predictors": {name: predictor_summary(run, name, count) for name in PREDICTORS},
        "median_linearity": _median([m["linearity"] for m in run.metrics]),
        "intervals": interval_summary(run),
        "final_train_loss": float(run.values[-1][count]),
        "final_accuracy": run.final_accuracy,
        "loss_spike_step": loss_spike_step(run, count),
    }
    if run.sharpness:
        summary["max_eta_lambda"] = max(run.lr * lam for _, lam in run.sharpness)
    if run.forecast is not None:
        summary["forecast_horizon"] = run.forecast["horizon"]
    return summary


def loss_spike_step(run: CellRun, count: int) -> int | None:
    """The first step after which the training loss exceeds ``LOSS_SPIKE`` × its initial
    value (a catapult or a blow-up), or ``None``."""
    initial = run.values[0][count]
    for step, values in enumerate(run.values[1:], start=1):
        if not values[count] <= LOSS_SPIKE * initial:  # also catches nan
            return step
    return None


# ----- sharpness along the run, and forecasts ------------------------------------------------


def power_iteration(loss: Property, vector: ParamDict, iterations: int) -> tuple[float, ParamDict]:
    """``λ_max`` of ``∇²L`` by ``iterations`` power steps from ``vector`` (warm start).

    Returns the Rayleigh quotient and the last ``H v`` (the next warm start).
    """
    estimate = 0.0
    for _ in range(iterations):
        norm = torch.stack([(v * v).sum() for v in vector.values()]).sum().sqrt()
        unit = {n: v / norm for n, v in vector.items()}
        vector = hessian_vector_product(loss, unit)
        estimate = float(sum((unit[n] * vector[n]).sum() for n in unit))
    return estimate, vector


def cell_forecast(
    cell: Cell, config: ValidateConfig, info: ModelInfo, actual: np.ndarray
) -> dict[str, Any]:
    """The frozen-kernel forecast of the tracked properties over the cell's steps (from the
    initial weights, with the cell's optimizer), its error against ``actual`` (``[T + 1, K]``)
    and the step at which the error passes 10%."""
    setup = build_setup(cell, config, info)
    tracked = setup.tracked
    factory = partial(make_optimizer, cell.optimizer, setup.lr, config)
    predicted = forecast(
        tracked.combined,
        tracked.outputs,
        info.split.y_train,
        nn.functional.cross_entropy,
        factory,
        actual.shape[0] - 1,
    )
    target = torch.as_tensor(actual, dtype=predicted.trajectory.dtype)
    error = forecast_error(predicted, target)
    return {
        "horizon": forecast_horizon(predicted, target, FORECAST_THRESHOLD),
        "threshold": FORECAST_THRESHOLD,
        "error": error.tolist(),
    }


# ----- training a cell -----------------------------------------------------------------------


def cell_seed(config: ValidateConfig, index: int) -> int:
    return config.seed * 1_000 + index


def train_cell(
    run: CellRun,
    setup: Setup,
    config: ValidateConfig,
    info: ModelInfo,
    index: int,
    on_step: Callable[[CellRun], None],
) -> None:
    """Measure ``run.steps`` steps into ``run`` (appending as it goes), then the accuracy."""
    generator = torch.Generator().manual_seed(cell_seed(config, index))
    tracks_sharpness = run.cell.optimizer == "sgd" and run.cell.full_batch
    tracks_sharpness &= run.cell.model in config.sharpness_models
    vector = _random_direction(setup.model, config.seed)
    run.values.append(tracked_values(setup))
    for step in range(run.steps):
        if tracks_sharpness and step % config.sharpness_every == 0:
            iterations = config.sharpness_iterations
            lam, vector = power_iteration(setup.tracked.train_loss, vector, iterations)
            run.sharpness.append((step, lam))
        record = measure_step(setup, run.cell, generator, verify_plain=step == 0)
        run.values.append(run.values[-1] + record.actual)
        run.records.append(record)
        run.metrics.append(step_metrics(record, config.tracked_images, step + 1))
        on_step(run)
    split = setup.split
    run.final_accuracy = _accuracy(setup.model, split.x_test, split.y_test)


def _random_direction(model: nn.Module, seed: int) -> ParamDict:
    generator = torch.Generator().manual_seed(seed)
    weights = select_params(model)
    return {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in weights.items()}


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).double().mean())


# ----- (e) loss scaling ----------------------------------------------------------------------


def scaling_run(
    kind: str, lr: float, factor: float, config: ValidateConfig, info: ModelInfo
) -> list[dict[str, np.ndarray]]:
    """``scaling_steps`` steps of ``kind`` on ``factor · L`` from the initial weights, fresh
    optimizer: per step the actual change, the metric-aware and the plain predictions."""
    model = build_model(info.name, config)
    tracked = tracked_properties(model, info.split, config.tracked_images)
    loss = factor * tracked.train_loss
    optimizer = make_optimizer(kind, lr, config, list(model.parameters()))
    steps = []
    for _ in range(config.scaling_steps):
        with torch.no_grad():
            before = tracked.combined.value()
        metric_aware = predict_step(tracked.combined, loss, optimizer).first_order
        plain = lr * rate(tracked.combined, loss)
        optimizer.zero_grad()
        with torch.enable_grad():
            value = factor * nn.functional.cross_entropy(
                model(info.split.x_train), info.split.y_train
            )
            value.backward()
        optimizer.step()
        with torch.no_grad():
            actual = tracked.combined.value() - before
        steps.append(
            {"actual": _flat(actual), "metric_aware": _flat(metric_aware), "plain": _flat(plain)}
        )
    return steps


def _norm_ratio(scaled: np.ndarray, base: np.ndarray) -> float:
    norm = float(np.linalg.norm(base))
    return float(np.linalg.norm(scaled)) / norm if norm > 0 else math.nan


def loss_scaling(config: ValidateConfig, info: ModelInfo) -> dict[str, Any]:
    """Ratios ``‖Δx(10 L)‖ / ‖Δx(L)‖`` per step for SGD and Adam: actual, metric-aware
    predicted, plain predicted (plain is bilinear, so always 10)."""
    rates = {"sgd": config.scaling_lr_scale / info.sharpness, "adam": config.adam_lr}
    result: dict[str, Any] = {"factor": SCALING_FACTOR, "model": info.name}
    for kind, lr in rates.items():
        base = scaling_run(kind, lr, 1.0, config, info)
        scaled = scaling_run(kind, lr, SCALING_FACTOR, config, info)
        result[kind] = {
            "lr": lr,
            "ratios": [
                {key: _norm_ratio(s[key], b[key]) for key in ("actual", "metric_aware", "plain")}
                for b, s in zip(base, scaled, strict=True)
            ],
        }
    return result


# ----- the headline checks (a)–(e) -----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A headline check: ``passed`` is ``None`` when the cells it needs were not run."""

    key: str
    title: str
    criterion: str
    measured: str
    passed: bool | None
    details: dict[str, Any]


def _runs_where(runs: Sequence[CellRun], keep: Callable[[Cell], bool]) -> list[CellRun]:
    return [r for r in runs if r.records and keep(r.cell)]


def _not_run(key: str, title: str, criterion: str) -> Check:
    return Check(key, title, criterion, "not measured (no such cell in this run)", None, {})


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "nan" if value is None or not math.isfinite(value) else format(value, spec)


def _tick(passed: bool) -> str:
    return "✓" if passed else "✗"


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def _gd_below_one(cell: Cell) -> bool:
    return cell.optimizer == "sgd" and cell.full_batch and (cell.lr_scale or math.inf) < 1


def _stayed_below_one(run: CellRun) -> bool:
    return bool(run.sharpness) and max(run.lr * lam for _, lam in run.sharpness) < 1


def check_a(runs: Sequence[CellRun], count: int, *, measured: bool = False) -> Check:
    """(a) Full-batch GD with ``η·λ_max < 1``: first order R² ≥ 0.99 (held-out probabilities,
    median per step; training loss, over the steps) and the second-order term cuts the median
    relative error ≥ 10×.

    ``measured=False`` takes the cells with ``η·λ₀ < 1`` (sharpness at initialisation);
    ``measured=True`` (check "a_measured") those whose sharpness, measured along the run,
    kept ``η·λ_max(t) < 1`` throughout.
    """
    key = "a_measured" if measured else "a"
    title = (
        "(a′) full-batch GD, measured η·λ_max(t) < 1 throughout"
        if measured
        else "(a) full-batch GD, η·λ₀ < 1"
    )
    criterion = (
        f"1st-order R² ≥ {R2_IDEAL} (probabilities: median per step; training loss: over "
        f"steps) and median error 1st/2nd ≥ {ERROR_RATIO_TARGET:g}"
    )
    chosen = _runs_where(runs, _gd_below_one)
    if measured:
        chosen = [r for r in chosen if _stayed_below_one(r)]
    if not chosen:
        return _not_run(key, title, criterion)
    rows = [_check_a_row(run, count) for run in chosen]
    parts = [
        f"{row['cell'].split(' full')[0]}: R²(probs) {_fmt(row['r2_probs'])} "
        f"{_tick(row['r2_probs'] >= R2_IDEAL)}, R²(train loss) {_fmt(row['r2_train_loss'])} "
        f"{_tick(row['r2_train_loss'] >= R2_IDEAL)}, error ratio "
        f"{_fmt(row['error_ratio'], '.1f')}× {_tick(row['error_ratio'] >= ERROR_RATIO_TARGET)}"
        + (f" (η·λ_max reached {row['max_eta_lambda']:.2f})" if row["max_eta_lambda"] else "")
        for row in rows
    ]
    passed = all(r["passed"] for r in rows)
    return Check(key, title, criterion, "; ".join(parts), passed, {"cells": rows})


def _check_a_row(run: CellRun, count: int) -> dict[str, Any]:
    summary = summarise_cell(run, count)["predictors"]
    first, second = summary["first_order"], summary["second_order"]
    ratio = first["relative_error"] / second["relative_error"]
    passed = (
        first["r2_probs"] >= R2_IDEAL
        and first["train_loss_r2"] >= R2_IDEAL
        and ratio >= ERROR_RATIO_TARGET
    )
    eta_lambda = max((run.lr * lam for _, lam in run.sharpness), default=None)
    return {
        "cell": run.cell.name,
        "lr_scale": run.cell.lr_scale,
        "r2_probs": first["r2_probs"],
        "min_r2_probs": first["min_r2_probs"],
        "r2_train_loss": first["train_loss_r2"],
        "r2_all": first["r2"],
        "second_order_r2_probs": second["r2_probs"],
        "error_first": first["relative_error"],
        "error_second": second["relative_error"],
        "error_ratio": ratio,
        "max_eta_lambda": eta_lambda,
        "passed": bool(passed),
    }


def linearity_points(runs: Sequence[CellRun]) -> dict[str, np.ndarray]:
    """Per step of the learning-rate sweep: the linearity numbers and the realised first-order
    relative error, and the cell's ``η·λ₀`` and model (for the scatter plot)."""
    chosen = _runs_where(runs, lambda c: c.factor in ("baseline", "lr"))
    metrics = [(run, m) for run in chosen for m in run.metrics]
    return {
        "linearity": np.array([m["linearity"] for _, m in metrics], dtype=float),
        "linearity_norm": np.array([m["linearity_norm"] for _, m in metrics], dtype=float),
        "error": np.array([m["first_order"]["relative_error"] for _, m in metrics], dtype=float),
        "lr_scale": np.array([run.cell.lr_scale for run, _ in metrics], dtype=float),
        "model": np.array([run.cell.model for run, _ in metrics]),
    }


def check_b(runs: Sequence[CellRun]) -> Check:
    """(b) Spearman(linearity number per step, realised 1st-order error) ≥ 0.8, pooled over
    the learning-rate sweep; the linearity number is the median over the step's properties of
    ``StepPrediction.linearity``. The norm-ratio aggregate is reported next to it."""
    title = "(b) linearity number ranks the failures"
    criterion = (
        "Spearman(median over properties of StepPrediction.linearity per step, realised "
        f"1st-order error) ≥ {SPEARMAN_TARGET}, pooled over the learning-rate sweep"
    )
    points = linearity_points(runs)
    if points["error"].size < 3:
        return _not_run("b", title, criterion)
    rho = report.spearman(points["linearity"], points["error"])
    norm_rho = report.spearman(points["linearity_norm"], points["error"])
    per_model = {
        model: report.spearman(
            points["linearity"][points["model"] == model],
            points["error"][points["model"] == model],
        )
        for model in sorted(set(points["model"].tolist()))
    }
    details: dict[str, Any] = {
        "spearman": rho,
        "spearman_norm_ratio": norm_rho,
        "steps": int(points["error"].size),
        "per_model": per_model,
    }
    measured = (
        f"ρ = {_fmt(rho, '.3f')} over {points['error'].size} steps ("
        + ", ".join(f"{m} {_fmt(v, '.3f')}" for m, v in per_model.items())
        + f"); with the norm ratio ‖2nd‖/‖1st‖ instead: ρ = {_fmt(norm_rho, '.3f')}"
    )
    return Check("b", title, criterion, measured, bool(rho >= SPEARMAN_TARGET), details)


def coverage_by_batch(runs: Sequence[CellRun]) -> dict[int, dict[str, float]]:
    """Interval coverage and ``z`` statistics per batch size, pooled over models."""
    result: dict[int, dict[str, float]] = {}
    for run in _runs_where(runs, lambda c: not c.full_batch):
        stats = interval_summary(run)
        size = run.cell.batch_size
        if stats is None or size is None:
            continue
        pooled = result.setdefault(size, {"count": 0})
        total = pooled["count"] + stats["count"]
        for key, value in stats.items():
            if key != "count":
                previous = pooled.get(key, 0.0)
                pooled[key] = (previous * pooled["count"] + value * stats["count"]) / total
        pooled["count"] = total
    return dict(sorted(result.items()))


def check_c(runs: Sequence[CellRun], config: ValidateConfig) -> Check:
    """(c) Minibatch SGD: the 95% intervals cover 93–97% of the actual changes, per B."""
    low, high = COVERAGE_BAND
    title = "(c) minibatch 95% intervals"
    criterion = (
        f"coverage in [{low}, {high}] per batch size (pooled over properties and steps; "
        f"η·λ₀ = {config.minibatch_lr_scale:g})"
    )
    pooled = coverage_by_batch(runs)
    if not pooled:
        return _not_run("c", title, criterion)
    passed = {b: low <= s["coverage"] <= high for b, s in pooled.items()}
    measured = "; ".join(
        f"B={b}: {s['coverage']:.3f} (z mean {s['z_mean']:+.3f}, z std {s['z_std']:.3f}) "
        f"{'✓' if passed[b] else '✗'}"
        for b, s in pooled.items()
    )
    details = {"per_batch_size": pooled, "lr_scale": config.minibatch_lr_scale}
    return Check("c", title, criterion, measured, all(passed.values()), details)


def check_d(runs: Sequence[CellRun], count: int) -> Check:
    """(d) Adam/AdamW: metric-aware per-step R² ≥ 0.95; plain ntcov's R² for comparison."""
    title = "(d) Adam: metric-aware vs plain"
    criterion = f"metric-aware 1st-order median per-step R² ≥ {R2_ADAM}"
    chosen = _runs_where(runs, lambda c: c.optimizer in ("adam", "adamw"))
    if not chosen:
        return _not_run("d", title, criterion)
    rows = []
    for run in chosen:
        summary = summarise_cell(run, count)["predictors"]
        rows.append(
            {
                "cell": run.cell.name,
                "first_order_r2": summary["first_order"]["r2"],
                "second_order_r2": summary["second_order"]["r2"],
                "plain_r2": summary["plain"]["r2"],
                "plain_best_scale_r2": summary["plain"]["best_scale_r2"],
            }
        )
    measured = "; ".join(
        f"{r['cell'].split(' lr=')[0]}: metric-aware {_fmt(r['first_order_r2'])} "
        f"(2nd order {_fmt(r['second_order_r2'])}), plain {_fmt(r['plain_r2'], '.3f')} "
        f"(best rescaled {_fmt(r['plain_best_scale_r2'], '.3f')})"
        for r in rows
    )
    passed = all(r["first_order_r2"] >= R2_ADAM for r in rows)
    return Check("d", title, criterion, measured, passed, {"cells": rows})


def check_e(scaling: dict[str, Any] | None) -> Check:
    """(e) Loss ×10: Adam's actual and predicted changes ≈ unchanged, SGD's ≈ ×10."""
    title = f"(e) loss scaling L → {SCALING_FACTOR:g}·L"
    criterion = (
        f"actual and metric-aware ratios within {SCALING_TOLERANCE:.0%} of 1 (Adam) and of "
        f"{SCALING_FACTOR:g} (SGD); plain ntcov is bilinear (always {SCALING_FACTOR:g})"
    )
    if not scaling or "adam" not in scaling or not scaling["adam"]["ratios"]:
        return _not_run("e", title, criterion)
    targets = {"sgd": SCALING_FACTOR, "adam": 1.0}
    passed, parts = True, []
    for kind, target in targets.items():
        ratios = scaling[kind]["ratios"]
        for key in ("actual", "metric_aware"):
            passed &= all(abs(r[key] / target - 1) <= SCALING_TOLERANCE for r in ratios)
        first = ratios[0]
        parts.append(
            f"{kind}: actual ×{first['actual']:.3f}, metric-aware ×{first['metric_aware']:.3f}, "
            f"plain ×{first['plain']:.3f} (step 1"
            + (f"; all {len(ratios)} steps in the details)" if len(ratios) > 1 else ")")
        )
    return Check("e", title, criterion, "; ".join(parts), bool(passed), scaling)


def all_checks(
    runs: Sequence[CellRun], scaling: dict[str, Any] | None, config: ValidateConfig
) -> list[Check]:
    count = config.tracked_images
    return [
        check_a(runs, count),
        check_a(runs, count, measured=True),
        check_b(runs),
        check_c(runs, config),
        check_d(runs, count),
        check_e(scaling),
    ]


# ----- the record of a run -------------------------------------------------------------------


@dataclass
class RunState:
    """What a run has measured so far: per-model info, the cells, the loss-scaling ratios."""

    config: ValidateConfig
    infos: dict[str, ModelInfo] = field(default_factory=dict)
    runs: list[CellRun] = field(default_factory=list)
    scaling: dict[str, Any] | None = None

    def info(self, model: str) -> ModelInfo:
        """The model's data and ``λ₀`` (computed on first use)."""
        if model not in self.infos:
            self.infos[model] = prepare_model(model, self.config)
        return self.infos[model]


@dataclass(frozen=True)
class ValidateResult:
    """What a run found and where it wrote it; ``status``: "complete", "interrupted", "failed"."""

    config: ValidateConfig
    status: str
    checks: list[Check]
    cells: list[dict[str, Any]]
    files: dict[str, Path]
    wall_time_s: float

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    def check(self, key: str) -> Check:
        return next(c for c in self.checks if c.key == key)


def cell_payload(run: CellRun, config: ValidateConfig) -> dict[str, Any]:
    """One cell in ``results.json``: its settings, summary, per-step metrics and trajectories."""
    count = config.tracked_images
    return {
        "name": run.cell.name,
        "cell": run.cell,
        "lr": run.lr,
        "steps_planned": run.steps,
        "wall_time_s": run.wall_time_s,
        "summary": summarise_cell(run, count),
        "per_step": run.metrics,
        "sharpness": [
            {"step": step, "lambda_max": lam, "eta_lambda": run.lr * lam}
            for step, lam in run.sharpness
        ],
        "forecast": run.forecast,
        "train_loss": [float(v[count]) for v in run.values],
        "held_out_loss": [float(v[count + 1]) for v in run.values],
    }


def notes(config: ValidateConfig) -> list[str]:
    """What a reader must know to read the numbers."""
    return [
        "η·λ₀ uses the sharpness λ₀ = λ_max of the training loss at initialisation; the "
        "sharpness grows during training (progressive sharpening), so the η·λ_max a run "
        "actually reaches is larger (measured every "
        f"{config.sharpness_every} steps for {', '.join(config.sharpness_models) or 'no model'}).",
        "R² is over the K tracked changes of one step (held-out probabilities and both losses); "
        "the table shows its median over the steps. The training loss's R² in (a) is over the "
        "steps (one change per step).",
        "Plain = η·ntcov(x, −L) ignores the optimizer (for Adam: lr·rate); metric-aware = "
        "predict_step (Δw = −M∇L + b from the optimizer's state). For Adam and AdamW the "
        "metric M is computed at the full-batch gradient. For SGD (with or without momentum) "
        "plain equals predict_step's force term exactly (M = ηI): it is taken from there and "
        "checked against η·rate at each cell's first step (plain_identity_error in "
        "results.json).",
        "The linearity number of a step is the median over its properties of "
        "StepPrediction.linearity = |½ΔwᵀH_xΔw| / |J_xΔw|; the norm ratio ‖2nd‖/‖1st‖ is "
        "reported next to it. A second-order term cannot see a ReLU network's kinks: where "
        "activation patterns flip, the CNN's error stays first-order-sized.",
        f"Minibatch cells use η·λ₀ = {config.minibatch_lr_scale:g} so that the curvature bias "
        "of a noisy step is negligible next to its noise (z mean ≈ 0); the intervals are the "
        "normal approximation total ± 1.96·std with std from the per-example contributions and "
        "the finite-population factor (sampling without replacement). Their forecast is "
        "skipped (a frozen-kernel forecast is a full-batch object).",
        f"Momentum uses the baseline η (effective rate η/(1 − μ) = {1 / (1 - config.momentum):g}×"
        f"); Adam and AdamW use lr = {config.adam_lr:g} (AdamW weight decay "
        f"{config.adamw_weight_decay:g}).",
        f"The CNN trains on its first {config.cnn_train_examples or 'all'} training images "
        f"and for {config.cnn_steps} steps (float64 convolutions are slow on CPUs), with "
        f"{config.channels} channels.",
        "The forecast horizon is the first step at which the frozen-kernel forecast's error "
        f"‖x_pred − x_act‖ / ‖x_act − x_act(0)‖ exceeds {FORECAST_THRESHOLD:g} (> T: never "
        "within the run).",
    ]


def results_payload(state: RunState, status: str, wall_time_s: float) -> dict[str, Any]:
    config = state.config
    return {
        "status": status,
        "wall_time_s": wall_time_s,
        "models": {
            name: {
                "sharpness_at_init": info.sharpness,
                "num_params": info.num_params,
                "train_examples": int(info.split.x_train.shape[0]),
            }
            for name, info in state.infos.items()
        },
        "tracked": {
            "count": config.tracked_images + 2,
            "order": f"P(correct class) of the first {config.tracked_images} held-out images, "
            "then the training loss, then the held-out loss",
        },
        "predictors": PREDICTOR_LABELS,
        "checks": all_checks(state.runs, state.scaling, config),
        "cells": [cell_payload(run, config) for run in state.runs],
        "loss_scaling": state.scaling,
        "notes": notes(config),
    }


def write_changes(path: Path, runs: Sequence[CellRun]) -> Path:
    """Every predicted and actual change, ``[T, K]`` per cell and quantity (``changes.npz``)."""
    arrays: dict[str, np.ndarray] = {"cell_names": np.array([r.cell.name for r in runs])}
    for i, run in enumerate(runs):
        for name in ("actual", *PREDICTORS, "std", "lower", "upper", "linearity"):
            arrays[f"cell{i:02d}_{name}"] = run.stacked(name)
    partial_path = path.with_name(path.stem + ".partial.npz")
    np.savez_compressed(partial_path, **arrays)  # type: ignore[arg-type]
    partial_path.replace(path)
    return path


# ----- report.md -----------------------------------------------------------------------------


def _mark_r2(value: float, threshold: float = R2_IDEAL) -> str:
    if not math.isfinite(value):
        return "nan"
    mark = "✓" if value >= threshold else ("~" if value >= R2_NEAR else "✗")
    return f"{value:.4f} {mark}" if value > -10 else f"{value:.3g} {mark}"


def _mark_coverage(intervals: dict[str, Any] | None) -> str:
    if intervals is None:
        return "—"
    low, high = COVERAGE_BAND
    value = intervals["coverage"]
    return f"{value:.3f} {'✓' if low <= value <= high else '✗'}"


def _horizon_text(payload: dict[str, Any]) -> str:
    forecast_result = payload["forecast"]
    if forecast_result is None:
        return "—"
    horizon = forecast_result["horizon"]
    return f"> {payload['summary']['steps_completed']}" if horizon is None else str(horizon)


def glance_rows(payload: dict[str, Any]) -> list[list[report.Cell]]:
    """One row per cell: median R² of each predictor and the worst step's first-order R²
    (with marks), coverage, forecast horizon, η·λ_max reached, and how training ended."""
    rows: list[list[report.Cell]] = []
    for cell in payload["cells"]:
        summary = cell["summary"]
        if not summary.get("steps_completed"):
            continue
        predictors = summary["predictors"]
        reached = summary.get("max_eta_lambda")
        rows.append(
            [
                cell["name"],
                summary["steps_completed"],
                *(_mark_r2(predictors[p]["r2"]) for p in PREDICTORS),
                _mark_r2(predictors["first_order"]["min_r2"]),
                _mark_coverage(summary["intervals"]),
                _horizon_text(cell),
                "—" if reached is None else f"{reached:.2f}",
                _outcome_text(summary),
            ]
        )
    return rows


def _outcome_text(summary: dict[str, Any]) -> str:
    accuracy, spike = summary.get("final_accuracy"), summary.get("loss_spike_step")
    text = "—" if accuracy is None else f"{accuracy:.0%}"
    return text if spike is None else f"{text}, spike at {spike}"


GLANCE_HEADERS = [
    "cell",
    "steps",
    "plain R²",
    "1st-order R²",
    "2nd-order R²",
    "worst step, 1st-order R²",
    "95% coverage",
    "forecast horizon",
    "η·λ_max reached",
    "held-out acc. (loss spike)",
]


def detail_rows(payload: dict[str, Any]) -> list[list[report.Cell]]:
    """Per cell: median relative error and sign agreement of each predictor."""
    rows: list[list[report.Cell]] = []
    for cell in payload["cells"]:
        predictors = cell["summary"].get("predictors")
        if predictors is None:
            continue
        errors = [_fmt(predictors[p]["relative_error"], ".2e") for p in PREDICTORS]
        signs = [_fmt(predictors[p]["sign_agreement"], ".3f") for p in PREDICTORS]
        rows.append([cell["name"], *errors, *signs])
    return rows


DETAIL_HEADERS = [
    "cell",
    "rel. error plain",
    "rel. error 1st",
    "rel. error 2nd",
    "sign agr. plain",
    "sign agr. 1st",
    "sign agr. 2nd",
]


def check_rows(checks: Sequence[Check]) -> list[list[str]]:
    return [[c.title, f"**{_verdict(c.passed)}**", c.measured, c.criterion] for c in checks]


def _left_aligned_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of text cells, every column left-aligned."""
    lines = [list(headers), [":---"] * len(headers), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def scaling_rows(scaling: dict[str, Any] | None) -> list[list[report.Cell]]:
    if not scaling:
        return []
    rows: list[list[report.Cell]] = []
    for kind in ("sgd", "adam"):
        for step, ratio in enumerate(scaling[kind]["ratios"], start=1):
            values = [f"×{ratio[k]:.4f}" for k in ("actual", "metric_aware", "plain")]
            rows.append([kind, f"{scaling[kind]['lr']:.4g}", step, *values])
    return rows


def report_markdown(payload: dict[str, Any], config: ValidateConfig, figures: list[str]) -> str:
    """``report.md``: the headline checks, the glance table, details, loss scaling, notes."""
    status = "" if payload["status"] == "complete" else f" ({payload['status'].upper()})"
    checks = [c if isinstance(c, Check) else Check(**c) for c in payload["checks"]]
    lines = [f"# ntcov validate: where Price's equation predicts real training{status}", ""]
    lines += [_setup_paragraph(payload, config), "", "## Headline checks", ""]
    lines += [
        _left_aligned_table(["check", "verdict", "measured", "criterion"], check_rows(checks))
    ]
    lines += [""]
    lines += ["## Where the ideal law holds, and where it stops holding", "", GLANCE_LEGEND, ""]
    lines += [report.format_markdown_table(GLANCE_HEADERS, glance_rows(payload)), ""]
    lines += ["Median per-step relative error ‖pred − act‖/‖act‖ and sign agreement:", ""]
    lines += [report.format_markdown_table(DETAIL_HEADERS, detail_rows(payload)), ""]
    rows = scaling_rows(payload["loss_scaling"])
    if rows:
        headers = ["optimizer", "lr", "step", "actual", "metric-aware", "plain"]
        lines += ["## Loss scaling: ‖Δx(10·L)‖ / ‖Δx(L)‖", "", SCALING_TEXT, ""]
        lines += [report.format_markdown_table(headers, rows), ""]
    lines += ["## Notes", "", *(f"- {n}" for n in payload["notes"]), ""]
    shown = ", ".join(f"`{f}`" for f in figures) if figures else "no figures (matplotlib missing)"
    lines += [
        f"Files: `results.json` (all numbers, config, versions, seed), `changes.npz` "
        f"(every predicted and actual change), {shown}."
    ]
    return "\n".join(lines) + "\n"


GLANCE_LEGEND = (
    "R²: median over steps of the per-step R² of the prediction over the K tracked changes; "
    f"✓ ≥ {R2_IDEAL}, ~ ≥ {R2_NEAR}, ✗ below; the worst step's R² shows what a median hides. "
    "η·λ_max reached: the largest sharpness measured along the run (every few steps; a "
    "blow-up between two measurements is missed). Held-out accuracy at the end, and the step "
    f"after which the training loss first exceeded {LOSS_SPIKE:g}× its initial value: after a "
    "blow-up that kills the ReLUs the network is nearly constant and the remaining steps are "
    "trivially linear, so read such a cell's median R² as 'broken at the spike'. Coverage: "
    "fraction of actual changes inside the "
    f"95% prediction interval (✓ in [{COVERAGE_BAND[0]}, {COVERAGE_BAND[1]}]; minibatch cells "
    "only). Forecast horizon: first step at which the frozen-kernel forecast's error passes "
    f"{FORECAST_THRESHOLD:.0%} (— : not forecast). In minibatch cells the per-step R² measures "
    "the noise, not the law: there the intervals are the test."
)

SCALING_TEXT = (
    "The same steps from the same initial weights with fresh optimizers, on L and on 10·L. "
    "Plain ntcov is bilinear (ratio 10 for any optimizer); Adam's update is invariant to the "
    "loss scale, and the metric-aware prediction, whose metric M is built at the scaled "
    "gradient, is not bilinear and follows it."
)


def _setup_paragraph(payload: dict[str, Any], config: ValidateConfig) -> str:
    models = "; ".join(
        f"{name}: {m['num_params']:,} weights, {m['train_examples']:,} training images, "
        f"λ₀ = {m['sharpness_at_init']:.4f}"
        for name, m in payload["models"].items()
    )
    return (
        f"scikit-learn's digits (359 held-out images), float64, seed {config.seed}. Models: "
        f"{models}. Tracked: {payload['tracked']['count']} properties "
        f"({payload['tracked']['order']}). Baseline: SGD, full batch, η·λ₀ = "
        f"{config.baseline_lr_scale:g}; one factor varied at a time. Before every step, three "
        "predictions of the change: plain η·ntcov(x, −L); metric-aware first order "
        "J_x(−M∇L + b); and with the second-order term ½ΔwᵀH_xΔw. Run time "
        f"{payload['wall_time_s']:.0f} s."
    )


# ----- plots ---------------------------------------------------------------------------------


def plot_r2_vs_lr(path: Path, runs: Sequence[CellRun], count: int) -> Path | None:
    """Per model: ``1 − median R²`` of each predictor against ``η·λ₀`` (log scale; cells whose
    training loss spiked are crossed out), and the sharpness ``η·λ_max(t)`` along the runs."""
    sweep = _runs_where(runs, lambda c: c.factor in ("baseline", "lr"))
    if not sweep:
        return None
    models = sorted({r.cell.model for r in sweep})
    fig, axes = report.new_figure(1, len(models) + 1, size=(5.0 * (len(models) + 1), 4.5))
    for ax, model in zip(axes[0], models, strict=False):
        chosen = [r for r in sweep if r.cell.model == model]
        _plot_misfit(ax, sorted(chosen, key=lambda r: r.cell.lr_scale or 0.0), count)
        _decorate(ax, f"{model}: 1 − median per-step R²", "η·λ₀", "1 − R² (log)")
    _plot_sharpness(axes[0, -1], sweep)
    fig.suptitle("Where the ideal law holds: prediction misfit against the learning rate")
    return report.save_figure(fig, path)


def _plot_misfit(ax: Any, chosen: Sequence[CellRun], count: int) -> None:
    scales = [r.cell.lr_scale for r in chosen]
    summaries = [summarise_cell(r, count) for r in chosen]
    for name in PREDICTORS:
        misfit = [max(1 - s["predictors"][name]["r2"], 1e-10) for s in summaries]
        ax.semilogy(scales, misfit, marker="o", label=PREDICTOR_LABELS[name])
    spiked = [i for i, s in enumerate(summaries) if s["loss_spike_step"] is not None]
    if spiked:
        first = [max(1 - summaries[i]["predictors"]["first_order"]["r2"], 1e-10) for i in spiked]
        ax.scatter(
            [scales[i] for i in spiked],
            first,
            marker="x",
            s=120,
            color="red",
            zorder=3,
            label="training blew up (loss spike)",
        )
    ax.axhline(1 - R2_IDEAL, color="black", linestyle=":", label=f"R² = {R2_IDEAL}")
    ax.axvline(2.0, color="grey", linestyle="--", linewidth=0.8, label="edge of stability")


def _plot_sharpness(ax: Any, sweep: Sequence[CellRun]) -> None:
    """``η·λ(t)`` with λ the largest-magnitude Hessian eigenvalue (negative after some
    blow-ups, hence the symmetric log scale)."""
    for run in sweep:
        if run.sharpness:
            steps = [s for s, _ in run.sharpness]
            values = [run.lr * lam for _, lam in run.sharpness]
            ax.plot(steps, values, marker=".", label=run.cell.name)
    ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8, label="η·λ_max = 2")
    ax.set_yscale("symlog", linthresh=0.1)
    _decorate(ax, "sharpness along the run: η·λ_max(t)", "step", "η·λ_max (symlog)")


def plot_coverage(path: Path, pooled: dict[int, dict[str, float]]) -> Path | None:
    """Coverage of the 95% intervals against ``B`` (left) and the shape of the standardised
    residuals ``z`` (right: std ≈ 1 and 68% within one std if the noise is normal)."""
    if not pooled:
        return None
    fig, axes = report.new_figure(1, 2, size=(11.0, 4.5))
    sizes = list(pooled)
    ax = axes[0, 0]
    ax.axhspan(*COVERAGE_BAND, color="C2", alpha=0.15, label=f"target {COVERAGE_BAND}")
    ax.axhline(INTERVAL_LEVEL, color="black", linestyle=":", linewidth=0.8)
    ax.plot(sizes, [pooled[b]["coverage"] for b in sizes], marker="o", label="centre: 2nd order")
    first = [pooled[b]["coverage_first_order"] for b in sizes]
    ax.plot(sizes, first, marker="s", linestyle="--", label="centre: 1st order")
    low = min(0.85, *(pooled[b]["coverage"] - 0.02 for b in sizes))
    ax.set_ylim(low, 1.0)
    _batch_axis(ax, sizes)
    _decorate(ax, "coverage of the 95% prediction intervals", "batch size B", "coverage")
    ax = axes[0, 1]
    ax.plot(sizes, [pooled[b]["z_std"] for b in sizes], marker="o", label="std of z")
    within = [pooled[b]["fraction_within_1_std"] for b in sizes]
    ax.plot(sizes, within, marker="s", label="fraction |z| ≤ 1")
    ax.axhline(1.0, color="C0", linestyle=":", linewidth=0.8)
    ax.axhline(0.6827, color="C1", linestyle=":", linewidth=0.8, label="normal: 1 and 0.683")
    _batch_axis(ax, sizes)
    _decorate(ax, "z = (actual − predicted) / std", "batch size B", "")
    fig.suptitle("Minibatch SGD: Price's equation with sampling noise")
    return report.save_figure(fig, path)


def _batch_axis(ax: Any, sizes: Sequence[int]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(sizes), [str(b) for b in sizes])
    ax.minorticks_off()


def plot_linearity(path: Path, points: dict[str, np.ndarray]) -> Path | None:
    """The per-step linearity numbers (median over properties; norm ratio) against the
    realised first-order error, log-log, coloured by ``η·λ₀``."""
    if points["error"].size < 3:
        return None
    fig, axes = report.new_figure(1, 2, size=(12.0, 5.0))
    panels = (
        ("linearity", "median over properties of |2nd| / |1st|"),
        ("linearity_norm", "‖2nd-order term‖ / ‖1st-order term‖"),
    )
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        scatter = _linearity_scatter(ax, points, key)
        rho = report.spearman(points[key], points["error"])
        _decorate(ax, f"Spearman ρ = {rho:.3f}", label, "‖1st − actual‖ / ‖actual‖")
    fig.colorbar(scatter, ax=axes[0, -1], label="η·λ₀")
    fig.suptitle("Does the linearity number flag the steps where first order fails?")
    return report.save_figure(fig, path)


def _linearity_scatter(ax: Any, points: dict[str, np.ndarray], key: str) -> Any:
    scales = points["lr_scale"]
    scatter = None
    for marker, model in zip("os^", sorted(set(points["model"].tolist())), strict=False):
        keep = points["model"] == model
        scatter = ax.scatter(
            np.clip(points[key][keep], 1e-12, None),
            np.clip(points["error"][keep], 1e-12, None),
            c=scales[keep],
            cmap="viridis",
            marker=marker,
            s=12,
            label=model,
            vmin=scales.min(),
            vmax=scales.max(),
        )
    ax.plot([1e-4, 1e2], [1e-4, 1e2], color="black", linewidth=0.7, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return scatter


def plot_adam(path: Path, run: CellRun) -> Path | None:
    """Adam: every predicted vs actual change, plain ntcov (left) and metric-aware (right)."""
    if not run.records:
        return None
    fig, axes = report.new_figure(1, 2, size=(11.0, 5.0))
    actual = run.stacked("actual")
    for ax, name in zip(axes[0], ("plain", "first_order"), strict=True):
        pred = run.stacked(name)
        report.scatter_predicted_actual(ax, pred, actual, size=4.0)
        report.add_identity_line(ax)
        r2 = report.r_squared(pred, actual)
        ax.set_title(f"{PREDICTOR_LABELS[name]} (pooled R² = {r2:.4f})")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.cell.name}: every tracked change at every step, predicted vs actual")
    return report.save_figure(fig, path)


def _decorate(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


FIGURES = ("r2_vs_lr.png", "coverage_vs_batch.png", "linearity_vs_error.png", "adam_scatter.png")


def write_figures(out: Path, state: RunState) -> list[Path]:
    """The four figures that have data; raises ``ImportError`` without matplotlib."""
    runs, count = state.runs, state.config.tracked_images
    points = linearity_points(runs)
    adam = _runs_where(runs, lambda c: c.optimizer == "adam")
    drawn = [
        plot_r2_vs_lr(out / FIGURES[0], runs, count),
        plot_coverage(out / FIGURES[1], coverage_by_batch(runs)),
        plot_linearity(out / FIGURES[2], points),
        plot_adam(out / FIGURES[3], adam[0]) if adam else None,
    ]
    return [p for p in drawn if p is not None]


# ----- the run -------------------------------------------------------------------------------


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads inside the block; the previous count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(
    config: ValidateConfig | None = None,
    out: str | Path = "ntcov-validate",
    *,
    progress: bool = True,
    echo: Echo | None = print,
) -> ValidateResult:
    """Run every cell and the loss-scaling check; write ``results.json``, ``changes.npz``,
    ``report.md`` and the figures to ``out``; print the headline checks through ``echo``.

    ``results.json`` is rewritten after every cell (``status: "running"``). On
    ``KeyboardInterrupt`` what was measured so far is written (``status: "interrupted"``) and
    returned; on any other error it is written (``status: "failed"``) and the error re-raised.
    """
    config = config if config is not None else ValidateConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state = RunState(config)
    # A diverged cell yields inf and nan; they are recorded (as null in JSON), not warned about.
    with np.errstate(all="ignore"):
        try:
            with torch_threads(config.threads):
                status = _execute(state, out, started, progress=progress)
        except Exception:
            _write_results(out, state, "failed", time.perf_counter() - started)
            raise
        payload = results_payload(state, status, time.perf_counter() - started)
        files = _write_outputs(out, state, payload, echo)
    if echo is not None:
        echo(_console_text(payload, files))
    return ValidateResult(
        config=config,
        status=status,
        checks=payload["checks"],
        cells=report.to_jsonable(payload["cells"]),
        files=files,
        wall_time_s=time.perf_counter() - started,
    )


def _execute(state: RunState, out: Path, started: float, *, progress: bool) -> str:
    """Every cell, then loss scaling, with a progress bar over all steps; returns the status."""
    config = state.config
    cells = plan_cells(config)
    total = sum(steps_for(c, config) for c in cells) + 4 * config.scaling_steps
    bar = tqdm(
        total=total,
        desc="ntcov validate",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for index, cell in enumerate(cells):
            bar.set_description(cell.name)
            _run_cell(state, cell, index, bar)
            _write_results(out, state, "running", time.perf_counter() - started)
        if config.scaling_steps > 0:
            bar.set_description("loss scaling")
            state.scaling = loss_scaling(config, state.info(config.models[0]))
            bar.update(4 * config.scaling_steps)
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        bar.close()
    return "complete"


def _run_cell(state: RunState, cell: Cell, index: int, bar: Any) -> None:
    config = state.config
    info = state.info(cell.model)
    setup = build_setup(cell, config, info)
    cell_run = CellRun(cell=cell, lr=setup.lr, steps=steps_for(cell, config))
    state.runs.append(cell_run)
    started = time.perf_counter()

    def on_step(r: CellRun) -> None:
        bar.update(1)
        bar.set_postfix(r2=f"{r.metrics[-1]['first_order']['r2']:.4f}", refresh=False)

    try:
        train_cell(cell_run, setup, config, info, index, on_step)
        if config.forecast and cell.full_batch:
            cell_run.forecast = cell_forecast(cell, config, info, np.stack(cell_run.values))
    finally:
        cell_run.wall_time_s = time.perf_counter() - started


def _write_results(out: Path, state: RunState, status: str, wall_time_s: float) -> Path:
    payload = results_payload(state, status, wall_time_s)
    return report.write_json(
        out / "results.json", payload, config=state.config, seed=state.config.seed
    )


def _write_outputs(
    out: Path, state: RunState, payload: dict[str, Any], echo: Echo | None
) -> dict[str, Path]:
    """results.json and changes.npz first (they hold everything), then figures, then report.md.

    Figures left by an earlier run are removed first, so every figure present is this run's.
    """
    config = state.config
    files = {
        "results": report.write_json(out / "results.json", payload, config=config, seed=config.seed)
    }
    files["changes"] = write_changes(out / "changes.npz", state.runs)
    for name in FIGURES:
        (out / name).unlink(missing_ok=True)
    figures: list[Path] = []
    try:
        figures = write_figures(out, state)
    except ImportError as err:
        if echo is not None:
            echo(f"figures not written: {err}")
    files.update({p.stem: p for p in figures})
    text = report_markdown(payload, config, [p.name for p in figures])
    files["report"] = out / "report.md"
    files["report"].write_text(text, encoding="utf-8")
    return files


def _console_text(payload: dict[str, Any], files: dict[str, Path]) -> str:
    checks = payload["checks"]
    parts = []
    if payload["status"] != "complete":
        parts.append(f"Run {payload['status']}; partial results:")
    parts.append(report.format_table(GLANCE_HEADERS, glance_rows(report.to_jsonable(payload))))
    parts.append("Headline checks:")
    parts += [f"  {_verdict(c.passed):4}  {c.title}: {c.measured}" for c in checks]
    folder = files["results"].parent
    parts.append(
        f"wrote {', '.join(p.name for p in files.values())} to {folder}/ "
        f"({payload['wall_time_s']:.0f} s)"
    )
    return "\n".join(parts)
