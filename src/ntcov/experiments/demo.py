"""The digits demo: Price's equation predicts each step of real training, checked step by step.

An MLP (:func:`~ntcov.experiments.models.digits_mlp`) is trained on scikit-learn's 8×8 digits by
full-batch gradient descent ``w ← w − η ∇L`` (``torch.optim.SGD``). Before each step, Price's
equation predicts the change of every tracked property ``x``:

    Δx_pred = η · ntcov(x, −L) = η · rate(x, L)          (one backward + one JVP)

and after the step the actual change ``Δx = x(w − η∇L) − x(w)`` is measured. The difference is
the curvature term ``½ η² ∇Lᵀ H_x ∇L + O(η³)``. The ``K = 360`` tracked properties are the
probability of the correct class of each of the 359 held-out images (``[359]``) and the held-out
loss (a scalar), stored in that order.

Per step: R² of the prediction over the ``K`` properties, ``‖pred − act‖ / ‖act‖`` and the sign
agreement. The run writes ``results.json``, ``summary.md`` and ``demo.png`` to its output folder.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ntcov import properties, report
from ntcov.covariance import rate
from ntcov.data import Split, load_digits_split
from ntcov.experiments.common import output_folder, torch_threads
from ntcov.experiments.models import digits_mlp
from ntcov.property import Property

__all__ = [
    "DemoConfig",
    "DemoResult",
    "StepRecord",
    "measure_step",
    "output_folder",
    "run_demo",
    "step_windows",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
R2_TARGET = 0.99
SEED_MAX = 2**64 - 1  # the largest seed torch.manual_seed accepts
WINDOW_EDGES = (10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the digits demo (validated on construction).

    The defaults (η = 0.2, 300 steps) train to ≈ 96% held-out accuracy while the first-order
    prediction keeps R² ≥ 0.99 at every step in float64 (min ≈ 0.997); at η ≥ 0.5 the first
    steps' curvature term pushes R² below 0.99, and η ≥ 1 is past the edge of stability.
    ``shown`` is the number of held-out probabilities whose trajectories are saved and plotted.
    ``threads`` is torch's intra-op thread count during the run (restored afterwards): the
    model is tiny, so one thread is as fast as two and does not stall when the cores are busy
    (two OpenMP threads sharing two busy cores can be 20× slower).
    """

    steps: int = 300
    lr: float = 0.2
    seed: int = 0
    dtype: str = "float64"
    hidden: int = 64
    depth: int = 2
    shown: int = 4
    threads: int = 1

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, minimum=1)
        _check_int("seed", self.seed, minimum=0, maximum=SEED_MAX)
        _check_int("hidden", self.hidden, minimum=1)
        _check_int("depth", self.depth, minimum=0)
        _check_int("shown", self.shown, minimum=1)
        _check_int("threads", self.threads, minimum=1)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
            raise ValueError(f"DemoConfig: lr must be a finite number > 0, got {lr!r}.")
        if lr <= 0:
            raise ValueError(f"DemoConfig: lr must be > 0, got {lr}.")
        object.__setattr__(self, "lr", float(lr))
        if self.dtype not in DTYPES:
            choices = ", ".join(repr(d) for d in DTYPES)
            raise ValueError(f"DemoConfig: unknown dtype {self.dtype!r}; choose one of {choices}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"DemoConfig: {name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"DemoConfig: {name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"DemoConfig: {name} must be <= {maximum}, got {value}.")


@dataclass(frozen=True)
class Setup:
    """The model, data, tracked properties and optimizer of one demo run."""

    model: nn.Module
    split: Split
    train_loss: Property  # scalar mean cross-entropy on the training set
    test_probs: Property  # [N_test] probability of each held-out image's correct class
    test_loss: Property  # scalar mean cross-entropy on the held-out set
    optimizer: torch.optim.Optimizer


def build_setup(config: DemoConfig) -> Setup:
    """Data split and model from ``config.seed``, the properties, and plain SGD at ``config.lr``."""
    dtype = config.torch_dtype
    split = load_digits_split(seed=config.seed, dtype=dtype)
    model = digits_mlp(hidden=config.hidden, depth=config.depth, seed=config.seed, dtype=dtype)
    return Setup(
        model=model,
        split=split,
        train_loss=properties.loss(model, split.x_train, split.y_train),
        test_probs=properties.probs(model, split.x_test, split.y_test),
        test_loss=properties.loss(model, split.x_test, split.y_test),
        optimizer=torch.optim.SGD(model.parameters(), lr=config.lr),
    )


@dataclass(frozen=True)
class StepRecord:
    """One step: the tracked values before it and their predicted and actual changes, ``[K]``."""

    before: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    train_loss: float  # before the step


def tracked_values(setup: Setup) -> Tensor:
    """The ``K`` tracked values: held-out correct-class probabilities, then the held-out loss."""
    return torch.cat([setup.test_probs.value(), setup.test_loss.value().reshape(1)])


def predicted_change(setup: Setup, lr: float) -> Tensor:
    """Price's equation for one SGD step: ``η · ntcov(x, −L_train)`` for the tracked x, ``[K]``."""
    probs_rate = rate(setup.test_probs, setup.train_loss)
    loss_rate = rate(setup.test_loss, setup.train_loss).reshape(1)
    return lr * torch.cat([probs_rate, loss_rate])


def sgd_step(setup: Setup) -> float:
    """One full-batch step of the optimizer on the training loss; returns the loss before it.

    The loss is the one the ``train_loss`` property computes (mean cross-entropy).
    """
    setup.optimizer.zero_grad()
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(setup.model(setup.split.x_train), setup.split.y_train)
        loss.backward()
    setup.optimizer.step()
    return float(loss.detach())


def measure_step(setup: Setup, lr: float) -> StepRecord:
    """Predict the tracked changes, take one SGD step, and measure what actually changed."""
    before = tracked_values(setup)
    predicted = predicted_change(setup, lr)
    train_loss = sgd_step(setup)
    actual = tracked_values(setup) - before
    return StepRecord(
        before=before.double().numpy(),
        predicted=predicted.detach().double().numpy(),
        actual=actual.double().numpy(),
        train_loss=train_loss,
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of examples whose largest output is their label."""
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).double().mean())


def accuracies(setup: Setup) -> dict[str, float]:
    split = setup.split
    return {
        "train": accuracy(setup.model, split.x_train, split.y_train),
        "test": accuracy(setup.model, split.x_test, split.y_test),
    }


# ----- the record of a run -------------------------------------------------------------------


@dataclass
class Trace:
    """Everything measured so far: initial values, per-step records and metrics."""

    initial: np.ndarray  # [K] tracked values at step 0
    sign_threshold: float  # |actual| at or below this is rounding noise for the sign
    initial_accuracy: dict[str, float]  # {"train": ..., "test": ...} before training
    records: list[StepRecord] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)

    def add(self, record: StepRecord) -> dict[str, float]:
        pred, act = record.predicted, record.actual
        metrics = {
            "step": len(self.records) + 1,
            "train_loss": record.train_loss,
            "test_loss": float(record.before[-1]),
            "r2": report.r_squared(pred, act),
            "relative_error": report.relative_error(pred, act),
            "sign_agreement": report.sign_agreement(pred, act, threshold=self.sign_threshold),
        }
        self.records.append(record)
        self.metrics.append(metrics)
        return metrics

    def stacked(self, start: int = 1, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and actual changes of steps ``start..stop`` (1-based, inclusive), [T, K]."""
        chosen = self.records[start - 1 : stop]
        if not chosen:
            empty = np.zeros((0, self.initial.size))
            return empty, empty
        return (np.stack([r.predicted for r in chosen]), np.stack([r.actual for r in chosen]))


def sign_threshold(dtype: torch.dtype) -> float:
    """Changes smaller than this (100 machine epsilons, for O(1) values) have no reliable sign."""
    return 100.0 * torch.finfo(dtype).eps


def step_windows(steps: int) -> list[tuple[str, int, int]]:
    """Summary windows ``(label, first, last)`` (1-based, inclusive): the first step, then
    ``1–10``, ``11–50``, ``51–100``, ``101–200``, ... up to ``steps``, then all steps."""
    windows = [("1", 1, 1)]
    start = 1
    for edge in (*WINDOW_EDGES, steps):
        if start > steps:
            break
        stop = min(edge, steps)
        if stop >= start and (start, stop) != (1, steps):
            windows.append((f"{start}-{stop}", start, stop))
        start = stop + 1
    if steps > 1:
        windows.append(("all", 1, steps))
    return windows


def window_summary(trace: Trace, label: str, first: int, last: int) -> dict[str, Any]:
    """Median relative error, median and min R² over the steps, sign agreement over entries."""
    metrics = trace.metrics[first - 1 : last]
    pred, act = trace.stacked(first, last)
    r2 = np.array([m["r2"] for m in metrics], dtype=float)
    return {
        "steps": label,
        "first": first,
        "last": last,
        "median_relative_error": _nan_stat(np.nanmedian, [m["relative_error"] for m in metrics]),
        "median_r2": _nan_stat(np.nanmedian, r2),
        "min_r2": _nan_stat(np.nanmin, r2),
        "sign_agreement": report.sign_agreement(pred, act, threshold=trace.sign_threshold),
    }


def _nan_stat(stat: Callable[..., Any], values: Any) -> float:
    array = np.asarray(values, dtype=float)
    return float(stat(array)) if np.isfinite(array).any() else math.nan


def summarise(trace: Trace) -> dict[str, Any]:
    """The summary table's rows and the run's verdict (min per-step R² against 0.99)."""
    steps = len(trace.records)
    if steps == 0:
        return {"windows": [], "steps_completed": 0}
    r2 = np.array([m["r2"] for m in trace.metrics], dtype=float)
    pred, act = trace.stacked()
    worst = int(np.nanargmin(r2)) + 1 if np.isfinite(r2).any() else None
    return {
        "steps_completed": steps,
        "windows": [window_summary(trace, *w) for w in step_windows(steps)],
        "min_r2": _nan_stat(np.nanmin, r2),
        "median_r2": _nan_stat(np.nanmedian, r2),
        "worst_step": worst,
        "steps_below_target": int(np.sum(~(r2 >= R2_TARGET))),
        "r2_target": R2_TARGET,
        "test_loss": {
            "initial": float(trace.initial[-1]),
            "final": float(trace.initial[-1] + act[:, -1].sum()),
            "predicted_total_change": float(pred[:, -1].sum()),
            "actual_total_change": float(act[:, -1].sum()),
        },
    }


def shown_indices(trace: Trace, count: int) -> list[int]:
    """``count`` held-out images spread over the range of their current probability."""
    current = (trace.initial + trace.stacked()[1].sum(axis=0))[:-1]
    order = np.argsort(current, kind="stable")
    picks = np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)
    return [int(order[i]) for i in picks]


def trajectories(trace: Trace, setup: Setup, count: int) -> dict[str, Any]:
    """Per-step predicted and actual changes of the held-out loss and a few probabilities."""
    pred, act = trace.stacked()
    shown = shown_indices(trace, count)
    return {
        "test_loss": {
            "initial": float(trace.initial[-1]),
            "predicted_change": pred[:, -1],
            "actual_change": act[:, -1],
        },
        "probabilities": {
            "test_index": shown,
            "label": [int(setup.split.y_test[i]) for i in shown],
            "initial": trace.initial[shown],
            "predicted_change": pred[:, shown].T,
            "actual_change": act[:, shown].T,
        },
    }


# ----- outputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoResult:
    """What a run measured and where it wrote it; ``status`` is "complete" or "interrupted"."""

    config: DemoConfig
    status: str
    summary: dict[str, Any]
    accuracy: dict[str, dict[str, float]]
    per_step: list[dict[str, float]]
    files: dict[str, Path]
    wall_time_s: float

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


def results_payload(
    trace: Trace, setup: Setup, config: DemoConfig, status: str, wall_time_s: float
) -> dict[str, Any]:
    """The content of ``results.json`` next to its config, seed and versions."""
    model = setup.model
    return {
        "status": status,
        "wall_time_s": wall_time_s,
        "model": {
            "architecture": str(model),
            "num_params": sum(p.numel() for p in model.parameters()),
        },
        "tracked": {
            "count": int(trace.initial.size),
            "order": "probability of the correct class of each held-out image, then held-out loss",
            "prediction": "lr * ntcov.rate(x, train_loss), computed before each step",
        },
        "summary": summarise(trace),
        "accuracy": {"initial": trace.initial_accuracy, "final": accuracies(setup)},
        "per_step": trace.metrics,
        "trajectories": trajectories(trace, setup, config.shown),
    }


def write_results(out: Path, payload: dict[str, Any], config: DemoConfig) -> Path:
    return report.write_json(out / "results.json", payload, config=config, seed=config.seed)


def format_summary(config: DemoConfig, payload: dict[str, Any], *, markdown: bool = False) -> str:
    """The summary table (fixed-width text, or markdown) of a results payload."""
    headers = ["steps", "median rel. error", "median R²", "min R²", "sign agreement"]
    rows = [
        [
            w["steps"],
            _fmt(w["median_relative_error"], ".2e"),
            _fmt(w["median_r2"], ".5f"),
            _fmt(w["min_r2"], ".5f"),
            _fmt(w["sign_agreement"], ".4f"),
        ]
        for w in payload["summary"]["windows"]
    ]
    if markdown:
        return report.format_markdown_table(headers, rows)
    title = (
        f"Predicted (η·ntcov(x, −L), before each step) vs actual change of "
        f"{payload['tracked']['count']} held-out properties, lr {config.lr:g}, {config.dtype}:"
    )
    return report.format_table(headers, rows, title=title)


def _fmt(value: float | None, spec: str) -> str:
    return "nan" if value is None or math.isnan(value) else format(value, spec)


def verdict_lines(payload: dict[str, Any]) -> list[str]:
    """Plain-language verdict: R² against the 0.99 target, the held-out loss, the accuracies."""
    summary, acc = payload["summary"], payload["accuracy"]
    if not summary["windows"]:
        return ["No step was completed."]
    n, below = summary["steps_completed"], summary["steps_below_target"]
    lines = [
        f"per-step R² over all {payload['tracked']['count']} properties: min "
        f"{summary['min_r2']:.5f} (step {summary['worst_step']}), median {summary['median_r2']:.6f}"
    ]
    if below == 0:
        lines.append(f"R² ≥ {R2_TARGET} at all {n} steps: Price's equation predicts every step.")
    else:
        lines.append(
            f"R² < {R2_TARGET} at {below} of {n} steps: the step's curvature term is not "
            "negligible; a smaller --lr makes the first-order prediction closer."
        )
    loss = summary["test_loss"]
    return [
        *lines,
        f"held-out loss {loss['initial']:.4f} → {loss['final']:.4f}: summed predicted change "
        f"{loss['predicted_total_change']:+.4f}, actual {loss['actual_total_change']:+.4f}.",
        f"accuracy: train {acc['final']['train']:.1%} (initially {acc['initial']['train']:.1%}),"
        f" test {acc['final']['test']:.1%} (initially {acc['initial']['test']:.1%}).",
    ]


def write_summary_md(
    out: Path, config: DemoConfig, payload: dict[str, Any], *, has_figure: bool = True
) -> Path:
    """``summary.md``: what was run, the summary table as markdown, and the verdict."""
    status = "" if payload["status"] == "complete" else f" ({payload['status'].upper()})"
    lines = [
        f"# ntcov demo: Price's equation on digits{status}",
        "",
        f"MLP ({payload['model']['num_params']} weights) trained by full-batch SGD on "
        f"scikit-learn digits: lr {config.lr:g}, {payload['summary']['steps_completed']} of "
        f"{config.steps} steps, seed {config.seed}, {config.dtype}. Before each step Price's "
        "equation predicts the change of each held-out image's correct-class probability and of "
        "the held-out loss (Δx = η·ntcov(x, −L)); after the step the actual change is measured.",
        "",
    ]
    if payload["summary"]["windows"]:
        lines += [format_summary(config, payload, markdown=True), ""]
    lines += [f"- {line}" for line in verdict_lines(payload)]
    figure = ", `demo.png` (figure)" if has_figure else " (no figure: matplotlib is missing)"
    lines += ["", f"Files: `results.json` (all numbers){figure}."]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_demo(path: Path, trace: Trace, payload: dict[str, Any]) -> Path:
    """Four panels: a few probabilities and the held-out loss (actual ``x(t)`` against
    ``x(0) + Σ pred``), every per-step change (predicted vs actual), and per-step agreement."""
    fig, axes = report.new_figure(2, 2, size=(12.0, 9.0))
    steps = np.arange(len(trace.records) + 1)
    _plot_probabilities(axes[0, 0], steps, payload["trajectories"]["probabilities"])
    _plot_loss(axes[0, 1], steps, payload["trajectories"]["test_loss"])
    _plot_scatter(axes[1, 0], trace)
    _plot_agreement(axes[1, 1], trace)
    fig.suptitle(
        "Price's equation on digits: predicted Δx = η·ntcov(x, −L) before each SGD step vs actual"
    )
    return report.save_figure(fig, path)


def _plot_probabilities(ax: Any, steps: np.ndarray, probs: dict[str, Any]) -> None:
    for i, (index, label) in enumerate(zip(probs["test_index"], probs["label"], strict=True)):
        actual, predicted = _cumulative(
            float(probs["initial"][i]), probs["actual_change"][i], probs["predicted_change"][i]
        )
        report.plot_series_pair(ax, steps, actual, predicted, label=f"image {index}, digit {label}")
    title = "P(correct class) of held-out images: x(t) vs x(0) + Σ predicted steps"
    _decorate(ax, title, "probability", legend=True)


def _plot_loss(ax: Any, steps: np.ndarray, loss: dict[str, Any]) -> None:
    actual, predicted = _cumulative(
        loss["initial"], loss["actual_change"], loss["predicted_change"]
    )
    report.plot_series_pair(ax, steps, actual, predicted, label="held-out loss", color="C3")
    summary = (
        f"after {len(steps) - 1} steps:\nactual {actual[-1]:.4f}\n"
        f"x(0) + Σ predicted {predicted[-1]:.4f}"
    )
    ax.text(0.35, 0.6, summary, transform=ax.transAxes)
    _decorate(ax, "held-out loss: x(t) vs x(0) + Σ predicted steps", "loss", legend=True)


def _plot_scatter(ax: Any, trace: Trace) -> None:
    pred, act = trace.stacked()
    report.scatter_predicted_actual(
        ax, pred[:, :-1], act[:, :-1], label="P(correct class), held-out images", size=2.0
    )
    report.scatter_predicted_actual(
        ax, pred[:, -1], act[:, -1], label="held-out loss", color="C3", size=6.0
    )
    report.add_identity_line(ax)
    ax.set_title(f"per-step change of each property at each step ({pred.size:,} points)")
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    ax.grid(alpha=0.3)


def _cumulative(start: float, actual: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    """Actual ``x(t)`` and the sum of one-step predictions ``x(0) + Σ_s pred_s``, ``[T + 1]``."""
    a, p = (
        np.concatenate([[start], start + np.cumsum(np.asarray(v))]) for v in (actual, predicted)
    )
    return a, p


def _plot_agreement(ax: Any, trace: Trace) -> None:
    steps = [m["step"] for m in trace.metrics]
    misfit = [max(1.0 - m["r2"], 1e-17) for m in trace.metrics]
    ax.semilogy(steps, misfit, label="1 − R² over all properties")
    ax.semilogy(steps, [m["relative_error"] for m in trace.metrics], label="‖pred − act‖ / ‖act‖")
    ax.axhline(1.0 - R2_TARGET, color="black", linestyle=":", label=f"R² = {R2_TARGET}")
    _decorate(ax, "per-step misfit (lower is better)", "", legend=True)


def _decorate(ax: Any, title: str, ylabel: str, *, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


# ----- the run -------------------------------------------------------------------------------


def run_demo(
    config: DemoConfig | None = None,
    out: str | Path = "ntcov-demo",
    *,
    progress: bool = True,
    echo: Echo | None = print,
) -> DemoResult:
    """Train, predicting and measuring every step; write ``results.json``, ``summary.md`` and
    ``demo.png`` to ``out``; print the summary table through ``echo`` (``None``: silent).

    ``results.json`` is rewritten about every tenth of the run (``status: "running"``). On
    ``KeyboardInterrupt`` the steps measured so far are written with ``status: "interrupted"``
    and returned (``result.interrupted``) instead of being lost.
    """
    config = config if config is not None else DemoConfig()
    out = output_folder(out)
    started = time.perf_counter()
    setup = build_setup(config)
    trace = Trace(
        initial=tracked_values(setup).double().numpy(),
        sign_threshold=sign_threshold(config.torch_dtype),
        initial_accuracy=accuracies(setup),
    )
    with torch_threads(config.threads):
        status = _train(setup, trace, config, out, started, progress=progress)
    payload = results_payload(trace, setup, config, status, time.perf_counter() - started)
    files = _write_outputs(out, trace, payload, config, echo)
    if echo is not None:
        echo(_report_text(config, payload, files))
    return DemoResult(
        config=config,
        status=status,
        summary=payload["summary"],
        accuracy=payload["accuracy"],
        per_step=trace.metrics,
        files=files,
        wall_time_s=time.perf_counter() - started,
    )


def _train(
    setup: Setup, trace: Trace, config: DemoConfig, out: Path, started: float, *, progress: bool
) -> str:
    """The training loop with a progress bar on stderr; returns the run's status."""
    checkpoint_every = max(1, config.steps // 10)
    bar = tqdm(
        range(1, config.steps + 1),
        desc="ntcov demo",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for step in bar:
            metrics = trace.add(measure_step(setup, config.lr))
            bar.set_postfix(
                loss=f"{metrics['train_loss']:.3f}", r2=f"{metrics['r2']:.5f}", refresh=False
            )
            if step % checkpoint_every == 0 and step < config.steps:
                elapsed = time.perf_counter() - started
                write_results(
                    out, results_payload(trace, setup, config, "running", elapsed), config
                )
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        bar.close()
    return "complete"


def _write_outputs(
    out: Path, trace: Trace, payload: dict[str, Any], config: DemoConfig, echo: Echo | None
) -> dict[str, Path]:
    """results.json first (it holds everything), then the figure if possible, then summary.md.

    A ``demo.png`` left by an earlier run is removed when this run cannot draw its own.
    """
    files = {"results": write_results(out, payload, config)}
    figure = out / "demo.png"
    try:
        if trace.records:
            files["figure"] = plot_demo(figure, trace, payload)
    except ImportError as err:
        if echo is not None:
            echo(f"demo.png not written: {err}")
    if "figure" not in files:
        figure.unlink(missing_ok=True)
    files["summary"] = write_summary_md(out, config, payload, has_figure="figure" in files)
    return files


def _report_text(config: DemoConfig, payload: dict[str, Any], files: dict[str, Path]) -> str:
    parts = []
    if payload["status"] != "complete":
        done = payload["summary"]["steps_completed"]
        parts.append(f"Interrupted after {done} of {config.steps} steps; partial results:")
    if payload["summary"]["windows"]:
        parts.append(format_summary(config, payload))
    parts += verdict_lines(payload)
    folder = next(iter(files.values())).parent
    parts.append(f"wrote {', '.join(p.name for p in files.values())} to {folder}/")
    return "\n".join(parts)
