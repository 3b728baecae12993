"""Reporting helpers shared by the experiments: agreement metrics, tables, result files, plots.

Metrics compare a predicted change ``pred`` with the measured change ``act`` of the same ``K``
properties (arrays or tensors of any shape, flattened to ``[K]``):

    r_squared(pred, act)      = 1 − Σ (pred − act)² / Σ (act − mean(act))²
    relative_error(pred, act) = ‖pred − act‖ / ‖act‖
    sign_agreement(pred, act) = fraction of entries with sign(pred) = sign(act), among
                                the entries with |act| > threshold

Result files carry their configuration, the seed and the library versions (:func:`run_metadata`).
matplotlib is optional (``pip install 'ntcov[plot]'``): it is imported only inside the plotting
helpers, with the non-interactive Agg backend.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = [
    "add_identity_line",
    "atomic_path",
    "atomic_write",
    "format_markdown_table",
    "format_table",
    "new_figure",
    "plot_available",
    "plot_series_pair",
    "r_squared",
    "relative_error",
    "run_metadata",
    "save_figure",
    "scatter_predicted_actual",
    "sign_agreement",
    "to_jsonable",
    "write_json",
]

Cell = str | int | float | None


# ----- agreement metrics ---------------------------------------------------------------------


def _pair(pred: ArrayLike | torch.Tensor, act: ArrayLike | torch.Tensor, caller: str) -> tuple:
    """Both inputs as flat float64 arrays of the same length ``[K]``."""
    p, a = (_as_flat(v) for v in (pred, act))
    if p.shape != a.shape:
        raise ValueError(
            f"{caller}: pred and act must have the same number of entries, got {p.size} and "
            f"{a.size}."
        )
    return p, a


def _as_flat(values: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def r_squared(pred: ArrayLike | torch.Tensor, act: ArrayLike | torch.Tensor) -> float:
    """Coefficient of determination of ``pred`` for ``act``: ``1 − SS_res / SS_tot``.

    ``SS_res = Σ (pred − act)²`` and ``SS_tot = Σ (act − mean(act))²`` over the ``K`` entries.
    1 is a perfect prediction; it can be negative. ``nan`` when ``act`` is constant
    (``SS_tot = 0``), where R² is undefined.
    """
    p, a = _pair(pred, act, "r_squared")
    ss_tot = float(np.sum((a - a.mean()) ** 2)) if a.size else 0.0
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((p - a) ** 2)) / ss_tot


def relative_error(pred: ArrayLike | torch.Tensor, act: ArrayLike | torch.Tensor) -> float:
    """``‖pred − act‖ / ‖act‖`` (Euclidean norms over the ``K`` entries).

    0 when both are zero, ``inf`` when only ``act`` is zero.
    """
    p, a = _pair(pred, act, "relative_error")
    residual, scale = float(np.linalg.norm(p - a)), float(np.linalg.norm(a))
    if scale == 0.0:
        return 0.0 if residual == 0.0 else math.inf
    return residual / scale


def sign_agreement(
    pred: ArrayLike | torch.Tensor, act: ArrayLike | torch.Tensor, *, threshold: float = 0.0
) -> float:
    """Fraction of entries where ``sign(pred) = sign(act)``, counting only ``|act| > threshold``.

    ``threshold`` (≥ 0) skips changes too small to have a meaningful sign (rounding noise).
    ``nan`` when no entry is above it.
    """
    if threshold < 0:
        raise ValueError(f"sign_agreement: threshold must be >= 0, got {threshold}.")
    p, a = _pair(pred, act, "sign_agreement")
    counted = np.abs(a) > threshold
    if not counted.any():
        return math.nan
    return float(np.mean(np.sign(p[counted]) == np.sign(a[counted])))


# ----- tables --------------------------------------------------------------------------------


def _cell_text(cell: Cell, float_format: str) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, float):
        return "nan" if math.isnan(cell) else format(cell, float_format)
    return str(cell)


def _cells(
    headers: Sequence[str], rows: Sequence[Sequence[Cell]], float_format: str, caller: str
) -> list[list[str]]:
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(
                f"{caller}: row {i} has {len(row)} cells but there are {len(headers)} headers."
            )
    return [[_cell_text(c, float_format) for c in row] for row in rows]


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    title: str | None = None,
    float_format: str = ".4g",
) -> str:
    """A fixed-width text table: the first column left-aligned, the others right-aligned.

    Cells are strings, numbers (floats through ``float_format``) or ``None`` (shown as ``-``).
    """
    body = _cells(headers, rows, float_format, "format_table")
    widths = [max(len(r[j]) for r in [list(headers), *body]) for j in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(headers), rule, *(line(r) for r in body)]
    return "\n".join([title, *lines] if title else lines)


def format_markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Cell]], *, float_format: str = ".4g"
) -> str:
    """The same table as GitHub-flavoured markdown (numeric columns right-aligned)."""
    body = _cells(headers, rows, float_format, "format_markdown_table")
    align = ["---", *["---:"] * (len(headers) - 1)]
    lines = [list(headers), align, *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# ----- result files --------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path next to ``path`` (same folder and suffix) to write to; renamed
    onto ``path`` with :func:`os.replace` when the block ends, removed if it raises.

    A reader, or a run interrupted mid-write, sees the old file or the new one, never half a
    file. ``with atomic_path(out / "x.npz") as tmp: np.savez(tmp, ...)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically: to a temporary file in the same
    folder, flushed to disk, then renamed onto ``path`` (:func:`atomic_path`)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def run_metadata(seed: int) -> dict[str, Any]:
    """What every result file records next to its config: seed, versions, platform and time."""
    from ntcov import __version__

    return {
        "seed": seed,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "ntcov": __version__,
        },
        "platform": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def to_jsonable(value: Any) -> Any:
    """``value`` with tensors, arrays, dataclasses, paths and enums made JSON-friendly.

    Non-finite floats become ``None`` so that the file is strict JSON.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray | np.generic):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_json(path: str | Path, results: Mapping[str, Any], *, config: Any, seed: int) -> Path:
    """Write ``{"config": config, **run_metadata(seed), **results}`` to ``path`` atomically.

    ``config`` is a dataclass or a mapping. The file is written to a temporary name and then
    renamed, so a reader (or an interrupted run) never sees half a file.
    """
    path = Path(path)
    payload = {"config": config, **run_metadata(seed), **results}
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False)
    return atomic_write(path, text + "\n")


