"""The benchmark scripts run (smoke mode) and check their own numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_rate_quick_agrees_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench_rate.json"
    status = _load("bench_rate").main(["--quick", "--out", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True
    rows = result["rows"]
    assert {row["K"] for row in rows} == {1, 16}
    assert not result["failures"]
    for row in rows:
        assert max(row["max_rel_diff"].values()) < 1e-4
        assert row["ratios"]["rate/floor"] > 0


def test_adam_minibatch_interval_script_runs(capsys) -> None:
    _load("adam_minibatch_interval").main()
    out = capsys.readouterr().out
    simulated = next(line for line in out.splitlines() if line.startswith("simulated"))
    coverage = float(simulated.split("coverage")[1].split()[0])
    assert 0.9 <= coverage <= 0.99
