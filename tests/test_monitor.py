"""The training monitor: ntcov's predictions, training left untouched, files that survive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import ntcov
from ntcov import properties as P
from ntcov import report
from ntcov.monitor import Monitor, read_records, summarize, write_report

DTYPE = torch.float64
Factory = Callable[[nn.Module], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Factory] = {
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1),
}


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)).to(
        DTYPE
    )


def _data(n: int = 40, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator, dtype=DTYPE)
    return x, torch.randint(0, 3, (n,), generator=generator)


def _batch(x: Tensor, y: Tensor, step: int, size: int = 8) -> tuple[Tensor, Tensor]:
    start = (step * size) % x.shape[0]
    return x[start : start + size], y[start : start + size]


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: Tensor, yb: Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    opt.step()


@pytest.mark.parametrize("update", ["observed", "optimizer"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_predictions_are_predict_step_on_the_minibatch_loss(
    name: str, update: str, tmp_path: Path
) -> None:
    model, (x, y) = _mlp(), _data()
    opt = OPTIMIZERS[name](model)
    probs = P.probs(model, x[:10], y[:10])
    expected, actual = [], []
    checks = {"update": update, "check_update_every": 1}
    with Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path, **checks) as monitor:
        for step in range(6):
            xb, yb = _batch(x, y, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            expected.append(ntcov.predict_step(probs, P.loss(model, xb, yb), opt).first_order)
            before = probs.value()
            opt.step()
            actual.append(probs.value() - before)
    assert monitor.steps_recorded == 6
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == list(range(6))
    for record, want, change in zip(records, expected, actual, strict=True):
        entry = record["properties"]["p"]
        torch.testing.assert_close(torch.tensor(entry["predicted"], dtype=DTYPE), want)
        torch.testing.assert_close(torch.tensor(entry["actual"], dtype=DTYPE), change)
        assert record["update_error"] < 1e-12  # the optimizer was modelled exactly
    summary = json.loads((tmp_path / "report.json").read_text())["properties"]["p"]
    assert summary["r_squared"] > 0.99  # small steps: first order explains the real changes


def test_observed_update_gives_the_same_predictions(tmp_path: Path) -> None:
    runs = {}
    for update in ("optimizer", "observed"):
        model, (x, y) = _mlp(), _data()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        props = {"p": P.probs(model, x[:10], y[:10]), "norm": lambda m: m[0].weight.norm()}
        folder = tmp_path / update
        with Monitor(
            model, props, optimizer=opt, log_dir=folder, update=update, check_update_every=3
        ):
            for step in range(4):
                _train_step(model, opt, *_batch(x, y, step))
        runs[update] = read_records(tmp_path / update)
    for step, (first, second) in enumerate(zip(runs["optimizer"], runs["observed"], strict=True)):
        assert first["update_error"] < 1e-12
        if step % 3:  # observed: the optimizer-aware update is checked at steps 0 and 3 only
            assert second["update_error"] is None
        else:
            assert second["update_error"] < 1e-12
        for name in ("p", "norm"):
            for key in ("value", "predicted", "actual"):
                np.testing.assert_allclose(
                    first["properties"][name][key], second["properties"][name][key], rtol=1e-9
                )


def _run(monitored: bool, log_dir: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Five Adam steps of a model with active dropout, from a fixed random state."""
    model, (x, y) = _mlp(dropout=0.3), _data()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)
    torch.manual_seed(123)
    props = {"p": P.probs(model, x[:10], y[:10]), "logits": lambda m: m(x[:3])}
    if not monitored:
        for step in range(5):
            _train_step(model, opt, *_batch(x, y, step))
        return model, opt
    with Monitor(model, props, optimizer=opt, log_dir=log_dir):
        for step in range(5):
            _train_step(model, opt, *_batch(x, y, step))
            assert all(m.training for m in model.modules())  # modes restored after each step
    return model, opt


def test_training_is_identical_bit_for_bit_with_and_without_the_monitor(tmp_path: Path) -> None:
    plain_model, plain_opt = _run(False, tmp_path)
    model, opt = _run(True, tmp_path)
    for (name, a), b in zip(plain_model.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad), name
    plain_state, state = plain_opt.state_dict(), opt.state_dict()
    assert plain_state["param_groups"] == state["param_groups"]
    for key, entry in plain_state["state"].items():
        for field, value in entry.items():
            assert torch.equal(value, state["state"][key][field]), (key, field)
    assert torch.equal(torch.get_rng_state(), _rng_after_plain_run(tmp_path))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def _rng_after_plain_run(tmp_path: Path) -> Tensor:
    _run(False, tmp_path)
    return torch.get_rng_state()


