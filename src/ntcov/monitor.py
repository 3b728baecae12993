"""Watch properties change during training: predicted against actual, at every optimizer step.

:class:`Monitor` attaches to a live ``torch.optim`` optimizer. At each (every ``every``-th) step
it predicts the change of each named property ``x`` (``[*S]``, ``K`` entries) to first order
along the update ``Δw`` the optimizer makes, and measures the actual change:

    Δx_pred = J_x Δw,      Δx = x(w + Δw) − x(w)

Both are the weights' doing: buffers the training forward updates (BatchNorm running statistics
in train mode) have already changed when ``x(w)`` is taken, so their drift is in neither, and
the recorded changes need not add up to ``x``'s net change over a run.

Where ``Δw`` comes from (``update``, :class:`UpdateSource`):

- ``"observed"`` (the default): the weights are copied before the step, and after it the JVP is
  taken at them along ``Δw = w_after − w_before``, the step the optimizer actually made, after
  any clipping, loss scaling or schedule, with any optimizer (LBFGS, Lion, Adafactor...). For the
  optimizers :mod:`ntcov.metric` models (SGD, Adam, AdamW, RMSprop, Adagrad), every
  ``check_update_every``-th monitored step (the first included) also computes the
  optimizer-aware ``Δw = −M ⊙ g + b`` from ``p.grad`` and the optimizer's state before the step
  and records how far it is from the step taken (``update_error``, ~1e-13 in float64; in float32
  1e-7 to 1e-3, as ``w_after − w_before`` cancels when steps are small next to ``w``): the check
  that the observed update *is* the optimizer-aware one, at a fraction of its cost.
- ``"optimizer"``: the prediction is made before the step, along ``Δw = −M ⊙ g + b`` read from
  the optimizer's state (:func:`~ntcov.optimizer_step`), and ``update_error`` is recorded at
  every step. It costs one more elementwise pass of the optimizer's arithmetic over the ``P``
  weights per step.

Cost per monitored step: one forward-mode JVP of each property along ``Δw`` (about three forward
passes of what the property evaluates, independent of ``K``; it also gives ``x(w_before)``), one
forward pass of each property after the step, a copy of the weights, and a JSON line.

Properties are evaluated with the model in eval mode (dropout off, BatchNorm on its running
statistics: the network's function, not one noisy training pass); the mode of every submodule is
restored right after. The model, its gradients and the optimizer are otherwise only read: with
or without a monitor, training follows the same trajectory bit for bit.

What is written to ``log_dir``:

- ``config.json``: the properties (name, shape, dtype), the optimizer, ``every``; at the start.
- ``steps.jsonl``: one JSON line per monitored step, written and flushed as soon as the step is
  done (``fsync=True`` also forces it to disk), so a killed run loses at most the step in
  progress. A line is ``{"step", "seconds", "update_error", "properties": {name: {"value",
  "predicted", "actual"}}}``; each property's vectors are its ``K`` entries flattened in
  row-major order (shape in ``config.json``), non-finite numbers as ``null``. ``step`` counts
  optimizer steps from 0; ``update_error`` is ``‖Δw_pred − Δw‖ / ‖Δw‖`` between the
  optimizer-aware update and the step the optimizer actually took (~1e-13 in float64 when the
  optimizer is modelled exactly; float32 loses digits in ``w_after − w_before``), ``null`` on
  steps where it was not checked, and the string ``"inf"`` or ``"nan"`` when the step taken
  was zero but the modelled one was not (a step the optimizer skipped).
- ``tensorboard/`` (``tensorboard=True``): summary scalars per step and property under
  ``ntcov/<name>/``: ``predicted`` and ``actual`` for a scalar property; for ``K > 1``
  ``mean_predicted``, ``mean_actual``, ``relative_error`` (``‖pred − act‖ / ‖act‖``) and
  ``sign_agreement``; and ``ntcov/update_error``.
- ``report.json``, ``report.md`` and ``report.png`` when the monitor closes (:func:`write_report`
  rebuilds them from ``steps.jsonl``, e.g. after a crash): per property R², sign agreement and
  median relative error over all steps and entries, and plots of predicted against actual.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from ntcov import _autodiff, distributed, report
from ntcov._choice import as_choice
from ntcov.metric import optimizer_step, weights_of
from ntcov.params import ParamDict, select_params
from ntcov.property import Property

__all__ = [
    "Monitor",
    "PropertySummary",
    "UpdateSource",
    "read_records",
    "summarize",
    "write_report",
]

PropertyLike = Property | Callable[[nn.Module], Tensor]
STEPS_FILE, CONFIG_FILE = "steps.jsonl", "config.json"
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
TENSORBOARD_DIR = "tensorboard"
SIGN_ROUNDING = 16  # changes below 16·eps·max|x| are rounding noise: their sign is not counted


class UpdateSource(str, Enum):
    """Where :class:`Monitor` takes the update ``Δw`` that it predicts along.

    - ``OBSERVED``: ``Δw = w_after − w_before``, the step the optimizer took (any optimizer); the
      default.
    - ``OPTIMIZER``: ``Δw = −M ⊙ p.grad + b`` from the optimizer's state, before the step
      (:func:`~ntcov.optimizer_step`; SGD, Adam, AdamW, RMSprop, Adagrad).
    """

    OPTIMIZER = "optimizer"
    OBSERVED = "observed"


@dataclass(frozen=True, eq=False)
class _Prediction:
    """``x(w)`` and ``J_x Δw`` per property for one step, and the update they were taken along."""

    step: int
    weights: ParamDict  # w before the step (copies)
    delta: ParamDict  # the update Δw the prediction is taken along
    values: dict[str, Tensor]  # x(w) per property
    predicted: dict[str, Tensor]  # J_x Δw per property


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """The weights before a step, for :attr:`UpdateSource.OBSERVED`, and on a checked step the
    optimizer-aware update ``−M ⊙ g + b`` to compare the step with."""

    step: int
    weights: ParamDict
    modelled: ParamDict | None


class Monitor:
    """Record predicted and actual changes of ``properties`` at every ``every``-th optimizer step.

    ``properties`` maps names to :class:`~ntcov.Property` objects of ``model`` or to callables
    ``fn(model) -> Tensor`` (wrapped as ``Property(model, fn)``). ``optimizer`` is the
    ``torch.optim`` optimizer that trains ``model``: any optimizer with the default
    ``update="observed"``; SGD, Adam, AdamW, RMSprop or Adagrad with ``update="optimizer"`` (see
    :func:`~ntcov.optimizer_step`), and for the ``update_error`` checks every
    ``check_update_every``-th step (``0``: never). Use it as a context manager around a plain
    training loop::

        with ntcov.Monitor(model, {"p": p}, optimizer=opt, log_dir="runs/ntcov"):
            for x, y in loader:
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    Inside the block, step hooks on the optimizer call :meth:`before_step` and :meth:`after_step`
    (a closure passed to ``step`` is wrapped so that the prediction sees the gradients it
    computes); they are removed on exit, also when the block raises. With ``hooks=False``, call
    :meth:`before_step` and :meth:`after_step` yourself around ``optimizer.step()`` (what the
    Hugging Face callback does). ``resume=True`` continues the run already in ``log_dir``
    (see :meth:`start`) instead of starting a new one. See the module docstring for the files
    written to ``log_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        properties: Mapping[str, PropertyLike],
        *,
        optimizer: torch.optim.Optimizer,
        log_dir: str | Path,
        every: int = 1,
        update: UpdateSource | str = UpdateSource.OBSERVED,
        check_update_every: int = 100,
        tensorboard: bool = False,
        fsync: bool = False,
        hooks: bool = True,
        resume: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise ValueError(
                f"Monitor: model is wrapped in {type(model).__name__}; pass the wrapped module "
                "(model.module): the monitor evaluates properties outside the wrapper, and the "
                "gradients it reads are the all-reduced ones the wrapper leaves in p.grad."
            )
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"Monitor: every must be a positive int, got {every!r}.")
        if (
            not isinstance(check_update_every, int)
            or isinstance(check_update_every, bool)
            or check_update_every < 0
        ):
            raise ValueError(
                "Monitor: check_update_every must be an int >= 0 (0: never), got "
                f"{check_update_every!r}."
            )
        self.model, self.optimizer, self.every = model, optimizer, every
        # under torch.distributed only rank 0 predicts and writes; the others stay idle
        self.writes = distributed.rank() == 0
        self.properties = _as_properties(model, properties)
        self.update = as_choice(UpdateSource, update, "Monitor", "update")
        unmodelled = _unmodelled(optimizer, model, required=self.update is UpdateSource.OPTIMIZER)
        # observed updates are checked against the optimizer-aware one when it is modelled
        self._check_every = 0 if unmodelled else check_update_every
        self._unchecked = unmodelled or ("check_update_every=0" if not check_update_every else "")
        self.log_dir = Path(log_dir)
        self._tensorboard, self._fsync, self._hooks = tensorboard, fsync, hooks
        if not isinstance(resume, bool):
            raise TypeError(f"Monitor: resume must be True or False, got {resume!r}.")
        self._resume = resume
        self._file: IO[str] | None = None
        self._board: Any = None
        self._handles: list[Any] = []
        self._pending: _Prediction | _Snapshot | None = None
        self._delta: ParamDict | None = None  # the buffer Δw is written into, step after step
        self._between = False  # before_step ran and after_step has not yet
        self._outer: FrameType | None = None  # the optimizer.step call the hooks are inside
        self._weights: ParamDict | None = None  # the buffer the weights are copied into
        self._step, self._recorded, self._start = 0, 0, 0.0
        self._started = False  # True once start() has run: a later start() continues

    @property
    def steps_recorded(self) -> int:
        """How many steps have been written to ``steps.jsonl``."""
        return self._recorded

    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Write ``config.json``, open ``steps.jsonl`` and attach the step hooks.

        The first start begins a new run (``steps.jsonl`` truncated); starting the same monitor
        again after :meth:`close` (a ``with monitor:`` block per epoch) continues it: records
        are appended, ``step`` keeps counting and the report covers every block. With
        ``resume=True`` a new monitor continues the run already in ``log_dir`` (training resumed
        from a checkpoint): its records are kept (a line cut short by a crash is dropped),
        ``step`` goes on from the last recorded one and the properties must match its
        ``config.json``."""
        if self._file is not None:
            raise RuntimeError("Monitor.start: the monitor is already running.")
        if not self.writes:
            return
        folder = _output_folder(self.log_dir)
        _claim(folder)
        resumed = self._started and (folder / STEPS_FILE).exists()
        continued: _Continued | None = None
        try:
            if not resumed and self._resume and (folder / STEPS_FILE).exists():
                continued = _continue_run(folder, self._config())
            if not resumed:  # a continued run keeps its records under today's settings
                report.write_json(folder / CONFIG_FILE, {}, config=self._config(), seed=0)
            mode = "a" if resumed or continued else "w"
            self._file = open(folder / STEPS_FILE, mode, encoding="utf-8")  # noqa: SIM115
        except BaseException:
            _release(folder)
            raise
        try:
            self._board = _summary_writer(folder / TENSORBOARD_DIR) if self._tensorboard else None
            if self._hooks:
                self._handles = [
                    self.optimizer.register_step_pre_hook(self._pre_hook),
                    self.optimizer.register_step_post_hook(self._post_hook),
                ]
        except BaseException:
            self._detach()
            raise
        if continued is not None:
            self._step, self._recorded = continued.next_step, continued.records
            self._start = time.perf_counter() - continued.seconds
        elif not resumed:
            self._step, self._recorded = 0, 0
            self._start = time.perf_counter()
        self._pending, self._between, self._outer = None, False, None
        self._started = True

    def close(self) -> Path | None:
        """Remove the hooks, close the files and write the report; its path (``None`` when the
        monitor was not running)."""
        if self._file is None:
            return None
        self._detach()
        _save_next_step(self.log_dir, self._step)
        return write_report(self.log_dir)

    def before_step(self) -> None:
        """Predict the coming step's changes from ``p.grad`` and the optimizer's state
        (``UpdateSource.OBSERVED``: copy the weights). Call it right before ``optimizer.step()``
        and :meth:`after_step` right after: anything else is refused."""
        if self._between:
            raise RuntimeError(
                "Monitor.before_step: called again before after_step; call before_step() right "
                "before optimizer.step() and after_step() right after it, once per step."
            )
        self._before()

    def after_step(self) -> None:
        """Measure the step's actual changes and write the step's record."""
        if not self._between:
            raise RuntimeError(
                "Monitor.after_step: called without before_step; call before_step() right "
                "before optimizer.step() and after_step() right after it, once per step."
            )
        self._after()

    def _before(self) -> None:
        self._pending, self._between = None, True
        if not self.writes or self._step % self.every != 0:
            return
        if self.update is UpdateSource.OBSERVED:
            weights = _copy_weights(self.model, self._weights)
            self._weights = weights  # reused by the next step
            self._pending = _Snapshot(self._step, weights, self._modelled_update(weights))
            return
        with _evaluation(self.model):
            self._pending = _predict(self.properties, self.model, self.optimizer, self._step)

    def _after(self) -> None:
        pending, self._pending, self._between = self._pending, None, False
        self._step += 1
        if pending is None:
            return
        if self._file is None:
            raise RuntimeError("Monitor.after_step: the monitor is not running; call start().")
        error: float | None = None
        with _evaluation(self.model):
            if isinstance(pending, _Snapshot):
                if pending.modelled is not None:
                    error = _update_error(self.model, pending.weights, pending.modelled)
                pending = _along_observed(self.properties, self.model, pending, self._delta)
                self._delta = pending.delta  # reused by the next step
            else:
                error = _update_error(self.model, pending.weights, pending.delta)
            after = {name: prop.value() for name, prop in self.properties.items()}
        record = _record(pending, after, error, time.perf_counter() - self._start)
        _write_line(self._file, record, fsync=self._fsync)
        if self._board is not None:
            _log_scalars(self._board, record)
        self._recorded += 1

    def _modelled_update(self, weights: ParamDict) -> ParamDict | None:
        """On a checked step, the optimizer-aware ``Δw`` for the monitored ``weights``."""
        checked = self._recorded if self._check_every else -1
        if checked < 0 or checked % self._check_every != 0:
            return None
        try:
            return _modelled_delta(self.optimizer, self.model, weights)
        except ValueError as err:  # e.g. a GradScaler's scaled step: stop checking, say why once
            self._check_every, self._unchecked = 0, str(err)
            config = self._config()  # the report says why the checks stopped
            report.write_json(self.log_dir / CONFIG_FILE, {}, config=config, seed=0)
            warnings.warn(
                f"Monitor: the optimizer-aware update cannot be checked against the observed "
                f"step ({err}); update_error is not recorded.",
                stacklevel=2,
            )
            return None

    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Predict now, or, when ``step`` gets a closure (which runs the backward pass, as in
        Lightning), right after the closure's first run (LBFGS runs it several times a step).

        Once per ``optimizer.step()``: an optimizer subclass whose ``step`` calls
        ``super().step()`` fires the hooks again inside it, and those are ignored; a step that
        raised before its post-hook leaves nothing behind (its pending record is dropped)."""
        if self._outer is not None and _on_stack(self._outer):
            return None  # super().step() inside the step being monitored
        self._outer = sys._getframe(1)  # torch's wrapper that calls this hook and the post-hook
        self._pending, self._between = None, False  # a previous step that raised
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before()
            return None
        first = [True]

        def closure_then_predict() -> Any:
            result = closure()
            if first[0]:
                first[0] = False
                self._before()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_predict}
        return (args[0], closure_then_predict, *args[2:]), kwargs

    def _post_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if sys._getframe(1) is not self._outer:
            return  # the post-hook of a nested super().step()
        self._outer = None
        if self._between:  # False when the closure never ran
            self._after()

    def _detach(self) -> None:
        """Remove the hooks and close the files (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._pending, self._between, self._outer = [], None, False, None
        try:
            if self._board is not None:
                self._board.close()
        finally:
            self._board = None
            if self._file is not None:
                self._file.close()
                _release(self.log_dir)
            self._file = None

    def _config(self) -> dict[str, Any]:
        return {
            "properties": {
                name: {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
                for name, value in _values(self.properties, self.model).items()
            },
            "optimizer": type(self.optimizer).__qualname__,
            "update": self.update.value,
            "check_update_every": self._check_every,
            "update_unchecked_because": self._unchecked or None,
            "model": type(self.model).__qualname__,
            "every": self.every,
        }


# ----- computing a step ----------------------------------------------------------------------


def _as_properties(model: nn.Module, properties: Mapping[str, PropertyLike]) -> dict[str, Property]:
    """Validate ``properties``; callables become ``Property(model, fn, name=name)``."""
    if not isinstance(properties, Mapping) or not properties:
        raise ValueError(
            "Monitor: properties must be a non-empty dict {name: ntcov.Property or fn(model) -> "
            f"Tensor}}, got {type(properties).__name__} {properties!r:.60}."
        )
    result = {}
    for name, prop in properties.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"Monitor: property names must be non-empty strings, got {name!r}.")
        if isinstance(prop, Property):
            if prop.module is not model:
                raise ValueError(
                    f"Monitor: property {name!r} is a property of a different module than the "
                    f"monitored {type(model).__name__}; build it from the model the optimizer "
                    "trains."
                )
            result[name] = prop
        elif callable(prop):
            result[name] = Property(model, prop, name=name)
        else:
            raise TypeError(
                f"Monitor: property {name!r} must be an ntcov.Property or a callable fn(model) -> "
                f"Tensor, got {type(prop).__name__}."
            )
    return result


_RUNNING: set[Path] = set()  # the log_dirs of the monitors running in this process


@dataclass(frozen=True)
class _Continued:
    """Where a resumed run goes on: its next step, records so far and seconds elapsed."""

    next_step: int
    records: int
    seconds: float


def _continue_run(folder: Path, config: dict[str, Any]) -> _Continued:
    """Check ``folder``'s run against ``config`` and drop a last line cut short by a crash.

    The next step is the one saved when the run was closed; after a kill (nothing saved) the
    step after the last record, which with ``every > 1`` may be early by up to ``every − 1``."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"Monitor: resume=True but {str(folder)!r} holds {STEPS_FILE} without {CONFIG_FILE}; "
            "it is not a monitor run to continue. Use another log_dir, or resume=False."
        )
    saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    if saved["properties"] != config["properties"]:
        raise ValueError(
            f"Monitor: resume=True but the run in {str(folder)!r} watched other properties "
            f"({saved['properties']}, now {config['properties']}); use another log_dir."
        )
    _mend_last_line(folder / STEPS_FILE)
    records = read_records(folder)
    if not records:
        return _Continued(0, 0, 0.0)
    last = records[-1]
    after_last = int(last["step"]) + 1
    next_step = max(int(saved.get("next_step") or 0), after_last)
    return _Continued(next_step, len(records), float(last["seconds"]))


