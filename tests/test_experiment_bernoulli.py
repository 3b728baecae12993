"""`ntcov experiment bernoulli`: ntvar(p) = p²(1−p)² ntvar(z) exactly, the raw slope, the Fisher
ratios, and the files (small config: MLP only, 30 steps)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ntcov import cli
from ntcov.experiments import bernoulli
from ntcov.experiments.bernoulli import BernoulliConfig


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bernoulli")
    config = BernoulliConfig(steps=30, hidden=32, archs=("mlp",))
    return bernoulli.run(config, out, progress=False), out


def _stats(run: dict[str, Any]) -> list[dict[str, Any]]:
    settings = run["results"]["settings"]
    return [s[t] for s in settings.values() for t in ("init", "trained")]


def test_identity_slope_is_two_and_ratio_is_pq_squared(small_run: Any) -> None:
    for s in _stats(small_run[0]):
        assert s["identity_slope"] == pytest.approx(2.0, abs=1e-6)
        assert s["identity_max_rel_error"] < 1e-10
        assert abs(s["raw_minus_2_minus_logit_slope"]) < 1e-8
        assert s["direct_probability_max_rel_diff"] < 1e-8


def test_raw_slope_is_finite_and_near_two_after_training(small_run: Any) -> None:
    for s in _stats(small_run[0]):
        assert math.isfinite(s["raw_slope"])
    trained = [s["trained"] for s in small_run[0]["results"]["settings"].values()]
    for s in trained:  # measured: 2.30 (binary), 2.32 (softmax)
        assert 1.8 < s["raw_slope"] < 2.8
        assert s["rms_log_residual_slope2"] < s["rms_log_residual_slope1"]


def test_fisher_ratios(small_run: Any) -> None:
    for s in _stats(small_run[0]):
        fisher = s["fisher"]
        assert fisher["lambda"] > 0
        assert fisher["euclidean_head_check_max_rel_error"] < 1e-10
        for name in ("own", "train_sum_plus_own"):  # bounded: F ⪰ the example's own Fisher
            assert fisher[name]["fraction_in_0_1"] == 1.0
            assert 0 < fisher[name]["min"] <= fisher[name]["max"] <= 1.0
        assert fisher["own"]["min"] > 0.999  # = 1 − O(λ)
        assert fisher["train_mean"]["min"] > 0  # unbounded: N_train × a leverage


def test_verdict_counts_only_trained_slopes_over_a_wide_enough_span(small_run: Any) -> None:
    results = json.loads(json.dumps(small_run[0]["results"]))  # a copy to edit
    text = bernoulli.verdict_text(results)[0]
    assert "in 2 of the 2 trained settings" in text and "describes real networks" in text
    for setting in results["settings"].values():  # as after a very short run
        setting["trained"]["log10_pq_span"] = 0.1
    text = bernoulli.verdict_text(results)[0]
    assert "in 0 of the 0 trained settings" in text and "2 trained settings span less" in text
    assert "does not settle it" in text and "describes real networks" not in text


def test_files_exist(small_run: Any) -> None:
    _, out = small_run
    for name in ("results.json", "verdict.md", "ntvar_p.png", "fisher.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert set(results["settings"]) == {"mlp/binary", "mlp/softmax"}
    assert "raw slope" in (out / "verdict.md").read_text()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="archs"):
        BernoulliConfig(archs=("rnn",))
    with pytest.raises(ValueError, match="damping"):
        BernoulliConfig(damping=0.0)


def test_cli_parses_the_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "EXPERIMENTS", ("bernoulli",))
    args = cli.build_parser().parse_args(["experiment", "bernoulli", "--quick", "--out", "x"])
    assert args.handler is bernoulli.run_from_args
    assert args.quick and args.out == "x"


def test_cli_explicit_steps_win_over_quick_and_success_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[BernoulliConfig] = []

    def fake_run(config: BernoulliConfig, out: Any, *, progress: bool) -> dict[str, Any]:
        seen.append(config)
        return {"results": {"status": "complete"}, "files": {"verdict": Path(out) / "verdict.md"}}

    monkeypatch.setattr(bernoulli, "run", fake_run)
    out = tmp_path / "b"
    assert cli.main(["experiment", "bernoulli", "--quick", "--steps", "7", "--out", str(out)]) == 0
    assert seen[0].steps == 7 and seen[0] == replace(BernoulliConfig.quick(), steps=7)
    assert capsys.readouterr().out.strip() == (
        f"ntcov experiment bernoulli: complete; wrote verdict.md to {out}"
    )
