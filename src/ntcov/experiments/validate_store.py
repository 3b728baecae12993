"""``ntcov validate``: finished cells saved one file each, so that ``--resume`` can skip them.

Each finished cell is written atomically (:func:`ntcov.report.atomic_path`) to
``<out>/cells/cellNN.npz``: its ``[T, K]`` arrays exactly, and the rest (per-step metrics,
sharpness, forecast...) as JSON text, next to a *fingerprint* — the run's configuration (all of
it but ``threads``), the cell and its index. A resumed run loads a stored cell only when its
fingerprint equals the one it would compute; anything else (a missing, unreadable or mismatched
file) is measured again. Cells are independent (each rebuilds its model from the seed and draws
its minibatches from its own generator), so a resumed run gives the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ntcov import report
from ntcov.experiments.validate_cells import CellRun, StepRecord
from ntcov.experiments.validate_config import Cell, ValidateConfig

__all__ = [
    "CELLS_FOLDER",
    "clear",
    "fingerprint",
    "load_cell",
    "load_scaling",
    "save_cell",
    "save_scaling",
]

CELLS_FOLDER = "cells"
ARRAY_FIELDS = (
    "actual",
    "plain",
    "first_order",
    "second_order",
    "std",
    "lower",
    "upper",
    "linearity",
)
SCALAR_FIELDS = ("train_loss", "plain_identity_error")


def fingerprint(config: ValidateConfig, cell: Cell | None, index: int) -> str:
    """What a stored result must have been computed with (JSON text; ``threads`` left out)."""
    settings = report.to_jsonable(replace(config, threads=1))
    del settings["threads"]
    identity = {"config": settings, "cell": report.to_jsonable(cell), "index": index}
    return json.dumps(identity, sort_keys=True)


def _cell_path(out: Path, index: int) -> Path:
    return out / CELLS_FOLDER / f"cell{index:02d}.npz"


def clear(out: Path) -> None:
    """Remove the stored cells of an earlier run in ``out`` (a fresh run starts over)."""
    folder = out / CELLS_FOLDER
    if folder.is_dir():
        for path in folder.glob("*"):
            if path.is_file():
                path.unlink()


def save_cell(out: Path, index: int, run: CellRun, identity: str) -> Path:
    """Write a finished cell to ``<out>/cells/cellNN.npz`` atomically."""
    arrays = {name: run.stacked(name) for name in ARRAY_FIELDS}
    arrays["values"] = np.stack(run.values)
    rest = {
        "lr": run.lr,
        "steps": run.steps,
        "metrics": run.metrics,
        "sharpness": run.sharpness,
        "forecast": run.forecast,
        "final_accuracy": run.final_accuracy,
        "wall_time_s": run.wall_time_s,
        "scalars": [{k: getattr(r, k) for k in SCALAR_FIELDS} for r in run.records],
    }
    path = _cell_path(out, index)
    with report.atomic_path(path) as tmp:
        np.savez(
            tmp,
            fingerprint=np.array(identity),
            rest=np.array(json.dumps(rest)),  # nan and inf survive as NaN/Infinity tokens
            **arrays,  # type: ignore[arg-type]
        )
    return path


def load_cell(out: Path, index: int, cell: Cell, identity: str) -> CellRun | None:
    """The stored cell ``index`` if its fingerprint is ``identity``, else ``None``."""
    path = _cell_path(out, index)
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != identity:
                return None
            rest = json.loads(str(data["rest"]))
            arrays = {name: data[name] for name in (*ARRAY_FIELDS, "values")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return _cell_run(cell, rest, arrays)


def _cell_run(cell: Cell, rest: dict[str, Any], arrays: dict[str, np.ndarray]) -> CellRun:
    records = [
        StepRecord(**{name: arrays[name][i] for name in ARRAY_FIELDS}, **scalars)
        for i, scalars in enumerate(rest["scalars"])
    ]
    return CellRun(
        cell=cell,
        lr=rest["lr"],
        steps=rest["steps"],
        values=list(arrays["values"]),
        records=records,
        metrics=rest["metrics"],
        sharpness=[(int(step), lam) for step, lam in rest["sharpness"]],
        forecast=rest["forecast"],
        final_accuracy=rest["final_accuracy"],
        wall_time_s=rest["wall_time_s"],
    )


def save_scaling(out: Path, scaling: dict[str, Any], identity: str) -> Path:
    """Write the loss-scaling ratios to ``<out>/cells/scaling.json`` atomically."""
    text = json.dumps({"fingerprint": identity, "scaling": scaling})
    return report.atomic_write(out / CELLS_FOLDER / "scaling.json", text)


def load_scaling(out: Path, identity: str) -> dict[str, Any] | None:
    """The stored loss-scaling ratios if their fingerprint is ``identity``, else ``None``."""
    try:
        data = json.loads((out / CELLS_FOLDER / "scaling.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != identity:
        return None
    scaling = data.get("scaling")
    return scaling if isinstance(scaling, dict) else None