def _mend_last_line(path: Path) -> None:
    """End ``path`` with a newline: a complete last record gets one, a cut-off line is dropped."""
    text = path.read_text(encoding="utf-8")
    if not text or text.endswith("\n"):
        return
    cut = text.rfind("\n") + 1
    try:
        json.loads(text[cut:])
    except json.JSONDecodeError:
        path.write_text(text[:cut], encoding="utf-8")
    else:
        path.write_text(text + "\n", encoding="utf-8")


def _save_next_step(folder: Path, step: int) -> None:
    """Note in ``config.json`` the step a resumed run goes on from."""
    path = folder / CONFIG_FILE
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["config"]["next_step"] = step
    report.write_json(path, {}, config=saved["config"], seed=0)


def _claim(folder: Path) -> None:
    """Refuse a ``log_dir`` that a running monitor of this process writes to."""
    key = folder.resolve()
    if key in _RUNNING:
        raise ValueError(
            f"Monitor: log_dir {str(folder)!r} is in use by another running monitor of this "
            "process; give each monitor its own log_dir. A monitor left open by a run that "
            "raised (Hugging Face's Trainer has no exception hook, so its NtcovCallback cannot "
            "close on an error) is closed by callback.monitor.close()."
        )
    _RUNNING.add(key)


def _release(folder: Path) -> None:
    _RUNNING.discard(Path(folder).resolve())


