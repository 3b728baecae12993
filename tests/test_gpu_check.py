"""benchmarks/gpu_check.py runs on the CPU (GPU-only parts skipped) so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::ntcov.FallbackWarning")
def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    status = _load().main(
        ["--device", "cpu", "--quick", "--models", "mlp,tied,cnn_bn", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert status == 0, [row for row in report["exactness"] if not row["ok"]]
    assert {row["model"] for row in report["exactness"]} == {"mlp", "tied", "cnn_bn"}
    assert {row["dtype"] for row in report["exactness"]} == {"float32", "bfloat16"}
    for row in report["exactness"]:
        assert row["on_device"] and row["rel_error"] < 5e-2, row
    for name in ("W1", "W2", "W3"):
        assert report["speed"][name]["rel_diff"] < 1e-4, (name, report["speed"][name])
        assert report["speed"][name]["ratio"] > 0


def test_gpu_check_rejects_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown zoo models"):
        _load().main(["--device", "cpu", "--models", "nope", "--out", str(tmp_path / "x.json")])
