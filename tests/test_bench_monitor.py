"""benchmarks/bench_monitor.py runs in its smoke mode and writes sensible numbers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_benchmarks import _load


def test_bench_monitor_quick_times_every_variant_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench_monitor.json"
    assert _load("bench_monitor").main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True
    rows = {row["setting"]: row for row in result["rows"]}
    digits = rows["digits MLP h=256, B=64, K=64"]
    expected = 1 if result["minilm_skipped"] is None else 0
    assert len(rows) == 1 + expected, result["minilm_skipped"]
    for row in rows.values():
        assert set(row["ms_per_step"]) == {"plain", "optimizer", "observed"}
        assert all(t > 0 for t in row["ms_per_step"].values())
        assert set(row["overhead"]) == {"optimizer", "observed"}
        # the monitored runs recorded every step, and first order explains their changes
        assert min(row["r_squared"].values()) > 0.9
    assert digits["steps"] == 20
