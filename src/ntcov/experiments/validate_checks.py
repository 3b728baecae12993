"""``ntcov validate``: the headline checks (a)–(e) over the measured cells."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ntcov import report
from ntcov.experiments.validate_cells import (
    CellRun,
    interval_summary,
    summarise_cell,
)
from ntcov.experiments.validate_config import (
    COVERAGE_BAND,
    ERROR_RATIO_TARGET,
    R2_ADAM,
    R2_IDEAL,
    SCALING_FACTOR,
    SCALING_TOLERANCE,
    SPEARMAN_TARGET,
    Cell,
    ValidateConfig,
)

# ----- the headline checks (a)–(e) -----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A headline check: ``passed`` is ``None`` when the cells it needs were not run.

    A ``context`` check is shown beside a criterion to explain it, not judged: its verdict
    reads "context" whatever ``passed`` says.
    """

    key: str
    title: str
    criterion: str
    measured: str
    passed: bool | None
    details: dict[str, Any]
    context: bool = False

    @property
    def verdict(self) -> str:
        """PASS, FAIL, n/a (not run) or context."""
        return "context" if self.context and self.passed is not None else _verdict(self.passed)


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
        "(a′) full-batch GD, measured η·λ_max(t) < 1 throughout (the criterion)"
        if measured
        else "(a) context: full-batch GD with η·λ₀ < 1 at initialisation; runs sharpen past "
        "η·λ_max = 1, so this is not the criterion (see a′)"
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
    details = {"cells": rows}
    return Check(key, title, criterion, "; ".join(parts), passed, details, context=not measured)


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
        f"B={b}: {s['coverage']:.3f} (normal {s['coverage_normal']:.3f}, "
        f"z mean {s['z_mean']:+.3f}, z std {s['z_std']:.3f}) "
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