def test_hooks_are_removed_and_records_kept_when_training_raises(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match="boom"),
        Monitor(model, {"p": P.probs(model, x[:5], y[:5])}, optimizer=opt, log_dir=tmp_path),
    ):
        for step in range(3):
            _train_step(model, opt, *_batch(x, y, step))
        raise RuntimeError("boom")
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert [r["step"] for r in read_records(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "report.md").is_file()
    _train_step(model, opt, *_batch(x, y, 3))  # no hook left: nothing is recorded
    assert len(read_records(tmp_path)) == 3


def test_every_kth_step_is_recorded(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(
        model, {"p": P.probs(model, x[:5], y[:5])}, optimizer=opt, log_dir=tmp_path, every=3
    ):
        for step in range(7):
            _train_step(model, opt, *_batch(x, y, step))
    assert [r["step"] for r in read_records(tmp_path)] == [0, 3, 6]


def test_a_monitor_started_again_continues_its_run(tmp_path: Path) -> None:
    """A ``with monitor:`` block per epoch: the second block appends, steps keep counting and
    the report covers both; a new monitor on the same folder starts a new run."""
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, {"p": P.probs(model, x[:5], y[:5])}, optimizer=opt, log_dir=tmp_path)
    for epoch in range(2):
        with monitor:
            for step in range(3):
                _train_step(model, opt, *_batch(x, y, 3 * epoch + step))
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == list(range(6))
    assert monitor.steps_recorded == 6
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds)
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 6
    with Monitor(model, {"p": P.probs(model, x[:5], y[:5])}, optimizer=opt, log_dir=tmp_path):
        _train_step(model, opt, *_batch(x, y, 0))
    assert [r["step"] for r in read_records(tmp_path)] == [0]


def test_a_closure_step_is_predicted_from_the_gradient_it_computes(tmp_path: Path) -> None:
    """As in Lightning: ``step(closure)`` runs the backward pass inside the step."""
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    probs = P.probs(model, x[:10], y[:10])
    expected = []
    with Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path, check_update_every=1):
        for step in range(3):
            xb, yb = _batch(x, y, step)
            opt.zero_grad()
            expected.append(_predict_with_gradient_of(probs, model, opt, xb, yb))

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure) if step % 2 else opt.step(closure=closure)
    for record, want in zip(read_records(tmp_path), expected, strict=True):
        got = torch.tensor(record["properties"]["p"]["predicted"], dtype=DTYPE)
        torch.testing.assert_close(got, want)
        assert record["update_error"] < 1e-12


def _predict_with_gradient_of(
    probs: ntcov.Property, model: nn.Module, opt: torch.optim.Optimizer, xb: Tensor, yb: Tensor
) -> Tensor:
    return ntcov.predict_step(probs, P.loss(model, xb, yb), opt).first_order


def test_report_statistics_are_those_of_the_records(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with Monitor(model, {"p": P.probs(model, x[:10], y[:10])}, optimizer=opt, log_dir=tmp_path):
        for step in range(8):
            _train_step(model, opt, *_batch(x, y, step))
    records = read_records(tmp_path)
    pred = np.array([r["properties"]["p"]["predicted"] for r in records])
    act = np.array([r["properties"]["p"]["actual"] for r in records])
    saved = json.loads((tmp_path / "report.json").read_text())
    summary = saved["properties"]["p"]
    assert summary["steps"] == 8 and summary["entries"] == 10
    assert summary["r_squared"] == pytest.approx(report.r_squared(pred, act), rel=1e-12)
    assert summary["sign_agreement"] == pytest.approx(report.sign_agreement(pred, act))
    ratio = np.abs(pred - act) / np.abs(act)
    assert summary["median_relative_error"] == pytest.approx(float(np.median(ratio)))
    config = json.loads((tmp_path / "config.json").read_text())["config"]
    assert config["properties"]["p"] == {"shape": [10], "dtype": "float64"}
    assert summarize(records, config)["p"].r_squared == pytest.approx(summary["r_squared"])
    assert "| p | 10 |" in (tmp_path / "report.md").read_text()
    if report.plot_available():
        assert (tmp_path / "report.png").stat().st_size > 1000
    (tmp_path / "report.json").unlink()
    write_report(tmp_path)  # rebuilt from the files alone
    assert json.loads((tmp_path / "report.json").read_text())["properties"] == saved["properties"]


def test_a_diverged_run_is_reported_not_hidden(tmp_path: Path, recwarn: object) -> None:
    """A weight set to nan mid-run: the report counts the non-finite steps and says so."""
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, {"p": P.probs(model, x[:10], y[:10])}, optimizer=opt, log_dir=tmp_path):
        for step in range(5):
            if step == 2:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")
            _train_step(model, opt, *_batch(x, y, step))
    summary = json.loads((tmp_path / "report.json").read_text())["properties"]["p"]
    assert summary["steps"] == 5 and summary["nonfinite_steps"] == 3
    assert "3 of 5 steps have nan or inf values" in (tmp_path / "report.md").read_text()
    assert not [w for w in recwarn.list if "empty slice" in str(w.message)]  # type: ignore[attr-defined]