def _on_stack(frame: FrameType) -> bool:
    """Whether ``frame`` is one of the frames the current call is running inside."""
    current: FrameType | None = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def _unmodelled(optimizer: torch.optim.Optimizer, model: nn.Module, *, required: bool) -> str:
    """Why :func:`~ntcov.optimizer_step` cannot model ``optimizer`` (``""``: it can; an
    unsupported optimizer or a GradScaler's scaled step raise when ``required``); an optimizer of
    other weights is always refused."""
    try:
        weights_of(optimizer, model)
    except ValueError as err:
        raise ValueError(f"Monitor: {err}") from err
    try:
        optimizer_step(optimizer, model, {})
    except (TypeError, ValueError) as err:
        if required:
            raise type(err)(
                f"Monitor: {err} With update='observed' the monitor predicts along the step "
                "the optimizer actually takes, which works with any optimizer."
            ) from err
        return str(err)
    return ""


def _values(properties: Mapping[str, Property], model: nn.Module) -> dict[str, Tensor]:
    with _evaluation(model):
        return {name: prop.value() for name, prop in properties.items()}


def _predict(
    properties: Mapping[str, Property],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> _Prediction:
    """``x(w)`` and ``J_x Δw`` for every property, ``Δw = −M ⊙ p.grad + b`` (one JVP each)."""
    weights = select_params(model)
    delta = _modelled_delta(optimizer, model, weights)
    return _Prediction(step, weights, delta, *_directional(properties, weights, delta))


def _modelled_delta(
    optimizer: torch.optim.Optimizer, model: nn.Module, weights: ParamDict
) -> ParamDict:
    """The optimizer-aware update ``−M ⊙ p.grad + b`` of the monitored ``weights``."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    full = optimizer_step(optimizer, model, grads).delta(grads)
    return {name: full[name] for name in weights}


def _along_observed(
    properties: Mapping[str, Property],
    model: nn.Module,
    snapshot: _Snapshot,
    out: ParamDict | None,
) -> _Prediction:
    """``x(w_before)`` and ``J_x (w_after − w_before)``, taken after the step (the update is
    written into ``out`` when it fits)."""
    delta = _observed_update(model, snapshot.weights, out)
    values, predicted = _directional(properties, snapshot.weights, delta)
    return _Prediction(snapshot.step, snapshot.weights, delta, values, predicted)


def _directional(
    properties: Mapping[str, Property], weights: ParamDict, delta: ParamDict
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``x(w)`` and ``J_x Δw`` per property: one forward-mode JVP each."""
    values, predicted = {}, {}
    with _autodiff.one_warning_per_cause():
        for name, prop in properties.items():
            values[name], predicted[name] = _autodiff.directional(
                prop, weights, delta, force_reverse=False
            )
    return values, predicted


def _copy_weights(model: nn.Module, buffer: ParamDict | None) -> ParamDict:
    """Copies of the trainable weights (:func:`select_params`), written into ``buffer`` when it
    holds the same weights (names and shapes) as last time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if buffer is None or not _fits(buffer, params):
        return select_params(model)
    with torch.no_grad():
        torch._foreach_copy_(list(buffer.values()), [p.detach() for p in params.values()])
    return buffer


def _fits(buffer: ParamDict | None, tensors: Mapping[str, Tensor]) -> bool:
    """Whether ``buffer`` has the names, shapes and dtypes of ``tensors``."""
    if buffer is None or buffer.keys() != tensors.keys():
        return False
    return all(
        buffer[n].shape == t.shape and buffer[n].dtype == t.dtype for n, t in tensors.items()
    )


def _observed_update(
    model: nn.Module, before: ParamDict, out: ParamDict | None = None
) -> ParamDict:
    """``w_after − w_before`` for the weights in ``before`` (written into ``out`` when it fits)."""
    params = dict(model.named_parameters())
    names = list(before)
    with torch.no_grad():
        after = [params[name].detach() for name in names]
        if out is None or not _fits(out, before):
            steps = torch._foreach_sub(after, [before[name] for name in names])
            return dict(zip(names, steps, strict=True))
        buffers = [out[name] for name in names]
        torch._foreach_copy_(buffers, after)
        torch._foreach_sub_(buffers, [before[name] for name in names])
    return out


def _update_error(model: nn.Module, before: ParamDict, delta: ParamDict) -> float:
    """``‖Δw_pred − Δw‖ / ‖Δw‖`` over the monitored weights (0 when both are zero)."""
    actual = _observed_update(model, before)
    names = list(actual)
    with torch.no_grad():
        residual = torch._foreach_sub([delta[n] for n in names], [actual[n] for n in names])
        norms = torch._foreach_norm(residual) + torch._foreach_norm(list(actual.values()))
        squares = torch.stack(norms).double().square()
    residual_sq, scale_sq = float(squares[: len(names)].sum()), float(squares[len(names) :].sum())
    if scale_sq == 0.0:
        return 0.0 if residual_sq == 0.0 else math.inf
    return math.sqrt(residual_sq / scale_sq)


@contextmanager
def _evaluation(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; every submodule's mode restored after it."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


# ----- writing records -----------------------------------------------------------------------


def _record(
    prediction: _Prediction,
    after: Mapping[str, Tensor],
    update_error: float | None,
    seconds: float,
) -> dict[str, Any]:
    entries = {}
    for name, before in prediction.values.items():
        entries[name] = {
            "value": _floats(before),
            "predicted": _floats(prediction.predicted[name]),
            "actual": _floats(after[name] - before),
        }
    return {
        "step": prediction.step,
        "seconds": round(seconds, 6),
        # not checked: null; no agreement at all (a step the optimizer skipped): "inf"/"nan"
        "update_error": update_error
        if update_error is None or math.isfinite(update_error)
        else repr(update_error),
        "properties": entries,
    }


def _floats(values: Tensor) -> list[float | None]:
    """The entries of ``values`` flattened (row-major), non-finite ones as ``None``."""
    flat = values.detach().reshape(-1).cpu().double()
    if bool(torch.isfinite(flat).all()):
        return flat.tolist()
    return [v if math.isfinite(v) else None for v in flat.tolist()]


def _write_line(file: IO[str], record: Mapping[str, Any], *, fsync: bool) -> None:
    """Append one JSON line and push it to the OS (and to the disk with ``fsync``)."""
    file.write(json.dumps(record, allow_nan=False) + "\n")
    file.flush()
    if fsync:
        os.fsync(file.fileno())


def _summary_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "Monitor(tensorboard=True) needs tensorboard; install it with: "
            "pip install 'ntcov[tensorboard]'"
        ) from err
    return SummaryWriter(log_dir=str(folder))


def _log_scalars(board: Any, record: Mapping[str, Any]) -> None:
    """Summary scalars of one record (see the module docstring for the tags)."""
    step = record["step"]
    if record["update_error"] is not None:
        board.add_scalar("ntcov/update_error", float(record["update_error"]), step)
    for name, entry in record["properties"].items():
        pred, act = _array(entry["predicted"]), _array(entry["actual"])
        if pred.size == 1:
            board.add_scalar(f"ntcov/{name}/predicted", float(pred[0]), step)
            board.add_scalar(f"ntcov/{name}/actual", float(act[0]), step)
            continue
        board.add_scalar(f"ntcov/{name}/mean_predicted", float(np.mean(pred)), step)
        board.add_scalar(f"ntcov/{name}/mean_actual", float(np.mean(act)), step)
        board.add_scalar(f"ntcov/{name}/relative_error", report.relative_error(pred, act), step)
        board.add_scalar(f"ntcov/{name}/sign_agreement", report.sign_agreement(pred, act), step)


def _array(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _output_folder(folder: Path) -> Path:
    """``folder``, created if missing; a ``ValueError`` saying why when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"Monitor: cannot create log_dir {str(folder)!r}: {reason}.") from None
    return folder


