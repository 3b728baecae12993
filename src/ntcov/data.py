"""Data loading: the real digits set that ships with scikit-learn, and users' own arrays.

Nothing here downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "load_arrays", "load_digits_split", "split_arrays"]


@dataclass(frozen=True)
class Split:
    """A train/held-out split: inputs ``[N, ...]`` (floating) and integer labels ``[N]``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max().item()) + 1


def load_digits_split(
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    images: bool = False,
) -> Split:
    """scikit-learn's 1,797 real 8×8 handwritten digits, scaled to [0, 1], split at random.

    ``images=False`` gives flat inputs ``[N, 64]``; ``images=True`` gives ``[N, 1, 8, 8]``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "load_digits_split needs scikit-learn: pip install 'ntcov[data]'."
        ) from err
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return split_arrays(x, digits.target, test_fraction=test_fraction, seed=seed, dtype=dtype)


def split_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Shuffle ``(x [N, ...], y [N])`` with ``seed`` and split off ``test_fraction`` of it."""
    if len(x) != len(y):
        raise ValueError(f"split_arrays: x has {len(x)} rows but y has {len(y)}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_arrays: test_fraction must be in (0, 1), got {test_fraction}.")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    xs = torch.as_tensor(np.asarray(x), dtype=dtype)
    ys = torch.as_tensor(np.asarray(y), dtype=torch.long)
    return Split(xs[train], ys[train], xs[test], ys[test])


def load_arrays(
    path: str | Path,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Your own data: an ``.npz`` file with arrays ``x`` (``[N, ...]``) and ``y`` (``[N]`` labels),
    or a ``.csv`` whose last column is the integer label."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_arrays: no file at {path}.")
    if path.suffix == ".npz":
        with np.load(path) as data:
            missing = {"x", "y"} - set(data.files)
            if missing:
                raise ValueError(
                    f"load_arrays: {path} lacks arrays {sorted(missing)}; it has {data.files}."
                )
            x, y = data["x"], data["y"]
    elif path.suffix == ".csv":
        table = np.loadtxt(path, delimiter=",", ndmin=2)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        raise ValueError(f"load_arrays: expected a .npz or .csv file, got {path.name}.")
    return split_arrays(x, y, test_fraction=test_fraction, seed=seed, dtype=dtype)