def test_tensorboard_gets_summary_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    props = {"p": P.probs(model, x[:10], y[:10]), "norm": lambda m: m[0].weight.norm()}
    with Monitor(model, props, optimizer=opt, log_dir=tmp_path, tensorboard=True):
        for step in range(3):
            _train_step(model, opt, *_batch(x, y, step))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"ntcov/p/mean_predicted", "ntcov/p/relative_error", "ntcov/norm/actual"} <= tags
    records = read_records(tmp_path)
    logged = [e.value for e in events.Scalars("ntcov/norm/predicted")]
    wanted = [r["properties"]["norm"]["predicted"][0] for r in records]
    np.testing.assert_allclose(logged, wanted, rtol=1e-6)  # tensorboard stores float32


CHILD = """
import sys, torch
from torch import nn
from ntcov.monitor import Monitor
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 2, (32,))
with Monitor(model, {"logits": lambda m: m(x[:16])}, optimizer=opt, log_dir=sys.argv[1]):
    while True:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
"""


def test_a_killed_run_leaves_every_completed_step_readable(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    log_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), str(log_dir)], stderr=subprocess.PIPE)
    steps = log_dir / "steps.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if steps.is_file() and steps.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        _, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()
    lines = steps.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert len(records) >= 20
    assert [r["step"] for r in records] == list(range(len(records)))
    assert all(len(r["properties"]["logits"]["actual"]) == 32 for r in records)
    assert not (log_dir / "report.json").exists()  # killed: no report, the records are all there
    write_report(log_dir)
    assert json.loads((log_dir / "report.json").read_text())["steps"] == len(records)


def test_an_update_that_cannot_be_modelled_is_not_checked(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    probs = P.probs(model, x[:4], y[:4])
    with Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path, check_update_every=1):
        _train_step(model, opt, *_batch(x, y, 0))
        opt.grad_scale = torch.tensor(2.0)  # as a GradScaler leaves it: the step is scaled
        with pytest.warns(UserWarning, match="cannot be checked against the observed step"):
            _train_step(model, opt, *_batch(x, y, 1))
        _train_step(model, opt, *_batch(x, y, 2))
    errors = [r["update_error"] for r in read_records(tmp_path)]
    assert errors[0] < 1e-12 and errors[1:] == [None, None]
    assert "not checked against the steps taken" not in (tmp_path / "report.md").read_text()
    reason = json.loads((tmp_path / "config.json").read_text())["config"]
    assert "scaled" in reason["update_unchecked_because"]


