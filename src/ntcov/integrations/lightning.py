"""``NtcovCallback``: a :class:`ntcov.Monitor` on a Lightning (``lightning.pytorch``) run.

::

    from ntcov.integrations.lightning import NtcovCallback

    probs = ntcov.properties.probs(module, x_test, y_test)
    trainer = lightning.pytorch.Trainer(max_epochs=3, callbacks=[NtcovCallback({"p": probs},
                                        log_dir="runs/ntcov")])
    trainer.fit(module, loader)

Lightning runs the forward and backward passes inside ``optimizer.step(closure)`` and clips the
gradients at the end of that closure; the monitor's step hooks wrap the closure, so the
prediction is made after the closure, from the gradients the optimizer then applies. The monitor
starts at ``on_train_start`` and stops (hooks removed, report written) at ``on_train_end`` or
when training raises (``on_exception``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ntcov.integrations import MonitorSettings
from ntcov.monitor import Monitor, PropertyLike, UpdateSource
from ntcov.property import Property

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - exercised by hiding lightning
    raise ImportError(
        "ntcov.integrations.lightning needs lightning; install it with: "
        "pip install 'ntcov[lightning]'"
    ) from err

__all__ = ["NtcovCallback"]


class NtcovCallback(Callback):  # type: ignore[misc]
    """Record predicted and actual changes of ``properties`` at every ``every``-th step.

    ``properties`` maps names to :class:`ntcov.Property` objects or to callables
    ``fn(module) -> Tensor`` of the ``LightningModule``. Properties of a submodule (the network
    inside the LightningModule) work too, when the optimizer trains only its parameters: the
    monitored model is then that submodule, and callables are refused (they would get it, not
    the LightningModule). The other arguments are those of :class:`ntcov.Monitor`. Only a
    single optimizer is supported. A second ``fit`` with the same callback continues its log; a
    new callback continues one with ``resume=True`` (training resumed from a checkpoint), else
    it starts a new one.
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

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(
                f"NtcovCallback: the Trainer has {len(optimizers)} optimizers; ntcov monitors "
                "one (configure_optimizers must return a single optimizer)."
            )
        self._close()
        model = _monitored_module(self.properties, pl_module)
        # a second run of the same callback (another fit/train) continues its log
        self.monitor = self.settings.monitor(model, self.properties, optimizers[0], hooks=True)
        self.settings = replace(self.settings, resume=True)
        self.monitor.start()

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()


def _monitored_module(properties: Mapping[str, PropertyLike], pl_module: nn.Module) -> nn.Module:
    """The module of the :class:`Property` objects (they must share one), else ``pl_module``."""
    modules = {id(p.module): p.module for p in properties.values() if isinstance(p, Property)}
    if len(modules) > 1:
        raise ValueError(
            "NtcovCallback: the properties belong to different modules; build them all from the "
            "LightningModule (or from the same network inside it)."
        )
    model = next(iter(modules.values()), pl_module)
    callables = sorted(name for name, p in properties.items() if not isinstance(p, Property))
    if model is not pl_module and callables:
        raise ValueError(
            f"NtcovCallback: properties {callables} are callables, which get the monitored "
            f"module, here the {type(model).__name__} the other properties belong to, not the "
            "LightningModule. Build them as ntcov.Property objects of that network too, or "
            "build every property from the LightningModule."
        )
    return model
