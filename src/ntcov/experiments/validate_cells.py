"""``ntcov validate``: models, tracked properties, one measured step, training a cell, loss
scaling, and the per-cell summaries (coverage of the prediction intervals included)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ntcov import properties, report
from ntcov.covariance import rate
from ntcov.curvature import hessian_vector_product, sharpness
from ntcov.data import Split, load_digits_split
from ntcov.experiments.models import digits_cnn, digits_mlp
from ntcov.experiments.validate_config import (
    FORECAST_THRESHOLD,
    INTERVAL_LEVEL,
    LOSS_SPIKE,
    PREDICTORS,
    SCALING_FACTOR,
    SGD_FAMILY,
    Z_INTERVAL,
    Cell,
    ValidateConfig,
)
from ntcov.forecast import forecast, forecast_error, forecast_horizon
from ntcov.params import ParamDict, select_params
from ntcov.predict import StepPrediction, predict_step
from ntcov.property import Property

# λ₀ sets every cell's learning rate (η = scale / λ₀): Lanczos to a 1e-3 relative residual
SHARPNESS_ITERATIONS = 400

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
    return digits_cnn(channels=config.channels, seed=config.seed, activation=config.cnn_activation)


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
    loss = properties.loss(model, split.x_train, split.y_train)
    lam = sharpness(loss, seed=config.seed, iterations=SHARPNESS_ITERATIONS, tolerance=1e-6)
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
    it for full batch; :attr:`ntcov.predict.IntervalMethod.EMPIRICAL`: quantiles of the
    minibatch mean of the per-example contributions); ``train_loss`` is the loss of the batch
    the step was taken on.
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
                # each example's own curvature (B = 1) for the held-out probabilities; for the
                # two losses it would cost N nested JVPs over the whole training set per step
                own_curvature=index == 0,
            )
            for index, group in enumerate(tracked.groups)
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
    residuals ``z = (actual − predicted) / std`` (mean ≈ 0 and std ≈ 1 if the law holds).

    ``coverage`` is that of the recorded (empirical) intervals; ``coverage_normal`` that of the
    normal ones ``second_order ± 1.96·std``, for comparison; ``coverage_first_order`` the normal
    ones centred on the first-order prediction."""
    if run.cell.full_batch or not run.records:
        return None
    act, std = run.stacked("actual"), run.stacked("std")
    inside = (act >= run.stacked("lower")) & (act <= run.stacked("upper"))
    inside_normal = np.abs(act - run.stacked("second_order")) <= Z_INTERVAL * std
    inside_first = np.abs(act - run.stacked("first_order")) <= Z_INTERVAL * std
    z = (act - run.stacked("second_order")) / np.where(std > 0, std, np.nan)
    return {
        "coverage": float(np.mean(inside)),
        "coverage_normal": float(np.mean(inside_normal)),
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