def test_the_report_says_why_updates_were_not_checked(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.Adadelta(model.parameters())  # not modelled by ntcov.optimizer_step
    with Monitor(model, {"p": P.probs(model, x[:4], y[:4])}, optimizer=opt, log_dir=tmp_path):
        _train_step(model, opt, *_batch(x, y, 0))
    assert read_records(tmp_path)[0]["update_error"] is None
    text = (tmp_path / "report.md").read_text()
    assert "not checked against the steps taken" in text and "Adadelta" in text


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    model, other = _mlp(), _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probs = P.probs(model, x[:4], y[:4])
    with pytest.raises(ValueError, match="non-empty dict"):
        Monitor(model, {}, optimizer=opt, log_dir=tmp_path)
    with pytest.raises(ValueError, match="different module"):
        Monitor(model, {"p": P.probs(other, x[:4], y[:4])}, optimizer=opt, log_dir=tmp_path)
    with pytest.raises(TypeError, match=r"must be an ntcov\.Property or a callable"):
        Monitor(model, {"p": 3}, optimizer=opt, log_dir=tmp_path)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="every must be a positive int"):
        Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path, every=0)
    with pytest.raises(ValueError, match="unknown update 'after'"):
        Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path, update="after")
    with pytest.raises(TypeError, match="LBFGS is not supported"):
        Monitor(
            model,
            {"p": probs},
            optimizer=torch.optim.LBFGS(model.parameters()),
            log_dir=tmp_path,
            update="optimizer",
        )
    Monitor(  # any optimizer works when the update is observed (the default)
        model, {"p": probs}, optimizer=torch.optim.LBFGS(model.parameters()), log_dir=tmp_path
    )
    with pytest.raises(ValueError, match="check_update_every must be an int >= 0"):
        Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path, check_update_every=-1)
    with pytest.raises(ValueError, match="not parameters of the Sequential"):
        Monitor(
            model, {"p": probs}, optimizer=torch.optim.SGD(other.parameters()), log_dir=tmp_path
        )
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot create log_dir"):
        Monitor(model, {"p": probs}, optimizer=opt, log_dir=blocked / "sub").start()
    monitor = Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path / "ok")
    with monitor, pytest.raises(RuntimeError, match="already running"):
        monitor.start()
    assert not opt._optimizer_step_pre_hooks


def test_lbfgs_closure_is_watched_from_the_weights_before_the_step(tmp_path: Path) -> None:
    """LBFGS runs the closure several times per step: the weights are copied once, after its
    first run, so value and actual change are those of the whole step."""
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    probs = P.probs(model, x[:10], y[:10])
    befores, changes = [], []
    with Monitor(model, {"p": probs}, optimizer=opt, log_dir=tmp_path):
        for step in range(3):
            xb, yb = _batch(x, y, step)

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            befores.append(probs.value())
            opt.step(closure)
            changes.append(probs.value() - befores[-1])
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    for record, before, change in zip(records, befores, changes, strict=True):
        entry = record["properties"]["p"]
        torch.testing.assert_close(torch.tensor(entry["value"], dtype=DTYPE), before)
        torch.testing.assert_close(torch.tensor(entry["actual"], dtype=DTYPE), change)


class _SubclassedSGD(torch.optim.SGD):
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return super().step(closure)


def test_a_subclass_calling_super_step_is_one_step(tmp_path: Path) -> None:
    """torch fires the step hooks for the subclass's step and again for SGD.step inside it."""
    torch.optim.SGD(_mlp().parameters(), lr=0.1)  # patches SGD.step with torch's hook wrapper
    model, (x, y) = _mlp(), _data()
    opt = _SubclassedSGD(model.parameters(), lr=0.1)
    with Monitor(model, {"p": P.probs(model, x[:4], y[:4])}, optimizer=opt, log_dir=tmp_path):
        for step in range(4):
            _train_step(model, opt, *_batch(x, y, step))
    assert [r["step"] for r in read_records(tmp_path)] == [0, 1, 2, 3]


