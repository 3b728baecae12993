"""benchmarks/bench_attribution.py in smoke mode: agrees with TracInCP and writes JSON."""

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


def test_bench_attribution_quick_agrees_with_tracin_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench_attribution.json"
    assert _load("bench_attribution").main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True
    assert not result["failures"]
    rows = result["rows"]
    assert [row["K"] for row in rows] == [1, 4]
    for row in rows:
        assert {"ntcov", "ntcov_jvp", "captum", "captum_loop", "vmap_grad"} <= set(row["times"])
        assert max(row["max_rel_diff"].values()) <= 1e-5
        assert all(ratio > 0 for ratio in row["ratios"].values())
    assert max(result["float64_max_rel_diff"].values()) <= 1e-10
    memory = rows[-1]["peak_memory_mib"]
    assert memory["ntcov"] is not None and memory["captum"] is not None
