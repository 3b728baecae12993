"""Hugging Face and Lightning callbacks: tiny real training runs write the monitor's files."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ntcov import properties as P
from ntcov.monitor import read_records

STEPS = 6


def _data(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2))


def _check_run(log_dir: Path, steps: int) -> list[dict]:
    records = read_records(log_dir)
    assert [r["step"] for r in records] == list(range(steps))
    pred = np.array([r["properties"]["p"]["predicted"] for r in records])
    act = np.array([r["properties"]["p"]["actual"] for r in records])
    assert np.abs(act).max() > 0
    # float32, small steps: the first-order prediction explains the changes
    assert np.linalg.norm(pred - act) < 0.1 * np.linalg.norm(act)
    # the optimizer-aware update is the one the optimizer really made (after clipping),
    # checked at every step
    errors = [r["update_error"] for r in records]
    assert None not in errors and max(errors) < 1e-3
    saved = json.loads((log_dir / "report.json").read_text())
    assert saved["steps"] == steps and saved["properties"]["p"]["entries"] == 8
    return records


def _import_or_skip(name: str) -> Any:
    """Import ``name``, or skip the test when it is missing or broken. lightning imports
    torchmetrics, which imports torchvision whenever it is installed; a torchvision built for
    another torch fails to load ("operator torchvision::nms does not exist")."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # ImportError, or the RuntimeError of a broken torchvision
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        pytest.skip(f"cannot import {name} here: {type(err).__name__}: {first}")


class _HFModel(nn.Module):
    """A plain torch model in the Trainer's calling convention: a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, inputs: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.net(inputs)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_huggingface_trainer_run_writes_records_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers imports torchvision when it finds it, and the torchvision installed next to
    # torch 2.13 fails to load ("operator torchvision::nms does not exist"); this test needs no
    # vision, so hide it (find_spec then reports it missing)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from ntcov.integrations.huggingface import NtcovCallback

    x, y = _data()
    model = _HFModel()
    probs = _dict_model_probs(model, x[:8], y[:8])  # model(x) is a dict
    callback = NtcovCallback({"p": probs}, log_dir=tmp_path / "ntcov", check_update_every=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_grad_norm=0.5,  # clipping happens before the monitored step
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    dataset = [{"inputs": x[i], "labels": y[i]} for i in range(len(x))]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    _check_run(tmp_path / "ntcov", STEPS)
    assert callback.monitor is None  # closed at on_train_end
    assert not trainer.optimizer.optimizer._optimizer_step_pre_hooks


def test_huggingface_callback_follows_the_trainer_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer's event sequence, driven through transformers' own CallbackHandler (as
    Trainer does): clip, on_pre_optimizer_step, step, on_optimizer_step."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # see the test above
    pytest.importorskip("transformers")
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    from ntcov.integrations.huggingface import NtcovCallback

    x, y = _data()
    model = _HFModel()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)  # see the Lightning test
    callback = NtcovCallback(
        {"p": _dict_model_probs(model, x[:8], y[:8])}, log_dir=tmp_path, check_update_every=1
    )
    handler = CallbackHandler([callback], model, None, opt, None)
    args, state, control = None, TrainerState(), TrainerControl()
    for run in range(2):  # a second train() with the same callback continues the log
        handler.on_train_begin(args, state, control)
        for step in range(STEPS):
            batch = slice(8 * step, 8 * step + 8)
            opt.zero_grad()
            model(x[batch], y[batch])["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            handler.on_pre_optimizer_step(args, state, control)
            opt.step()
            handler.on_optimizer_step(args, state, control)
        handler.on_train_end(args, state, control)
        _check_run(tmp_path, STEPS * (run + 1))
    assert callback.monitor is None and not opt._optimizer_step_pre_hooks


def _dict_model_probs(model: nn.Module, x: Tensor, y: Tensor):
    from ntcov import Property

    def probs(m: nn.Module) -> Tensor:
        return m(x)["logits"].softmax(-1).gather(1, y[:, None]).squeeze(1)

    return Property(model, probs, name="p")


def _lightning_trainer(pl: Any, callback: Any, tmp_path: Path, **extra: Any) -> Any:
    return pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=str(tmp_path / "out"),
        **extra,
    )


# lightning 2.6 builds torch.utils._pytree.LeafSpec, which torch 2.13 deprecates
@pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)
def test_lightning_run_writes_records_and_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pl = _import_or_skip("lightning.pytorch")

    from ntcov.integrations.lightning import NtcovCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            inputs, labels = batch
            return nn.functional.cross_entropy(self.net(inputs), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # SGD: its step is proportional to the gradient, so a prediction from the
            # unclipped gradient would show as a large update error
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.5)

    x, y = _data()
    module = Module()
    callback = NtcovCallback(
        {"p": P.probs(module.net, x[:8], y[:8])}, log_dir=tmp_path / "ntcov", check_update_every=1
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False
    )
    # clipped at the end of Lightning's closure, inside step()
    trainer = _lightning_trainer(pl, callback, tmp_path, gradient_clip_val=0.05)
    trainer.fit(module, loader)
    _check_run(tmp_path / "ntcov", STEPS)
    assert callback.monitor is None
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks
    # a second fit with the same callback continues the log (a new optimizer, the same run)
    _lightning_trainer(pl, callback, tmp_path).fit(module, loader)
    assert [r["step"] for r in read_records(tmp_path / "ntcov")] == list(range(2 * STEPS))


def test_importing_ntcov_imports_no_framework() -> None:
    code = (
        "import sys, ntcov, ntcov.monitor, ntcov.integrations; "
        "print(sorted(m for m in ('transformers', 'lightning', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("ntcov.integrations.huggingface", "transformers", "huggingface"),
        ("ntcov.integrations.lightning", "lightning", "lightning"),
    ],
)
def test_missing_framework_names_the_extra(
    module: str, framework: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` fail
    monkeypatch.setitem(sys.modules, framework + ".pytorch", None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'ntcov\[{extra}\]'"):
        importlib.import_module(module)


def test_lightning_refuses_callables_beside_properties_of_a_submodule() -> None:
    _import_or_skip("lightning.pytorch")
    from ntcov.integrations.lightning import _monitored_module

    outer = nn.Module()
    outer.net = _net()
    x, y = _data()
    probs = P.probs(outer.net, x[:4], y[:4])
    assert _monitored_module({"p": probs}, outer) is outer.net
    assert _monitored_module({"q": lambda m: m.net(x[:4])}, outer) is outer
    with pytest.raises(ValueError, match=r"properties \['q'\] are callables"):
        _monitored_module({"p": probs, "q": lambda m: m.net(x[:4])}, outer)