def test_a_step_that_raises_does_not_stop_the_monitor(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def failing() -> Tensor:
        raise ArithmeticError("a closure that fails")

    with Monitor(model, {"p": P.probs(model, x[:4], y[:4])}, optimizer=opt, log_dir=tmp_path):
        _train_step(model, opt, *_batch(x, y, 0))
        with pytest.raises(ArithmeticError):
            opt.step(failing)
        _train_step(model, opt, *_batch(x, y, 1))
    assert [r["step"] for r in read_records(tmp_path)] == [0, 1]


def test_manual_calls_out_of_order_and_a_shared_log_dir_are_refused(tmp_path: Path) -> None:
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    props = {"p": P.probs(model, x[:4], y[:4])}
    monitor = Monitor(model, props, optimizer=opt, log_dir=tmp_path, hooks=False)
    with monitor:
        with pytest.raises(RuntimeError, match="after_step: called without before_step"):
            monitor.after_step()
        monitor.before_step()
        with pytest.raises(RuntimeError, match="before_step: called again before after_step"):
            monitor.before_step()
        opt.step()
        monitor.after_step()
        with pytest.raises(ValueError, match="is in use by another running monitor"):
            Monitor(model, props, optimizer=opt, log_dir=tmp_path).start()
    assert monitor.steps_recorded == 1
    with Monitor(model, props, optimizer=opt, log_dir=tmp_path):  # free again once closed
        pass


def test_a_skipped_step_has_an_infinite_update_error_not_a_missing_one(tmp_path: Path) -> None:
    """A step the optimizer skips (as a GradScaler does after an overflow) moves nothing while
    the modelled update is not zero: "inf", told apart from an unchecked step (null)."""
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    props = {"p": P.probs(model, x[:4], y[:4])}
    with Monitor(
        model, props, optimizer=opt, log_dir=tmp_path, hooks=False, check_update_every=1
    ) as monitor:
        for skip in (False, True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            monitor.before_step()
            if not skip:
                opt.step()
            monitor.after_step()
    errors = [r["update_error"] for r in read_records(tmp_path)]
    assert errors[0] < 1e-12 and errors[1] == "inf"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["nonfinite_update_errors"] == 1
    assert "largest update error ‖Δw_pred − Δw‖/‖Δw‖: inf" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_get_their_report(tmp_path: Path, dtype: torch.dtype) -> None:
    """NumPy has no bfloat16: the report's rounding floor comes from torch.finfo."""
    model, (x, y) = _mlp().to(dtype), _data()
    x = x.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, {"p": P.probs(model, x[:4], y[:4])}, optimizer=opt, log_dir=tmp_path):
        for step in range(2):
            _train_step(model, opt, *_batch(x, y, step))
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["steps"] == 2 and "p" in summary["properties"]
    assert (tmp_path / "report.md").exists()


def test_resume_continues_the_run_in_log_dir(tmp_path: Path) -> None:
    """Training resumed from a checkpoint: a new monitor with resume=True keeps the records
    (dropping a line cut short by a crash), counts on and reports over both parts."""
    model, (x, y) = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    props = {"p": P.probs(model, x[:5], y[:5])}
    with Monitor(model, props, optimizer=opt, log_dir=tmp_path):
        for step in range(3):
            _train_step(model, opt, *_batch(x, y, step))
    with open(tmp_path / "steps.jsonl", "a", encoding="utf-8") as file:
        file.write('{"step": 3, "propert')  # killed in the middle of a write
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # a new optimizer, as after a restart
    with Monitor(model, props, optimizer=opt, log_dir=tmp_path, resume=True):
        for step in range(3, 5):
            _train_step(model, opt, *_batch(x, y, step))
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds)
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 5
    other = {"q": P.probs(model, x[:3], y[:3])}
    with pytest.raises(ValueError, match="watched other properties"):
        Monitor(model, other, optimizer=opt, log_dir=tmp_path, resume=True).start()
    fresh = tmp_path / "fresh"  # nothing to resume: a new run
    with Monitor(model, props, optimizer=opt, log_dir=fresh, resume=True):
        _train_step(model, opt, *_batch(x, y, 0))
    assert [r["step"] for r in read_records(fresh)] == [0]


def test_resume_keeps_true_step_numbers_and_complete_records(tmp_path: Path) -> None:
    """every=3 over a resume labels the same steps as one run; a complete last record that
    lost only its newline is kept; a folder without config.json is refused by name."""
    model, (x, y) = _mlp(), _data()
    props = {"p": P.probs(model, x[:5], y[:5])}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, props, optimizer=opt, log_dir=tmp_path, every=3):
        for step in range(5):  # records 0, 3; steps 0-4 taken
            _train_step(model, opt, *_batch(x, y, step))
    steps_file = tmp_path / "steps.jsonl"
    steps_file.write_text(steps_file.read_text().rstrip("\n"))  # the newline lost
    with Monitor(model, props, optimizer=opt, log_dir=tmp_path, every=3, resume=True):
        for step in range(5, 11):  # steps 5-10: records 6, 9
            _train_step(model, opt, *_batch(x, y, step))
    assert [r["step"] for r in read_records(tmp_path)] == [0, 3, 6, 9]
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 4
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "steps.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"without config\.json"):
        Monitor(model, props, optimizer=opt, log_dir=bare, resume=True).start()
