"""``ntcov validate``: the quick grid run once, its files, its headline numbers, and the pieces.

The quick mode (MLP only, 20-step full-batch cells, 40-step minibatch cells) takes about half a
minute on two cores. The thresholds are the issue's, where they hold at that size:

- (a) holds at ``η·λ₀ = 0.1``. At ``η·λ₀ = 0.5`` it does not: the sharpness grows during
  training (``η·λ_max`` reaches ≈ 3.4 by step 12), and the first-order R² of the held-out
  probabilities is ≈ 0.98; the second-order prediction still has R² ≥ 0.99. The test checks
  that, and that (a′) — the cells whose *measured* ``η·λ_max`` stayed below 1 — passes.
- (c) is checked in the brief's wider band [0.9, 0.99] (40 steps of one shared minibatch per
  step give a noisy pooled estimate); the quick run measures 0.960 (B = 8) and 0.931 (B = 64).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ntcov import cli, report
from ntcov.experiments import validate, validate_cells
from ntcov.experiments.validate import Cell, ValidateConfig, plan_cells

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[validate.ValidateResult, Path]:
    out = tmp_path_factory.mktemp("validate-quick")
    return validate.run(ValidateConfig.quick(), out, progress=False, echo=None), out


def _cell(result: validate.ValidateResult, name: str) -> dict[str, Any]:
    return next(c for c in result.cells if c["name"] == name)


def _predictors(result: validate.ValidateResult, name: str) -> dict[str, Any]:
    return _cell(result, name)["summary"]["predictors"]


# ----- files ---------------------------------------------------------------------------------


def test_quick_run_writes_report_results_changes_and_figures(quick_run: Any) -> None:
    result, out = quick_run
    expected = {"results.json", "changes.npz", "report.md", "cells", *validate.FIGURES}
    assert {p.name for p in out.iterdir()} == expected
    for figure in validate.FIGURES:
        assert (out / figure).read_bytes()[:8] == PNG
    assert result.status == "complete" and not result.interrupted


def test_results_json_has_config_versions_seed_and_every_cell(quick_run: Any) -> None:
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    config = ValidateConfig.quick()
    assert data["status"] == "complete" and data["seed"] == 0
    assert set(data["versions"]) == {"python", "torch", "numpy", "ntcov"}
    assert data["config"]["models"] == ["mlp"] and data["config"]["steps"] == 20
    names = [c["name"] for c in data["cells"]]
    assert names == [c.name for c in plan_cells(config)]
    for cell in data["cells"]:
        assert len(cell["per_step"]) == cell["steps_planned"] == cell["summary"]["steps_completed"]
        assert len(cell["train_loss"]) == cell["steps_planned"] + 1
    assert data["models"]["mlp"]["sharpness_at_init"] > 0
    assert [c["key"] for c in data["checks"]] == ["a", "a_measured", "b", "c", "d", "e"]


def test_changes_npz_holds_every_prediction(quick_run: Any) -> None:
    result, out = quick_run
    with np.load(out / "changes.npz") as changes:
        assert list(changes["cell_names"]) == [c["name"] for c in result.cells]
        actual = changes["cell00_actual"]
        assert actual.shape == (20, 130)
        assert changes["cell00_second_order"].shape == actual.shape
        # The baseline's first-order prediction is close to what happened.
        assert report.r_squared(changes["cell00_first_order"][0], actual[0]) > 0.99


def test_report_has_the_glance_table_and_the_verdicts(quick_run: Any) -> None:
    _, out = quick_run
    text = (out / "report.md").read_text()
    assert "| check | verdict | measured | criterion |" in text
    assert "| cell | steps | plain R² | 1st-order R² | 2nd-order R² |" in text
    assert "**PASS**" in text and "✓" in text and "✗" in text
    assert "metric M is computed at the full-batch gradient" in text
    assert "mlp adam lr=adam full" in text


# ----- the headline numbers ------------------------------------------------------------------


def test_a_first_order_holds_below_the_sharpness_limit(quick_run: Any) -> None:
    result, _ = quick_run
    row = next(r for r in result.check("a").details["cells"] if r["lr_scale"] == 0.1)
    assert row["r2_probs"] >= 0.99 and row["r2_train_loss"] >= 0.99
    assert row["error_ratio"] >= 10
    assert row["max_eta_lambda"] < 1
    measured = result.check("a_measured")
    assert measured.passed is True
    assert [r["lr_scale"] for r in measured.details["cells"]] == [0.1]


def test_a_at_half_the_limit_fails_because_the_network_sharpens(quick_run: Any) -> None:
    """The honest result at η·λ₀ = 0.5: λ_max grows past 2/η, first order drops below 0.99,
    second order still predicts each step."""
    result, _ = quick_run
    row = next(r for r in result.check("a").details["cells"] if r["lr_scale"] == 0.5)
    assert row["max_eta_lambda"] > 2
    assert row["r2_probs"] < 0.99
    assert row["second_order_r2_probs"] >= 0.99
    assert row["error_ratio"] >= 10
    assert result.check("a").passed is False
    assert result.check("a").verdict == "context"  # shown beside (a′), never a FAIL row
    assert result.check("a_measured").verdict == "PASS"


def test_b_linearity_number_ranks_the_first_order_failures(quick_run: Any) -> None:
    result, _ = quick_run
    check = result.check("b")
    assert check.details["spearman"] >= 0.8
    assert check.passed is True


def test_c_minibatch_intervals_cover_about_95_percent(quick_run: Any) -> None:
    result, _ = quick_run
    pooled = result.check("c").details["per_batch_size"]
    assert set(pooled) == {8, 64}
    for stats in pooled.values():
        assert 0.9 <= stats["coverage"] <= 0.99
        assert 0.9 <= stats["coverage_normal"] <= 0.99  # the normal intervals, for comparison
        assert abs(stats["z_mean"]) < 0.1 and 0.8 < stats["z_std"] < 1.2


def test_d_adam_needs_the_metric(quick_run: Any) -> None:
    result, _ = quick_run
    (row,) = result.check("d").details["cells"]
    assert row["first_order_r2"] >= 0.95
    assert row["plain_r2"] < 0.5
    assert result.check("d").passed is True


def test_e_loss_scaling_is_invisible_to_adam_and_linear_for_sgd(quick_run: Any) -> None:
    result, _ = quick_run
    scaling = result.check("e").details
    for ratio in scaling["adam"]["ratios"]:
        assert ratio["actual"] == pytest.approx(1.0, rel=0.05)
        assert ratio["metric_aware"] == pytest.approx(1.0, rel=0.05)
        assert ratio["plain"] == pytest.approx(10.0, rel=1e-6)
    for ratio in scaling["sgd"]["ratios"]:
        assert ratio["actual"] == pytest.approx(10.0, rel=0.05)
        assert ratio["metric_aware"] == pytest.approx(10.0, rel=0.05)
    assert result.check("e").passed is True


def test_momentum_needs_the_bias_term(quick_run: Any) -> None:
    result, _ = quick_run
    predictors = _predictors(result, "mlp momentum η·λ₀=0.5 full")
    assert predictors["first_order"]["r2"] > predictors["plain"]["r2"] + 0.3
    assert predictors["second_order"]["r2"] > predictors["first_order"]["r2"]


def test_edge_of_stability_breaks_every_predictor(quick_run: Any) -> None:
    result, _ = quick_run
    cell = _cell(result, "mlp sgd η·λ₀=1.8 full")
    assert all(p["r2"] < 0.9 for p in cell["summary"]["predictors"].values())
    assert cell["forecast"]["horizon"] is not None and cell["forecast"]["horizon"] <= 3
    assert cell["summary"]["loss_spike_step"] is not None


def test_plain_prediction_is_the_force_term_for_sgd(quick_run: Any) -> None:
    """For SGD the plain prediction is taken from predict_step's force (M = ηI); the first
    step of every SGD cell checks it against η·rate."""
    result, _ = quick_run
    for cell in result.cells:
        if cell["cell"]["optimizer"] in ("sgd", "momentum"):
            assert cell["per_step"][0]["plain_identity_error"] < 1e-12
        else:
            assert "plain_identity_error" not in cell["per_step"][0]


# ----- interruption and failure --------------------------------------------------------------


def _tiny(**overrides: Any) -> ValidateConfig:
    settings: dict[str, Any] = {
        "models": ("mlp",),
        "steps": 3,
        "lr_scales": (0.5,),
        "batch_sizes": (),
        "optimizers": (),
        "scaling_steps": 0,
        "forecast": False,
        "sharpness_models": (),
    }
    return ValidateConfig(**{**settings, **overrides})


def test_interrupted_run_keeps_what_was_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step, calls = validate.measure_step, []

    def interrupt_third(*args: Any, **kwargs: Any) -> validate.StepRecord:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(validate_cells, "measure_step", interrupt_third)  # train_cell's
    result = validate.run(_tiny(lr_scales=(0.5, 0.1)), tmp_path, progress=False, echo=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert result.interrupted and data["status"] == "interrupted"
    assert [c["summary"]["steps_completed"] for c in data["cells"]] == [2]
    assert "INTERRUPTED" in (tmp_path / "report.md").read_text()
    with np.load(tmp_path / "changes.npz") as changes:
        assert changes["cell00_actual"].shape == (2, 130)


def test_a_failing_run_writes_its_partial_results_and_reraises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(validate, "cell_forecast", broken)
    with pytest.raises(RuntimeError, match="boom"):
        validate.run(_tiny(forecast=True), tmp_path, progress=False, echo=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "failed" and data["cells"][0]["summary"]["steps_completed"] == 3


def test_run_restores_torch_threads(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        validate.run(_tiny(steps=1), tmp_path, progress=False, echo=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# ----- configuration and grid ----------------------------------------------------------------


def test_full_grid_sweeps_one_factor_at_a_time() -> None:
    cells = plan_cells(ValidateConfig())
    assert [c.name for c in cells if c.model == "mlp"] == [
        "mlp sgd η·λ₀=0.5 full",
        "mlp sgd η·λ₀=0.1 full",
        "mlp sgd η·λ₀=1 full",
        "mlp sgd η·λ₀=1.8 full",
        "mlp sgd η·λ₀=0.02 B=1",
        "mlp sgd η·λ₀=0.02 B=8",
        "mlp sgd η·λ₀=0.02 B=64",
        "mlp momentum η·λ₀=0.5 full",
        "mlp adam lr=adam full",
        "mlp adamw lr=adam full",
    ]
    assert {c.factor for c in cells if c.model == "cnn"} == {"baseline", "lr", "optimizer"}
    assert cells[0] == Cell("mlp", "baseline", "sgd", 0.5, None)


def test_steps_per_cell_and_with_steps() -> None:
    config = ValidateConfig()
    mlp, cnn = Cell("mlp", "lr", "sgd", 0.1, None), Cell("cnn", "lr", "sgd", 0.1, None)
    batch = Cell("mlp", "batch", "sgd", 0.02, 8)
    assert [validate.steps_for(c, config) for c in (mlp, cnn, batch)] == [60, 30, 100]
    short = config.with_steps(5)
    assert [validate.steps_for(c, short) for c in (mlp, cnn, batch)] == [5, 5, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"models": ("mlp", "resnet")}, "models must be distinct entries of mlp, cnn"),
        ({"models": ()}, "models must be a non-empty tuple"),
        ({"models": "mlp"}, "models must be a non-empty tuple"),
        ({"optimizers": ("lbfgs",)}, "optimizers must be distinct entries"),
        ({"lr_scales": ()}, "lr_scales must be a non-empty tuple"),
        ({"lr_scales": (0.1, -1.0)}, "lr_scales entries must be > 0"),
        ({"baseline_lr_scale": math.nan}, "baseline_lr_scale must be a finite number"),
        ({"batch_sizes": (0,)}, "batch_sizes entries must be >= 1"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"adamw_weight_decay": -0.1}, "adamw_weight_decay must be >= 0"),
        ({"forecast": "yes"}, "forecast must be True or False"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"cnn_activation": "sigmoid"}, r"cnn_activation must be one of \['relu', 'tanh'\]"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ValidateConfig(**kwargs)


def test_too_many_tracked_images_is_refused() -> None:
    with pytest.raises(ValueError, match="tracked_images=400 exceeds the 359 held-out images"):
        validate.prepare_model("mlp", ValidateConfig(tracked_images=400))


# ----- report helpers ------------------------------------------------------------------------


def test_ranks_average_ties() -> None:
    np.testing.assert_array_equal(report.ranks([3.0, 1.0, 2.0]), [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(report.ranks([1.0, 2.0, 2.0, 5.0]), [1.0, 2.5, 2.5, 4.0])


def test_spearman() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert report.spearman(x, x**3) == pytest.approx(1.0)
    assert report.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert report.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert report.spearman([1.0, math.nan, 3.0, 2.0], [1.0, 5.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert math.isnan(report.spearman([1.0, 2.0], [3.0, 3.0]))
    assert math.isnan(report.spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="same number of entries"):
        report.spearman([1.0, 2.0], [1.0])


# ----- command line --------------------------------------------------------------------------


def test_validate_command_maps_its_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(
        config: ValidateConfig, out: Path, *, progress: bool, resume: bool
    ) -> validate.ValidateResult:
        seen.update(config=config, out=out, progress=progress, resume=resume)
        return validate.ValidateResult(config, "complete", [], [], {}, 0.0)

    monkeypatch.setattr(validate, "run", fake_run)
    out = tmp_path / "v"
    argv = ["validate", "--quick", "--out", str(out), "--seed", "3", "--steps", "4"]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert seen["config"] == ValidateConfig.quick(seed=3).with_steps(4)
    assert seen["out"] == out and seen["progress"] is False and seen["resume"] is False
    assert cli.main(["validate", "--out", str(out), "--resume"]) == 0
    assert seen["config"] == ValidateConfig() and seen["progress"] is True and seen["resume"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (["validate", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["validate", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_validate_command_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_validate_command_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["validate", "--quick", "--steps", "1", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "complete" and data["config"]["steps"] == 1
    assert (out / "report.md").exists()


@pytest.mark.slow  # two float64 CNN cells with sharpness: ~1 minute
def test_a_holds_for_the_smooth_cnn_and_second_order_misses_relu_kinks(tmp_path: Path) -> None:
    """(a′) on the CNN at η·λ₀ = 0.1: with tanh the second-order term cuts the median error
    far beyond 10× (measured 175×); with ReLU only ~2.6×, though first order holds (R² ≥ 0.99)."""
    ratios = {}
    for activation in ("tanh", "relu"):
        config = ValidateConfig(
            models=("cnn",),
            lr_scales=(0.1,),
            baseline_lr_scale=0.1,
            batch_sizes=(),
            minibatch_models=(),
            optimizers=(),
            forecast=False,
            scaling_steps=0,
            cnn_activation=activation,
        )
        result = validate.run(config, tmp_path / activation, progress=False, echo=None)
        (row,) = result.check("a_measured").details["cells"]
        assert row["r2_probs"] >= 0.99 and row["max_eta_lambda"] < 1
        ratios[activation] = row["error_ratio"]
    assert ratios["tanh"] >= 10 > ratios["relu"]