# ----- reading records and reporting ---------------------------------------------------------


@dataclass(frozen=True)
class PropertySummary:
    """How well one property's changes were predicted, over all recorded steps and entries.

    - ``r_squared``: ``1 − Σ(pred − act)² / Σ(act − mean act)²`` over all (step, entry) pairs.
    - ``sign_agreement``: fraction of pairs with ``sign(pred) = sign(act)``, counting only
      changes above the rounding floor ``16·eps·max|x|``.
    - ``median_relative_error``: median of ``|pred − act| / |act|`` over the same pairs.
    - ``median_step_relative_error``: median over steps of ``‖pred − act‖ / ‖act‖``.
    - ``nonfinite_steps``: steps with a ``nan``/``inf`` value, prediction or change (a diverged
      run); the statistics are over the finite entries only.
    """

    steps: int
    entries: int
    r_squared: float
    sign_agreement: float
    median_relative_error: float
    median_step_relative_error: float
    nonfinite_steps: int = 0


def read_records(log_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``log_dir/steps.jsonl``, in order. A last line cut short by a crash in the
    middle of a write is skipped; any other line that does not parse raises ``ValueError``."""
    path = Path(log_dir) / STEPS_FILE
    if not path.is_file():
        raise ValueError(f"read_records: {str(path)!r} does not exist; is it a Monitor log_dir?")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"read_records: line {number} of {str(path)!r} is not JSON.") from err
    return records


def summarize(
    records: list[dict[str, Any]], config: Mapping[str, Any]
) -> dict[str, PropertySummary]:
    """:class:`PropertySummary` per property of ``config["properties"]`` over ``records``."""
    result = {}
    for name, info in config["properties"].items():
        pred, act, value = (
            _stacked(records, name, key) for key in ("predicted", "actual", "value")
        )
        result[name] = _summary(pred, act, value, _eps(info["dtype"]))
    return result


def _eps(dtype: str) -> float:
    """Machine epsilon of a torch dtype name ("float32", "bfloat16", ...; NumPy has no bf16)."""
    torch_dtype = getattr(torch, dtype, None)
    if isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point:
        return torch.finfo(torch_dtype).eps
    return float(np.finfo(np.float64).eps)


def _stacked(records: list[dict[str, Any]], name: str, key: str) -> np.ndarray:
    """``[steps, K]`` float64 (``nan`` for ``null``)."""
    rows = [_array(r["properties"][name][key]) for r in records]
    return np.stack(rows) if rows else np.zeros((0, 0))


def _summary(pred: np.ndarray, act: np.ndarray, value: np.ndarray, eps: float) -> PropertySummary:
    finite = np.isfinite(pred) & np.isfinite(act)
    diverged = ~(finite & np.isfinite(value))
    scale = float(np.nanmax(np.abs(value))) if np.isfinite(value).any() else 0.0
    counted = finite & (np.abs(act) > SIGN_ROUNDING * eps * scale)
    ratio = np.abs(pred[counted] - act[counted]) / np.abs(act[counted])
    per_step = [
        report.relative_error(p[f], a[f])
        for p, a, f in zip(pred, act, finite, strict=True)
        if np.any(a[f] != 0)
    ]
    return PropertySummary(
        steps=int(pred.shape[0]),
        entries=int(pred.shape[1]) if pred.ndim == 2 else 0,
        r_squared=report.r_squared(pred[finite], act[finite]) if finite.any() else math.nan,
        sign_agreement=report.sign_agreement(pred[counted], act[counted]),
        median_relative_error=float(np.median(ratio)) if ratio.size else math.nan,
        median_step_relative_error=float(np.median(per_step)) if per_step else math.nan,
        nonfinite_steps=int(diverged.any(axis=1).sum()) if diverged.ndim == 2 else 0,
    )


def write_report(log_dir: str | Path) -> Path:
    """Write ``report.json``, ``report.md`` and (with matplotlib) ``report.png`` from
    ``log_dir/config.json`` and ``steps.jsonl``; returns the path of ``report.md``."""
    folder = Path(log_dir)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"write_report: {str(config_path)!r} does not exist.")
    config = json.loads(config_path.read_text(encoding="utf-8"))["config"]
    records = read_records(folder)
    summaries = summarize(records, config)
    errors = [float(r["update_error"]) for r in records if r["update_error"] is not None]
    results = {
        "steps": len(records),
        "max_update_error": max(errors) if errors else None,
        "nonfinite_update_errors": sum(not math.isfinite(e) for e in errors),
        "properties": summaries,
    }
    report.write_json(folder / REPORT_JSON, results, config=config, seed=0)
    plotted = report.plot_available() and bool(records)
    if plotted:
        _plot(records, list(summaries), folder / REPORT_PNG)
    path = folder / REPORT_MD
    unchecked = config.get("update_unchecked_because")
    text = _markdown(summaries, len(records), errors, plotted, unchecked)
    path.write_text(text, encoding="utf-8")
    return path


def _markdown(
    summaries: Mapping[str, PropertySummary],
    steps: int,
    errors: list[float],
    plotted: bool,
    unchecked: str | None = None,
) -> str:
    headers = ["property", "entries", "R²", "sign agreement", "median rel. error"]
    headers += ["median per-step rel. error", "non-finite steps"]
    rows: list[list[report.Cell]] = [
        [
            name,
            s.entries,
            s.r_squared,
            s.sign_agreement,
            s.median_relative_error,
            s.median_step_relative_error,
            s.nonfinite_steps,
        ]
        for name, s in summaries.items()
    ]
    diverged = max((s.nonfinite_steps for s in summaries.values()), default=0)
    lines = [
        "# ntcov monitor: predicted against actual change per optimizer step",
        "",
        f"{steps} step{'' if steps == 1 else 's'} recorded; "
        + _update_error_line(errors, unchecked),
        "",
        report.format_markdown_table(headers, rows),
        "",
        "R² and sign agreement over every (step, entry) pair of predicted and actual change; "
        "median rel. error: median of |pred − act| / |act| over those pairs; median per-step "
        "rel. error: median over steps of ‖pred − act‖ / ‖act‖ across a property's entries.",
    ]
    if diverged:
        lines += [
            "",
            f"**{diverged} of {steps} steps have nan or inf values, predictions or changes** "
            "(the run diverged, or a property is undefined there); the statistics above are "
            "over the finite entries only.",
        ]
    if plotted:
        lines += ["", f"![predicted against actual]({REPORT_PNG})"]
    return "\n".join(lines) + "\n"


def _update_error_line(errors: list[float], unchecked: str | None) -> str:
    if errors:
        return f"largest update error ‖Δw_pred − Δw‖/‖Δw‖: {max(errors):.3g}"
    if unchecked:
        return f"the optimizer-aware update was not checked against the steps taken ({unchecked})"
    return "largest update error ‖Δw_pred − Δw‖/‖Δw‖: -"


def _row_means(values: np.ndarray) -> np.ndarray:
    """Mean of the finite entries of each row (``nan`` for a row without any)."""
    finite = np.isfinite(values)
    counts = finite.sum(1)
    sums = np.where(finite, values, 0.0).sum(1)
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)


def _plot(records: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Per property: predicted against actual (every step and entry), and the mean change over
    the steps (solid: actual, dashed: predicted)."""
    fig, axes = report.new_figure(len(names), 2, size=(10.0, 3.6 * len(names)))
    steps = [r["step"] for r in records]
    for row, name in enumerate(names):
        pred, act = _stacked(records, name, "predicted"), _stacked(records, name, "actual")
        report.scatter_predicted_actual(axes[row, 0], pred, act, size=6.0)
        report.add_identity_line(axes[row, 0])
        axes[row, 0].set_title(f"{name}: every step and entry")
        report.plot_series_pair(
            axes[row, 1], steps, _row_means(act), _row_means(pred), label="mean change"
        )
        axes[row, 1].set_xlabel("optimizer step")
        axes[row, 1].set_title(f"{name}: mean over its {pred.shape[1]} entries")
        axes[row, 1].legend(fontsize=8)
    report.save_figure(fig, path)
