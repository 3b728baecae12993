"""Callbacks that attach a :class:`ntcov.Monitor` to training frameworks.

Each lives in its own module, imported on demand so that ``import ntcov`` never imports the
framework:

- :mod:`ntcov.integrations.huggingface`: ``NtcovCallback`` for ``transformers.Trainer``
  (``pip install 'ntcov[huggingface]'``);
- :mod:`ntcov.integrations.lightning`: ``NtcovCallback`` for ``lightning.pytorch.Trainer``
  (``pip install 'ntcov[lightning]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ntcov.monitor import Monitor, PropertyLike, UpdateSource

__all__ = ["MonitorSettings"]


@dataclass(frozen=True)
class MonitorSettings:
    """The :class:`ntcov.Monitor` arguments a callback passes on (see there)."""

    log_dir: str | Path
    every: int = 1
    update: UpdateSource | str = UpdateSource.OBSERVED
    tensorboard: bool = False
    fsync: bool = False
    check_update_every: int = 100
    resume: bool = False

    def monitor(
        self,
        model: nn.Module,
        properties: dict[str, PropertyLike],
        optimizer: torch.optim.Optimizer,
        *,
        hooks: bool,
    ) -> Monitor:
        """A monitor with these settings (not started)."""
        return Monitor(
            model,
            properties,
            optimizer=optimizer,
            log_dir=self.log_dir,
            every=self.every,
            update=self.update,
            check_update_every=self.check_update_every,
            tensorboard=self.tensorboard,
            fsync=self.fsync,
            hooks=hooks,
            resume=self.resume,
        )
