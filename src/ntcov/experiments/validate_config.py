"""``ntcov validate``: the constants, the validated configuration and the grid of cells."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

from ntcov.experiments.models import CNN_ACTIVATIONS

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
SEED_MAX = (2**64 - 1) // 1_000 - 1  # cell seeds are seed·1000 + index, within torch's range


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
    intra-op thread count during the run (restored afterwards). ``cnn_activation`` is the CNN's
    nonlinearity: ``"tanh"`` (smooth, like the MLP's) or ``"relu"``, whose kinks the
    second-order term cannot see (its Hessian is zero between them), so the second-order check
    (a) does not apply to it: measured at ``η·λ₀ = 0.1`` it cuts the median error 2.6×, not 10×.
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
    cnn_activation: str = "tanh"
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "cnn_steps", "minibatch_steps", "tracked_images", "hidden"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("sharpness_every", "sharpness_iterations", "channels", "threads"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("depth", "seed", "scaling_steps"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.seed > SEED_MAX:
            raise ValueError(f"ValidateConfig: seed must be <= {SEED_MAX}, got {self.seed}.")
        if self.cnn_train_examples is not None:
            _check_int("cnn_train_examples", self.cnn_train_examples, minimum=2)
        _check_choices("models", self.models, MODELS, allow_empty=False)
        _check_choices("minibatch_models", self.minibatch_models, MODELS)
        _check_choices("sharpness_models", self.sharpness_models, MODELS)
        _check_choices("optimizers", self.optimizers, OPTIMIZERS)
        if self.cnn_activation not in CNN_ACTIVATIONS:
            raise ValueError(
                f"ValidateConfig: cnn_activation must be one of {sorted(CNN_ACTIVATIONS)}, got "
                f"{self.cnn_activation!r}."
            )
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
