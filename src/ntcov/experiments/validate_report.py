"""``ntcov validate``: ``results.json`` payload, ``changes.npz``, ``report.md`` tables and plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntcov import report
from ntcov.experiments.validate_cells import (
    CellRun,
    RunState,
    summarise_cell,
)
from ntcov.experiments.validate_checks import (
    Check,
    _fmt,
    _runs_where,
    all_checks,
    coverage_by_batch,
    linearity_points,
)
from ntcov.experiments.validate_config import (
    COVERAGE_BAND,
    FORECAST_THRESHOLD,
    INTERVAL_LEVEL,
    LOSS_SPIKE,
    PREDICTOR_LABELS,
    PREDICTORS,
    R2_IDEAL,
    R2_NEAR,
    ValidateConfig,
)


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


def _model_notes(config: ValidateConfig) -> list[str]:
    if "cnn" not in config.models:
        return []
    smooth = config.cnn_activation != "relu"
    return [
        f"The CNN's activation is {config.cnn_activation} (cnn_activation). The second-order "
        "term ½ΔwᵀH_xΔw assumes a smooth network: "
        + (
            "with ReLU its Hessian is zero between the kinks, so where activation patterns "
            "flip the error stays first-order-sized; ValidateConfig(cnn_activation='relu') "
            "shows it."
            if smooth
            else "with ReLU, as here, its Hessian is zero between the kinks, so where "
            "activation patterns flip the error stays first-order-sized."
        )
    ]


def notes(config: ValidateConfig) -> list[str]:
    """What a reader must know to read the numbers."""
    return [
        *_model_notes(config),
        "η·λ₀ uses the sharpness λ₀ = λ_max of the training loss at initialisation; the "
        "sharpness grows during training (progressive sharpening), so the η·λ_max a run "
        "actually reaches is larger (measured every "
        f"{config.sharpness_every} steps for {', '.join(config.sharpness_models) or 'no model'}).",
        "η·λ_max reached is measured for the full-batch SGD cells only (— elsewhere).",
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
        "reported next to it.",
        f"Minibatch cells use η·λ₀ = {config.minibatch_lr_scale:g} so that the curvature bias "
        "of a noisy step is negligible next to its noise (z mean ≈ 0); the intervals are the "
        "2.5% and 97.5% quantiles of the minibatch mean of the per-example contributions "
        "(exact at B = 1, from 2000 simulated minibatches drawn without replacement for B > 1), "
        "shifted by the bias and second-order terms; the normal ones, total ± 1.96·std with std "
        "from the per-example contributions and the finite-population factor, are reported "
        "next to them. Their forecast is "
        "skipped (a frozen-kernel forecast is a full-batch object).",
        f"Momentum uses the baseline η (effective rate η/(1 − μ) = {1 / (1 - config.momentum):g}×"
        f", a larger step with a larger second-order part); Adam and AdamW (the cells marked "
        f"lr=adam) use lr = {config.adam_lr:g} (AdamW weight decay "
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
    with report.atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
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
    return [[c.title, f"**{c.verdict}**", c.measured, c.criterion] for c in checks]


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
    "R²: median over steps of the per-step R² of the prediction over the K tracked changes "
    "(probabilities and both losses; check (a) takes the probabilities alone, so its R² "
    "differs); "
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
    ax.plot(sizes, [pooled[b]["coverage"] for b in sizes], marker="o", label="empirical")
    normal = [pooled[b]["coverage_normal"] for b in sizes]
    ax.plot(sizes, normal, marker="^", linestyle="-.", label="normal, centre: 2nd order")
    first = [pooled[b]["coverage_first_order"] for b in sizes]
    ax.plot(sizes, first, marker="s", linestyle="--", label="normal, centre: 1st order")
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
