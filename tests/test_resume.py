"""Long runs lose nothing: atomic writes, per-cell results of ``ntcov validate`` saved as each
cell finishes, and ``--resume`` giving the same final results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ntcov import cli, report
from ntcov.experiments import validate, validate_cells, validate_store
from ntcov.experiments.validate import ValidateConfig

# ----- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"
    report.atomic_write(path, "first")
    report.atomic_write(path, b"second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not a private temp file's 0600


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "changes.npz"
    report.atomic_write(path, b"old")
    with pytest.raises(KeyboardInterrupt), report.atomic_path(path) as tmp:
        tmp.write_bytes(b"half a fi")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["changes.npz"]


def test_atomic_path_keeps_the_suffix_for_writers_that_add_one(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    with report.atomic_path(path) as tmp:
        np.savez(tmp, a=np.arange(3))  # np.savez appends .npz to names without it
    with np.load(path) as data:
        assert data["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["arrays.npz"]


def test_write_json_goes_through_atomic_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[Path] = []
    real = report.atomic_write
    monkeypatch.setattr(report, "atomic_write", lambda p, d: written.append(Path(p)) or real(p, d))
    report.write_json(tmp_path / "r.json", {"x": 1.5}, config={"a": 1}, seed=3)
    assert written == [tmp_path / "r.json"]
    assert json.loads((tmp_path / "r.json").read_text())["x"] == 1.5


# ----- ntcov validate --resume -----------------------------------------------------------------


def _tiny(**overrides: Any) -> ValidateConfig:
    """Four cells (baseline, lr, B=8, Adam) of two steps on a small MLP, and loss scaling."""
    settings: dict[str, Any] = {
        "models": ("mlp",),
        "steps": 2,
        "minibatch_steps": 2,
        "lr_scales": (0.1,),
        "batch_sizes": (8,),
        "optimizers": ("adam",),
        "scaling_steps": 1,
        "tracked_images": 8,
        "hidden": 8,
        "sharpness_iterations": 2,
        "sharpness_every": 1,
    }
    return ValidateConfig(**{**settings, **overrides})


@pytest.fixture
def counted_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts measured steps; ``interrupt_at`` (if set) raises KeyboardInterrupt at that step.
    Figures are skipped (slow, and not what is tested here)."""
    monkeypatch.setattr(validate, "write_figures", lambda out, state: [])
    counter: dict[str, Any] = {"steps": 0, "interrupt_at": None}
    real = validate_cells.measure_step

    def measure(*args: Any, **kwargs: Any) -> validate.StepRecord:
        counter["steps"] += 1
        if counter["steps"] == counter["interrupt_at"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(validate_cells, "measure_step", measure)
    return counter


def _comparable(out: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """results.json without timings and timestamps, and every array of changes.npz."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("wall_time_s", "created")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    results = strip(json.loads((out / "results.json").read_text()))
    with np.load(out / "changes.npz") as changes:
        return results, {k: changes[k] for k in changes.files}


def _run(out: Path, config: ValidateConfig, *, resume: bool = False) -> validate.ValidateResult:
    return validate.run(config, out, progress=False, echo=None, resume=resume)


def test_an_interrupted_run_resumes_to_the_same_results(
    tmp_path: Path, counted_steps: dict[str, Any]
) -> None:
    config = _tiny()
    assert _run(tmp_path / "whole", config).status == "complete"
    assert counted_steps["steps"] == 8  # four cells of two steps

    counted_steps.update(steps=0, interrupt_at=4)  # the second step of the second cell
    interrupted = _run(tmp_path / "parts", config)
    assert interrupted.status == "interrupted"
    stored = sorted(p.name for p in (tmp_path / "parts" / "cells").iterdir())
    assert stored == ["cell00.npz"]  # only finished cells are saved

    counted_steps.update(steps=0, interrupt_at=None)
    resumed = _run(tmp_path / "parts", config, resume=True)
    assert resumed.status == "complete"
    assert counted_steps["steps"] == 6  # cell 0 was loaded, not measured again
    whole, parts = _comparable(tmp_path / "whole"), _comparable(tmp_path / "parts")
    assert whole[0] == parts[0]
    assert whole[1].keys() == parts[1].keys()
    for key, array in whole[1].items():
        np.testing.assert_array_equal(parts[1][key], array, err_msg=key)


def test_resume_measures_again_what_another_config_stored(
    tmp_path: Path, counted_steps: dict[str, Any]
) -> None:
    _run(tmp_path, _tiny(optimizers=(), batch_sizes=(), scaling_steps=0))
    assert counted_steps["steps"] == 4
    counted_steps["steps"] = 0
    _run(tmp_path, _tiny(optimizers=(), batch_sizes=(), scaling_steps=0), resume=True)
    assert counted_steps["steps"] == 0  # everything stored and matching
    _run(tmp_path, _tiny(optimizers=(), batch_sizes=(), scaling_steps=0, seed=1), resume=True)
    assert counted_steps["steps"] == 4  # another seed: nothing matches
    (tmp_path / "cells" / "cell01.npz").write_bytes(b"not a zip file")  # a damaged file
    counted_steps["steps"] = 0
    _run(tmp_path, _tiny(optimizers=(), batch_sizes=(), scaling_steps=0, seed=1), resume=True)
    assert counted_steps["steps"] == 2  # only the damaged cell is measured again
    threads = _tiny(optimizers=(), batch_sizes=(), scaling_steps=0, seed=1, threads=2)
    _run(tmp_path, threads, resume=True)
    assert counted_steps["steps"] == 2  # the thread count is not part of the fingerprint


def test_a_fresh_run_clears_what_an_earlier_run_stored(
    tmp_path: Path, counted_steps: dict[str, Any]
) -> None:
    config = _tiny(lr_scales=(0.5,), optimizers=(), batch_sizes=(), scaling_steps=0)
    _run(tmp_path, config)
    stale = tmp_path / "cells" / "cell07.npz"
    stale.write_bytes(b"from an older, bigger grid")
    counted_steps["steps"] = 0
    _run(tmp_path, config)  # no resume: measured again, stale files removed
    assert counted_steps["steps"] == 2 and not stale.exists()


def test_stored_cells_keep_every_field_of_a_step() -> None:
    record_fields = {f.name for f in fields(validate.StepRecord)}
    stored = set(validate_store.ARRAY_FIELDS) | set(validate_store.SCALAR_FIELDS)
    assert stored == record_fields


def test_the_resume_option_reaches_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(config: ValidateConfig, out: Path, **kwargs: Any) -> validate.ValidateResult:
        seen.update(kwargs)
        return validate.ValidateResult(config, "complete", [], [], {}, 0.0)

    monkeypatch.setattr(validate, "run", fake_run)
    assert cli.main(["validate", "--quick", "--resume", "--out", str(tmp_path)]) == 0
    assert seen == {"progress": True, "resume": True}
