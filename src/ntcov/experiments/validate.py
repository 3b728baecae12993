"""``ntcov validate``: where Price's equation predicts real training steps, and where it stops.

Small networks (:func:`~ntcov.experiments.models.digits_mlp`, :func:`~ntcov.experiments.models.
digits_cnn`, both with tanh: smooth, so that second-order terms exist; ``cnn_activation="relu"``
shows what ReLU's kinks do to them) are trained on scikit-learn's digits (float64) in a grid of
*cells*, one factor at a time around a baseline (plain SGD, full batch, ``η·λ₀ = 0.5``, where
``λ₀`` is the sharpness ``λ_max`` of the training loss at initialisation,
:func:`ntcov.curvature.sharpness`):

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
prediction carries the per-example contributions, giving 95% intervals (their empirical
quantiles, :class:`ntcov.predict.IntervalMethod`) whose coverage is measured, next to that of the
normal intervals ``± 1.96·std``. Full-batch cells also get a frozen-kernel forecast
(:func:`ntcov.forecast`) of the whole run, and the step at which its error passes 10% (the
*forecast horizon*). The SGD cells measure the sharpness along the run (it grows: progressive
sharpening). Separate runs check loss scaling (``L → 10 L`` scales SGD's step by 10 and leaves
Adam's nearly unchanged).

Headline checks (the issue's done criteria): (a) full-batch GD with ``η·λ₀ < 1`` — first-order
R² ≥ 0.99 and the second-order term cutting the median error ≥ 10×; (a′) the same for the cells
whose *measured* ``η·λ_max(t)`` stayed below 1; (b) Spearman ≥ 0.8 between the per-step
linearity number and the realised first-order error; (c) 95% intervals covering 93–97% per
batch size; (d) Adam: metric-aware R² ≥ 0.95, against plain ntcov; (e) loss scaling.

The run writes ``report.md``, ``results.json``, ``changes.npz`` (every predicted and actual
change) and PNG plots to its output folder; partial results survive an interruption. Every file
is written atomically (to a temporary name, then renamed), and each finished cell is saved to
``cells/`` as it finishes (:mod:`~ntcov.experiments.validate_store`): ``resume=True``
(``ntcov validate --resume``) skips the cells an earlier run in the same folder finished with the
same configuration, and gives the same results as an uninterrupted run.

Layout: :mod:`~ntcov.experiments.validate_config` (constants, configuration, the grid of cells),
:mod:`~ntcov.experiments.validate_cells` (models, one measured step, training a cell, loss scaling,
per-cell summaries), :mod:`~ntcov.experiments.validate_checks` (the headline checks),
:mod:`~ntcov.experiments.validate_report` (results payload, ``report.md``, plots), and this module
(running everything and writing the outputs).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ntcov import report
from ntcov.experiments import validate_store as store
from ntcov.experiments.common import torch_threads
from ntcov.experiments.validate_cells import (
    CellRun,
    RunState,
    StepRecord,
    build_setup,
    cell_forecast,
    loss_scaling,
    measure_step,
    prepare_model,
    train_cell,
)
from ntcov.experiments.validate_checks import (
    Check,
)
from ntcov.experiments.validate_config import (
    Cell,
    Echo,
    ValidateConfig,
    plan_cells,
    steps_for,
)
from ntcov.experiments.validate_report import (
    FIGURES,
    GLANCE_HEADERS,
    glance_rows,
    report_markdown,
    results_payload,
    write_changes,
    write_figures,
)

__all__ = [
    "FIGURES",
    "Cell",
    "CellRun",
    "Check",
    "StepRecord",
    "ValidateConfig",
    "ValidateResult",
    "measure_step",
    "plan_cells",
    "prepare_model",
    "run",
    "steps_for",
]


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


# ----- the run -------------------------------------------------------------------------------


def run(
    config: ValidateConfig | None = None,
    out: str | Path = "ntcov-validate",
    *,
    progress: bool = True,
    echo: Echo | None = print,
    resume: bool = False,
) -> ValidateResult:
    """Run every cell and the loss-scaling check; write ``results.json``, ``changes.npz``,
    ``report.md`` and the figures to ``out``; print the headline checks through ``echo``.

    ``results.json`` is rewritten after every cell (``status: "running"``) and each finished cell
    is saved to ``out/cells/``. With ``resume=True`` the cells saved there by an earlier run with
    the same configuration are loaded instead of measured again (the others are measured);
    without it they are removed first. On ``KeyboardInterrupt`` what was measured so far is
    written (``status: "interrupted"``) and returned; on any other error it is written
    (``status: "failed"``) and the error re-raised.
    """
    config = config if config is not None else ValidateConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        store.clear(out)
    started = time.perf_counter()
    state = RunState(config)
    # A diverged cell yields inf and nan; they are recorded (as null in JSON), not warned about.
    with np.errstate(all="ignore"):
        try:
            with torch_threads(config.threads):
                status = _execute(state, out, started, progress=progress, resume=resume)
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


def _execute(state: RunState, out: Path, started: float, *, progress: bool, resume: bool) -> str:
    """Every cell, then loss scaling, with a progress bar over all steps; returns the status.

    Each finished cell (and the loss scaling) is saved to ``out/cells/``; with ``resume`` the
    ones saved with the same configuration are loaded instead of measured.
    """
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
            identity = store.fingerprint(config, cell, index)
            state.info(cell.model)  # the model's data and λ₀, in the same order on resume
            stored = store.load_cell(out, index, cell, identity) if resume else None
            if stored is not None:
                state.runs.append(stored)
                bar.update(stored.steps)
            else:
                store.save_cell(out, index, _run_cell(state, cell, index, bar), identity)
            _write_results(out, state, "running", time.perf_counter() - started)
        if config.scaling_steps > 0:
            bar.set_description("loss scaling")
            state.scaling = _scaling(state, out, resume=resume)
            bar.update(4 * config.scaling_steps)
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        bar.close()
    return "complete"


def _scaling(state: RunState, out: Path, *, resume: bool) -> dict[str, Any]:
    """The loss-scaling ratios: loaded from ``out/cells/`` on resume if stored, else measured
    and stored."""
    config = state.config
    identity = store.fingerprint(config, None, -1)
    stored = store.load_scaling(out, identity) if resume else None
    if stored is not None:
        return stored
    scaling = loss_scaling(config, state.info(config.models[0]))
    store.save_scaling(out, scaling, identity)
    return scaling


def _run_cell(state: RunState, cell: Cell, index: int, bar: Any) -> CellRun:
    """Measure one cell into ``state.runs`` (partial if interrupted) and return it."""
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
    return cell_run


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
    files["report"] = report.atomic_write(out / "report.md", text)
    return files


def _console_text(payload: dict[str, Any], files: dict[str, Path]) -> str:
    checks = payload["checks"]
    parts = []
    if payload["status"] != "complete":
        parts.append(f"Run {payload['status']}; partial results:")
    parts.append(report.format_table(GLANCE_HEADERS, glance_rows(report.to_jsonable(payload))))
    parts.append("Headline checks:")
    parts += [f"  {c.verdict:7}  {c.title}: {c.measured}" for c in checks]
    folder = files["results"].parent
    parts.append(
        f"wrote {', '.join(p.name for p in files.values())} to {folder}/ "
        f"({payload['wall_time_s']:.0f} s)"
    )
    return "\n".join(parts)