# ----- plots (matplotlib is optional and imported lazily) ------------------------------------

PLOT_HINT = "matplotlib is not installed; install it with: pip install 'ntcov[plot]'"


def plot_available() -> bool:
    """Whether matplotlib can be imported (the ``plot`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(PLOT_HINT) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(rows: int, cols: int, *, size: tuple[float, float] = (11.0, 8.0)) -> tuple:
    """A figure with a ``rows × cols`` grid of axes (an array), using the Agg backend.

    Raises ``ImportError`` with the install hint when matplotlib is missing.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    return fig, axes


def scatter_predicted_actual(
    ax: Any,
    pred: ArrayLike,
    act: ArrayLike,
    *,
    label: str | None = None,
    color: str | None = None,
    size: float = 3.0,
) -> None:
    """Scatter ``act`` (y) against ``pred`` (x); add :func:`add_identity_line` after all groups."""
    p, a = _pair(pred, act, "scatter_predicted_actual")
    ax.scatter(p, a, s=size, alpha=0.5, linewidths=0, color=color, label=label, rasterized=True)
    ax.set_xlabel("predicted change")
    ax.set_ylabel("actual change")


def add_identity_line(ax: Any, *, label: str = "y = x") -> None:
    """The ``y = x`` line across the axes' current data range, drawn under the points."""
    low = min(ax.get_xlim()[0], ax.get_ylim()[0])
    high = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([low, high], [low, high], color="black", linewidth=0.7, zorder=0, label=label)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)


def plot_series_pair(
    ax: Any,
    steps: ArrayLike,
    actual: ArrayLike,
    predicted: ArrayLike,
    *,
    label: str,
    color: str | None = None,
) -> None:
    """``actual`` over ``steps`` as a solid line and ``predicted`` as a dashed line, same colour."""
    (line,) = ax.plot(steps, actual, color=color, linewidth=1.6, label=f"{label}: actual")
    ax.plot(
        steps,
        predicted,
        color=line.get_color(),
        linestyle="--",
        linewidth=1.2,
        label=f"{label}: predicted",
    )


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix) and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# ----- rank statistics -----------------------------------------------------------------------


def ranks(values: ArrayLike | torch.Tensor) -> np.ndarray:
    """Ranks ``1..K`` of the entries (ties share their average rank), ``[K]`` float64."""
    flat = _as_flat(values)
    order = np.argsort(flat, kind="stable")
    ordinal = np.empty(flat.size, dtype=np.float64)
    ordinal[order] = np.arange(1, flat.size + 1, dtype=np.float64)
    _, group, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ordinal) / counts)[group]


def spearman(x: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of :func:`ranks` of ``x`` and ``y``.

    Pairs where either value is ``nan`` are dropped (``±inf`` rank as extremes). ``nan`` with
    fewer than two pairs or when either side is constant.
    """
    a, b = _pair(x, y, "spearman")
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 2:
        return math.nan
    rank_a, rank_b = ranks(a[keep]), ranks(b[keep])
    if rank_a.std() == 0 or rank_b.std() == 0:
        return math.nan
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


__all__ += ["ranks", "spearman"]
