"""The K×K benchmark runs in its quick mode, agrees with the brute force and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_benchmarks import _load


def test_bench_gram_quick_is_exact_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench_gram.json"
    status = _load("bench_gram").main(["--quick", "--out", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True and not result["failures"]
    cells = result["cells"]
    assert {(c["model"], c["method"]) for c in cells if c["method"] == "structured"} == {
        ("mlp", "structured"),
        ("cnn", "structured"),
        ("transformer", "structured"),
    }
    for cell in cells:
        if cell["method"] in ("structured", "vmap"):
            assert cell["status"] == "ok" and cell["rel_diff_to_vmap"] < 1e-4
    for errors in result["exactness_float64"].values():
        assert errors["structured"] < 1e-10 and errors["vmap"] < 1e-10
