"""The digits demo: Price's equation against real training, its result files, and the reporting
helpers it is built from."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ntcov import report
from ntcov.experiments import demo
from ntcov.experiments.demo import DemoConfig, build_setup, measure_step, run_demo, step_windows

# ----- the default configuration (run once for the module) -----------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[demo.DemoResult, Path]:
    out = tmp_path_factory.mktemp("demo-default")
    return run_demo(DemoConfig(), out, progress=False, echo=None), out


def test_default_run_predicts_every_step_with_r2_above_099(default_run: Any) -> None:
    result, _ = default_run
    r2 = [m["r2"] for m in result.per_step]
    assert len(r2) == DemoConfig().steps
    assert min(r2) >= 0.99
    assert result.summary["min_r2"] == pytest.approx(min(r2))
    assert result.summary["steps_below_target"] == 0


def test_default_run_actually_learns(default_run: Any) -> None:
    result, _ = default_run
    assert result.accuracy["initial"]["test"] < 0.3
    assert result.accuracy["final"]["test"] > 0.9
    assert result.accuracy["final"]["train"] > 0.9
    loss = result.summary["test_loss"]
    assert loss["final"] < loss["initial"] / 5
    # The summed one-step predictions track the whole descent of the held-out loss.
    assert loss["predicted_total_change"] == pytest.approx(loss["actual_total_change"], rel=0.01)


def test_default_run_writes_its_three_files(default_run: Any) -> None:
    result, out = default_run
    assert {p.name for p in out.iterdir()} == {"results.json", "summary.md", "demo.png"}
    assert set(result.files) == {"results", "summary", "figure"}
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "summary.md").read_text()
    assert "| steps |" in text and "R² ≥ 0.99 at all 300 steps" in text


# ----- a short run ---------------------------------------------------------------------------


def test_short_run_result_file_has_config_versions_seed_and_metrics(tmp_path: Path) -> None:
    config = DemoConfig(steps=4, seed=1)
    result = run_demo(config, tmp_path, progress=False, echo=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["steps"] == 4 and data["config"]["lr"] == config.lr
    assert data["seed"] == 1
    assert set(data["versions"]) == {"python", "torch", "numpy", "ntcov"}
    assert data["status"] == "complete" and not result.interrupted
    assert [m["step"] for m in data["per_step"]] == [1, 2, 3, 4]
    assert all(m["r2"] > 0.99 for m in data["per_step"])
    assert data["summary"]["steps_completed"] == 4
    assert set(data["accuracy"]) == {"initial", "final"}
    probs = data["trajectories"]["probabilities"]
    assert len(probs["test_index"]) == config.shown
    assert np.shape(probs["predicted_change"]) == (config.shown, 4)
    assert len(data["trajectories"]["test_loss"]["actual_change"]) == 4
    assert (tmp_path / "demo.png").exists() and (tmp_path / "summary.md").exists()


def test_short_run_prints_the_summary_table(tmp_path: Path) -> None:
    lines: list[str] = []
    run_demo(DemoConfig(steps=2), tmp_path, progress=False, echo=lines.append)
    text = "\n".join(lines)
    for expected in ("median rel. error", "min R²", "sign agreement", "accuracy: train"):
        assert expected in text


def test_first_step_prediction_error_is_second_order_in_lr() -> None:
    """Δx − η·ntcov(x, −L) = O(η²): the relative error shrinks linearly with the step size."""
    errors = {}
    for lr in (0.2, 0.02):
        record = measure_step(build_setup(DemoConfig(lr=lr)), lr)
        errors[lr] = report.relative_error(record.predicted, record.actual)
    assert errors[0.2] < 0.05
    assert errors[0.02] == pytest.approx(errors[0.2] / 10, rel=0.3)


def test_step_trains_the_model_and_leaves_the_tracked_values_consistent() -> None:
    setup = build_setup(DemoConfig())
    before = demo.tracked_values(setup)
    record = measure_step(setup, 0.2)
    after = demo.tracked_values(setup)
    np.testing.assert_allclose(record.actual, (after - before).numpy())
    assert record.actual.shape == (360,) and np.abs(record.actual).max() > 0


def test_interrupted_run_keeps_what_was_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step, calls = demo.measure_step, []

    def interrupt_third(setup: demo.Setup, lr: float) -> demo.StepRecord:
        calls.append(lr)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(setup, lr)

    monkeypatch.setattr(demo, "measure_step", interrupt_third)
    result = run_demo(DemoConfig(steps=10), tmp_path, progress=False, echo=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert result.interrupted and data["status"] == "interrupted"
    assert data["summary"]["steps_completed"] == 2 and len(data["per_step"]) == 2
    assert "INTERRUPTED" in (tmp_path / "summary.md").read_text()


def test_interrupted_before_the_first_step_still_writes_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(setup: demo.Setup, lr: float) -> demo.StepRecord:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "measure_step", interrupt)
    lines: list[str] = []
    result = run_demo(DemoConfig(steps=5), tmp_path, progress=False, echo=lines.append)
    assert result.interrupted and result.per_step == []
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["steps_completed"] == 0
    assert "No step was completed." in "\n".join(lines)


def test_without_matplotlib_the_json_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    (tmp_path / "demo.png").write_bytes(b"stale figure of an earlier run")
    lines: list[str] = []
    result = run_demo(DemoConfig(steps=2), tmp_path, progress=False, echo=lines.append)
    assert (tmp_path / "results.json").exists() and not (tmp_path / "demo.png").exists()
    assert "figure" not in result.files
    assert any("pip install 'ntcov[plot]'" in line for line in lines)
    assert "no figure" in (tmp_path / "summary.md").read_text()


def test_run_restores_torch_threads(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_demo(DemoConfig(steps=1, threads=1), tmp_path, progress=False, echo=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# ----- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"lr": "0.1"}, "lr must be a finite number"),
        ({"dtype": "float16"}, "unknown dtype 'float16'"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**64}, "seed must be <= 18446744073709551615"),
        ({"threads": 0}, "threads must be >= 1"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


def test_config_is_frozen_and_normalises_lr() -> None:
    config = DemoConfig(lr=1)
    assert isinstance(config.lr, float) and config.torch_dtype is torch.float64
    with pytest.raises(AttributeError):
        config.steps = 3  # type: ignore[misc]


def test_step_windows() -> None:
    labels = [w[0] for w in step_windows(300)]
    assert labels == ["1", "1-10", "11-50", "51-100", "101-200", "201-300", "all"]
    assert step_windows(1) == [("1", 1, 1)]
    assert [w[0] for w in step_windows(3)] == ["1", "all"]
    assert [w[0] for w in step_windows(12)] == ["1", "1-10", "11-12", "all"]


# ----- report helpers ------------------------------------------------------------------------


def test_r_squared() -> None:
    act = np.array([1.0, 2.0, 3.0, 4.0])
    assert report.r_squared(act, act) == 1.0
    assert report.r_squared(np.full(4, act.mean()), act) == 0.0
    assert report.r_squared(act + 1.0, act) == pytest.approx(1 - 4 / 5)
    assert math.isnan(report.r_squared(act, np.ones(4)))
    assert report.r_squared(torch.tensor(act), torch.tensor(act)) == 1.0
    with pytest.raises(ValueError, match="same number of entries"):
        report.r_squared(act, act[:3])


def test_relative_error_and_sign_agreement() -> None:
    assert report.relative_error([3.0, 4.0], [0.0, 0.0]) == math.inf
    assert report.relative_error([0.0], [0.0]) == 0.0
    assert report.relative_error([1.0, 1.0], [1.0, 2.0]) == pytest.approx(1 / math.sqrt(5))
    pred, act = [1.0, -1.0, 1.0, 5.0], [2.0, -3.0, -1.0, 1e-20]
    assert report.sign_agreement(pred, act) == 0.75
    assert report.sign_agreement(pred, act, threshold=1e-12) == pytest.approx(2 / 3)
    assert math.isnan(report.sign_agreement(pred, act, threshold=10.0))
    with pytest.raises(ValueError, match="threshold"):
        report.sign_agreement(pred, act, threshold=-1.0)


def test_tables() -> None:
    text = report.format_table(["name", "value"], [["a", 1.5], ["long name", None]], title="T")
    lines = text.splitlines()
    assert lines[0] == "T" and lines[1].startswith("name") and lines[1].endswith("value")
    assert lines[3] == "a            1.5" and lines[4].endswith("-")
    assert len({len(line) for line in lines[1:4]}) == 1  # fixed width
    markdown = report.format_markdown_table(["x", "y"], [["a", 2]])
    assert markdown.splitlines() == ["| x | y |", "| --- | ---: |", "| a | 2 |"]
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        report.format_table(["x", "y"], [["a"]])


def test_write_json_is_strict_and_carries_metadata(tmp_path: Path) -> None:
    path = report.write_json(
        tmp_path / "sub" / "r.json",
        {"values": torch.tensor([1.0, math.nan]), "array": np.arange(2)},
        config=DemoConfig(steps=3),
        seed=7,
    )
    data = json.loads(path.read_text())  # json.loads would accept NaN; check the text too
    assert "NaN" not in path.read_text()
    assert data["values"] == [1.0, None] and data["array"] == [0, 1]
    assert data["config"]["steps"] == 3 and data["seed"] == 7
    assert data["versions"]["ntcov"] and data["versions"]["torch"] == torch.__version__
    assert not list(tmp_path.glob("sub/*.partial"))
