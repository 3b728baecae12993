"""Plumbing shared by the experiments: output folders and torch's thread count."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["output_folder", "torch_threads"]


def output_folder(out: str | Path) -> Path:
    """The folder ``out``, created if missing; a ``ValueError`` saying why when it cannot be."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} exists and is not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"cannot create the output folder {str(path)!r}: {reason}.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to the output folder {str(path)!r}: permission denied.")
    return path


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads inside the block; the previous count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
