"""``ntcov attribute``: the digits attribution experiment writes its files and checks its sums."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ntcov import cli
from ntcov.experiments import attribute
from ntcov.experiments.attribute import AttributeConfig


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    attribute.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(list(argv))
    args.parser = parser
    return args


def _check_outputs(out: Path) -> dict:
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "complete"
    assert {"attribute.png", "layers.png", "report.md"} <= {p.name for p in out.iterdir()}
    summary = result["summary"]
    one, run = summary["one_step"], summary["run"]
    assert one["sum_vs_rate_rel_error"] < 1e-10
    assert sum(one["layers"].values()) == pytest.approx(one["force"] + one["bias"], rel=1e-9)
    assert sum(run["layers"].values()) == pytest.approx(run["predicted_change"], rel=1e-9)
    assert run["predicted_change"] == pytest.approx(
        run["examples_total"] + run["momentum_and_decay_bias"], rel=1e-12
    )
    # first order explains the run up to a small higher-order remainder
    assert abs(run["unexplained_higher_order"]) < 0.2 * abs(run["actual_change"])
    for key in ("increased", "decreased"):
        values = [e["contribution"] for e in run["top"][key]]
        assert values == sorted(values, reverse=key == "increased")
    assert (
        run["top"]["increased"][0]["contribution"] > 0 > run["top"]["decreased"][0]["contribution"]
    )
    return summary


def test_run_from_args_writes_grid_layers_and_json(tmp_path: Path) -> None:
    out = tmp_path / "attr"
    status = attribute.run_from_args(_args("--quick", "--out", str(out), "--no-progress"))
    assert status == 0
    summary = _check_outputs(out)
    assert summary["steps_done"] == 8
    assert len(summary["run"]["top"]["increased"]) == 5
    assert summary["run"]["momentum_and_decay_bias"] == 0  # plain SGD: all from examples


def test_minibatches_and_bad_values(tmp_path: Path) -> None:
    out = tmp_path / "mini"
    args = _args(
        "--quick", "--batch-size", "64", "--image", "3", "--out", str(out), "--no-progress"
    )
    assert attribute.run_from_args(args) == 0
    summary = _check_outputs(out)
    first_batch = set(attribute.batches(AttributeConfig.quick(batch_size=64), 300, 0).tolist())
    for key in ("increased", "decreased"):  # the first step ranks its own minibatch only
        entries = summary["one_step"]["top"][key]
        assert len(entries) == 5 and {e["index"] for e in entries} <= first_batch
        assert all(e["contribution"] != 0 for e in entries)
    with pytest.raises(SystemExit):
        attribute.run_from_args(_args("--quick", "--image", "100000", "--out", str(out)))
    with pytest.raises(SystemExit):  # refused before any training
        attribute.run_from_args(_args("--quick", "--top-k", "301", "--out", str(out)))


def test_ctrl_c_writes_the_steps_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = attribute.batches

    def stop_at_third(config, count, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(config, count, step)

    monkeypatch.setattr(attribute, "batches", stop_at_third)
    out = tmp_path / "stopped"
    assert attribute.run_from_args(_args("--quick", "--out", str(out), "--no-progress")) == 130
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "interrupted"
    summary = result["summary"]
    assert summary["steps_done"] == summary["steps_recorded"] == 3
    assert summary["one_step"]["sum_vs_rate_rel_error"] < 1e-10
    assert (out / "attribute.png").exists() and "interrupted" in (out / "report.md").read_text()


def _registered() -> bool:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "attribute" in commands.choices


def test_cli_command(tmp_path: Path) -> None:
    if not _registered():
        pytest.skip("`ntcov attribute` is not registered in ntcov.cli yet")
    out = tmp_path / "cli"
    assert cli.main(["attribute", "--quick", "--out", str(out), "--no-progress"]) == 0
    _check_outputs(out)
