"""``NtcovCallback``: a :class:`ntcov.Monitor` on a Hugging Face ``transformers.Trainer`` run.

::

    from ntcov.integrations.huggingface import NtcovCallback

    probs = ntcov.properties.probs(model, x_test, y_test)
    callback = NtcovCallback({"p": probs}, log_dir="runs/ntcov")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

The Trainer calls the monitor around each optimizer step (its ``on_pre_optimizer_step`` and
``on_optimizer_step`` events), so the prediction uses the gradients after the Trainer's
clipping and after gradient accumulation, exactly as the optimizer applies them. No hook is put
on the optimizer. The monitor starts at ``on_train_begin`` and writes its report at
``on_train_end``; if training raises, ``steps.jsonl`` holds every completed step and
:func:`ntcov.monitor.write_report` builds the report from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntcov.integrations import MonitorSettings
from ntcov.monitor import Monitor, PropertyLike, UpdateSource

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised by hiding transformers
    raise ImportError(
        "ntcov.integrations.huggingface needs transformers; install it with: "
        "pip install 'ntcov[huggingface]'"
    ) from err

__all__ = ["NtcovCallback"]


class NtcovCallback(TrainerCallback):  # type: ignore[misc]
    """Record predicted and actual changes of ``properties`` at every ``every``-th step.

    ``properties`` maps names to :class:`ntcov.Property` objects of the model given to the
    Trainer, or to callables ``fn(model) -> Tensor``. The other arguments are those of
    :class:`ntcov.Monitor`. ``monitor`` is the running monitor (``None`` outside training). A
    second ``train()`` with the same callback continues its log; a new callback continues one
    with ``resume=True`` (``train(resume_from_checkpoint=...)``), else it starts a new one.
    """

    def __init__(
        self,
        properties: Mapping[str, PropertyLike],
        *,
        log_dir: str | Path,
        every: int = 1,
        update: UpdateSource | str = UpdateSource.OBSERVED,
        check_update_every: int = 100,
        tensorboard: bool = False,
        fsync: bool = False,
        resume: bool = False,
    ) -> None:
        self.properties = dict(properties)
        self.settings = MonitorSettings(
            log_dir,
            every,
            update,
            tensorboard,
            fsync,
            check_update_every=check_update_every,
            resume=resume,
        )
        self.monitor: Monitor | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not isinstance(model, nn.Module) or optimizer is None:
            raise ValueError(
                "NtcovCallback: the Trainer passed no model or optimizer to on_train_begin; "
                "ntcov needs both (a torch.nn.Module and a torch.optim optimizer)."
            )
        self._close()  # a run that raised before on_train_end
        # a second run of the same callback (another fit/train) continues its log
        self.monitor = self.settings.monitor(
            model, self.properties, unwrap_optimizer(optimizer), hooks=False
        )
        self.settings = replace(self.settings, resume=True)
        self.monitor.start()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.before_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.after_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``
    (which keep it in ``.optimizer``)."""
    while not _is_plain(optimizer) and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"NtcovCallback: the Trainer's optimizer is a {type(optimizer).__name__}, not a "
            "torch.optim.Optimizer."
        )
    return optimizer


def _is_plain(optimizer: Any) -> bool:
    return type(optimizer).__module__.startswith("torch.optim")
