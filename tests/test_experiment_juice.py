"""The juice experiment: JuiceEnv follows the gymnasium API, Price's identity, escape slopes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from ntcov.covariance import ntcov, ntvar
from ntcov.envs import JuiceEnv
from ntcov.experiments import juice
from ntcov.property import Property

SLOPE_TOLERANCE = 0.15  # looser than the full run's ±0.1: a 4 × 4 sweep with fewer steps


def test_env_follows_gymnasium_api() -> None:
    env = JuiceEnv(0.3, distractors=3, bank_size=5, seed=0)
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs) and isinstance(info, dict)
    action = env.action_space.sample()
    assert env.action_space.contains(action)
    obs, reward, terminated, truncated, info = env.step(action)
    assert env.observation_space.contains(obs)
    assert reward in (0.0, 1.0) and terminated is True and truncated is False
    with pytest.raises(ValueError, match="reset"):
        env.step(1)
    with pytest.raises(ValueError, match="action"):
        env.reset()
        env.step(2)


def test_env_reward_is_s_times_a() -> None:
    s, episodes = 0.3, 20000
    env = JuiceEnv(s, distractors=2, bank_size=4, seed=0)
    env.reset(seed=2)
    rng = np.random.default_rng(3)
    policy = lambda o: 1 / (1 + np.exp(-(o[0] + o[1])))  # noqa: E731 — any approach probability
    a = np.mean([policy(o) for o in env.juice_observations()])
    total = 0.0
    for _ in range(episodes):
        obs, _ = env.reset()
        total += env.step(int(rng.random() < policy(obs)))[1]
    assert total / episodes == pytest.approx(s * a, abs=4 * np.sqrt(s * a / episodes))


def test_identity_ntcov_a_r_equals_s_ntvar_a() -> None:
    torch.manual_seed(0)
    policy = juice.JuicePolicy(5, 8)
    obs = torch.tensor(JuiceEnv(0.2, seed=0).juice_observations())
    a = Property(policy, lambda m: torch.sigmoid(m(obs)).mean())
    for s in (0.01, 0.2, 0.5):
        lhs, rhs = ntcov(a, s * a), s * ntvar(a)
        assert float((lhs - rhs).abs()) <= 1e-10 * float(rhs.abs())


def test_closed_form_path_solves_the_ode() -> None:
    a0, s, c = np.array([0.01]), np.array([0.2]), np.array([3.0])
    t = juice.closed_form_time(a0, s, c, 0.5)
    assert juice.closed_form_path(a0, s, c, t)[0] == pytest.approx(0.5, rel=1e-9)


def test_quick_experiment_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ntcov import cli

    monkeypatch.setattr(cli, "EXPERIMENTS", ("juice",))
    out = tmp_path / "juice"
    status = cli.main(["experiment", "juice", "--quick", "--out", str(out), "--no-progress"])
    assert status == 0
    assert {p.name for p in out.iterdir()} >= {"results.json", "juice.png", "verdict.md"}
    results = json.loads((out / "results.json").read_text())
    sweep, rl = results["sweep"], results["reinforce"]
    assert results["status"] == "complete" and sweep["all_escaped"]
    assert abs(sweep["mean_slope_vs_s"] + 1) <= SLOPE_TOLERANCE
    assert abs(sweep["mean_slope_vs_a0"] + 1) <= SLOPE_TOLERANCE
    assert sweep["identity_max_rel_error"] <= 1e-10
    assert sweep["per_step_rel_error_median"] <= 0.01
    assert sweep["forecast_within_5pct_fraction_of_escape"]["min"] >= 0.5
    assert 0.75 <= rl["coverage_pointwise"] <= 1.0  # nominal 95%, 16 runs × 10 checkpoints
    assert "PASS" in (out / "verdict.md").read_text()
