"""``ntcov experiment linearity``: ntcov's bilinearity, sum, product and chain rules hold to
rounding on a trained network, the wrong rules are caught, and the result files are written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ntcov import cli
from ntcov.experiments import linearity
from ntcov.experiments.linearity import THRESHOLD, LinearityConfig


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("linearity")
    return linearity.run(LinearityConfig.quick(), out, progress=False, echo=None), out


def test_every_identity_holds_to_rounding_in_float64(quick_run: Any) -> None:
    payload, _ = quick_run
    rows = [r for r in payload["checks"] if not r["negative_control"]]
    assert len(rows) == 8  # 3 bilinearity strategies, sums, product, sigmoid, softmax ×2
    assert {r["strategy"] for r in rows} == {"auto", "per_example", "vjp"}
    for row in rows:
        assert row["dtype"] == "float64"
        assert row["max_rel_discrepancy"] <= THRESHOLD, row
        assert row["passed"] is True
    assert payload["summary"]["all_identities_pass"] is True


def test_wrong_rules_are_caught(quick_run: Any) -> None:
    """Negative controls: σ(1 − σ) instead of σ²(1 − σ)², and softmax without its Σ_j p_j term."""
    payload, _ = quick_run
    controls = [r for r in payload["checks"] if r["negative_control"]]
    assert len(controls) == 2
    for row in controls:
        assert row["max_rel_discrepancy"] > 0.1, row
        assert row["passed"] is False
    assert payload["summary"]["all_controls_fail"] is True


def test_files_are_written(quick_run: Any) -> None:
    payload, out = quick_run
    assert {p.name for p in out.iterdir()} == {"results.json", "verdict.md", "linearity.png"}
    assert (out / "linearity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["models"] == ["mlp"] and saved["seed"] == 0
    assert len(saved["checks"]) == len(payload["checks"])
    verdict = (out / "verdict.md").read_text()
    assert "| model | dtype | identity |" in verdict
    assert verdict.count("| PASS |") == 8 and verdict.count("FAIL (expected)") == 2


def test_discrepancy_is_max_abs_error_over_max_abs_rhs() -> None:
    lhs, rhs = torch.tensor([1.0, 2.0, 4.5]), torch.tensor([1.0, -2.0, 4.0])
    assert linearity.discrepancy(lhs, rhs) == pytest.approx(4.0 / 4.0)
    assert linearity.discrepancy(rhs, rhs) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        linearity.discrepancy(lhs, rhs[:2])


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="models"):
        LinearityConfig(models=("resnet",))
    with pytest.raises(ValueError, match="images"):
        LinearityConfig(images=1)
    with pytest.raises(ValueError, match="lr"):
        LinearityConfig(lr=0.0)


def test_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Through ``ntcov experiment linearity`` with the smallest settings: exit status 0."""
    monkeypatch.setattr(cli, "EXPERIMENTS", ("linearity",))
    out = tmp_path / "cli"
    argv = ["experiment", "linearity", "--quick", "--steps", "2", "--images", "4"]
    status = cli.main([*argv, "--out", str(out), "--no-progress"])
    assert status == 0
    assert (out / "verdict.md").exists()
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["train_steps"] == 2 and config["images"] == 4


def test_command_line_rejects_bad_values(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    linearity.add_arguments(parser)
    args = parser.parse_args(["--images", "0", "--out", str(tmp_path)])
    args.parser = parser
    with pytest.raises(SystemExit):
        linearity.run_from_args(args)
