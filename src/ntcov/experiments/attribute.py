"""Which training images push one held-out digit's prediction up or down, and which layers carry it.

An MLP is trained on scikit-learn's 8×8 digits with SGD (full batch and no momentum by default,
so that every change is attributed to examples; ``--momentum`` adds a carried-velocity term). For
one held-out image with correct-class probability ``p``, before every ``optimizer.step()``
:class:`ntcov.attribution.TrainingAttribution` splits the step's first-order change exactly:

    Δp ≈ J_p Δw = Σ_i c_i + J_p b,      c_i = −(1/B) J_p M ∇ℓ_i      (M, b: the optimizer's)

and per layer (``J_p^(l) Δw^(l)``). It reports the training images that most increased and
most decreased ``p`` over the first step and over the whole run, the per-layer split, the
momentum term ``J_p b`` (not attributable to one example of a step), and how much of the actual
change the first-order parts leave unexplained. It checks that the first step's parts add up to
``ntcov.rate(p, L, metric=M)`` (≤ 1e-10 relative, float64).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ntcov import report
from ntcov.attribution import By, Contributions, StepAttribution, TrainingAttribution
from ntcov.covariance import rate
from ntcov.data import Split, load_digits_split
from ntcov.experiments.common import output_folder, torch_threads
from ntcov.experiments.models import digits_mlp
from ntcov.metric import optimizer_step
from ntcov.properties import per_example_loss, probs

__all__ = ["HELP", "AttributeConfig", "add_arguments", "run", "run_from_args"]

HELP = "which training images push a held-out digit's probability up or down, and which layers"
SUM_TOLERANCE = 1e-10


@dataclass(frozen=True)
class AttributeConfig:
    """Settings (validated on construction); :meth:`quick` is used by the tests."""

    image: int = 0
    steps: int = 100
    lr: float = 0.5
    momentum: float = 0.0
    batch_size: int | None = None
    top_k: int = 8
    hidden: int = 64
    train_examples: int | None = None
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "top_k", "hidden", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"AttributeConfig: {name} must be >= 1, got {getattr(self, name)}."
                )
        if self.image < 0 or self.seed < 0:
            raise ValueError("AttributeConfig: image and seed must be >= 0.")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError("AttributeConfig: need lr > 0 and 0 <= momentum < 1.")
        for name in ("batch_size", "train_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"AttributeConfig: {name} must be >= 1 or None, got {value}.")

    @classmethod
    def quick(cls, **changes: Any) -> AttributeConfig:
        """300 training images, 8 steps (a few seconds)."""
        return replace(cls(steps=8, train_examples=300, top_k=5), **changes)


# ----- the run -------------------------------------------------------------------------------


@dataclass
class RunState:
    """What the run has produced so far (kept when it is interrupted)."""

    tracker: TrainingAttribution | None = None
    first: StepAttribution | None = None
    first_rate: Tensor | None = None
    values: list[float] | None = None
    predicted: list[float] | None = None


def load(config: AttributeConfig) -> tuple[Split, nn.Module]:
    split = load_digits_split(seed=config.seed)
    if config.train_examples is not None:
        n = config.train_examples
        split = Split(split.x_train[:n], split.y_train[:n], split.x_test, split.y_test)
    if config.top_k > split.x_train.shape[0]:
        raise ValueError(
            f"AttributeConfig: top_k must be <= {split.x_train.shape[0]} (training images), "
            f"got {config.top_k}."
        )
    if config.image >= split.x_test.shape[0]:
        raise ValueError(
            f"AttributeConfig: image must be < {split.x_test.shape[0]} (held-out images), "
            f"got {config.image}."
        )
    return split, digits_mlp(hidden=config.hidden, seed=config.seed)


def batches(config: AttributeConfig, count: int, step: int) -> Tensor:
    """The training positions of step ``step``: all, or a seeded random minibatch."""
    if config.batch_size is None or config.batch_size >= count:
        return torch.arange(count)
    gen = torch.Generator().manual_seed(config.seed * 100_003 + step)
    return torch.randperm(count, generator=gen)[: config.batch_size]


def train(
    config: AttributeConfig, split: Split, model: nn.Module, state: RunState, progress: bool
) -> None:
    """SGD (momentum if set) for ``steps`` steps, each attributed before ``optimizer.step()``;
    everything is kept in ``state`` as it happens (so an interrupted run keeps its steps)."""
    target = split.y_test[config.image : config.image + 1]
    p = probs(model, split.x_test[config.image : config.image + 1], target)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    count = split.x_train.shape[0]
    tracker = state.tracker = TrainingAttribution(p, optimizer, count)
    state.values, state.predicted = [float(p.value())], []
    bar = tqdm(range(config.steps), desc="attribute", file=sys.stderr, disable=not progress)
    for step in bar:
        index = batches(config, count, step)
        loss = per_example_loss(model, split.x_train[index], split.y_train[index])
        if state.first is None:
            state.first_rate = first_step_rate(p, loss, optimizer, model)
        record = tracker.record(loss, index)
        state.first = state.first or record
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(split.x_train[index]), split.y_train[index]).backward()
        optimizer.step()
        state.values.append(float(p.value()))
        state.predicted.append(float(record.first_order))


def first_step_rate(
    p: Any, loss: Any, optimizer: torch.optim.Optimizer, model: nn.Module
) -> Tensor:
    """``ntcov.rate(p, mean ℓ, metric=M)``: the first step's force computed independently."""
    mean = loss.mean()
    names = dict(model.named_parameters())
    grads = torch.autograd.grad(mean(names), list(names.values()))
    step = optimizer_step(optimizer, model, dict(zip(names, grads, strict=True)))
    return rate(p, mean, metric=step.metric)


# ----- summaries -----------------------------------------------------------------------------


def top_examples(parts: Contributions, split: Split, k: int) -> dict[str, list[dict[str, Any]]]:
    """The ``k`` training images (fewer when ``parts`` has fewer) that raised and lowered ``p``
    most, with labels and values; ``parts.labels`` are the images' training indices."""
    out = {}
    k = min(k, parts.values.shape[-1])
    for key, top in (("increased", parts.helpful(k)), ("decreased", parts.harmful(k))):
        out[key] = [
            {"index": int(i), "label": int(split.y_train[int(i)]), "contribution": float(v)}
            for i, v in zip(top.labels, top.values.tolist(), strict=True)
        ]
    return out


def summarise(config: AttributeConfig, split: Split, state: RunState) -> dict[str, Any]:
    """Tops, sums and layer splits of the first step and of the steps done; ``{}`` before any."""
    first, tracker = state.first, state.tracker
    if first is None or tracker is None or state.first_rate is None or state.values is None:
        return {}
    # the first step's examples only (a minibatch's others have no part in it)
    step_parts = Contributions(first.contributions, tuple(first.indices.tolist()), By.EXAMPLE)
    rate_error = float((first.force - state.first_rate).abs() / state.first_rate.abs())
    layers = tracker.layer_result()
    actual = state.values[-1] - state.values[0]
    applied = len(state.values) - 1  # an interrupt may fall between a record and its step
    unexplained = actual - float(tracker.predicted_change) if applied == tracker.steps else None
    return {
        "image": config.image,
        "label": int(split.y_test[config.image]),
        "probability": {"start": state.values[0], "end": state.values[-1]},
        "steps_done": applied,
        "steps_recorded": tracker.steps,
        "one_step": {
            "top": top_examples(step_parts, split, config.top_k),
            "force": float(first.force),
            "bias": float(first.bias),
            "rate_with_optimizer_metric": float(state.first_rate),
            "sum_vs_rate_rel_error": rate_error,
            "layers": dict(zip(layers.labels, first.layers.tolist(), strict=True)),  # type: ignore[union-attr]
        },
        "run": {
            "top": top_examples(tracker.result(), split, config.top_k),
            "examples_total": float(tracker.contributions.sum()),
            "momentum_and_decay_bias": float(tracker.bias),
            "predicted_change": float(tracker.predicted_change),
            "actual_change": actual,
            "unexplained_higher_order": unexplained,
            "layers": dict(zip(layers.labels, layers.values.tolist(), strict=True)),
        },
        "trajectory": {"value": state.values, "first_order_per_step": state.predicted},
    }


# ----- figures and files ---------------------------------------------------------------------


def plot_grid(path: Path, split: Split, summary: dict[str, Any], k: int) -> Path:
    """The held-out image, then rows of the top ``k`` training images per question."""
    rows = [
        ("first step: raised p", summary["one_step"]["top"]["increased"]),
        ("first step: lowered p", summary["one_step"]["top"]["decreased"]),
        ("whole run: raised p", summary["run"]["top"]["increased"]),
        ("whole run: lowered p", summary["run"]["top"]["decreased"]),
    ]
    fig, axes = report.new_figure(len(rows), k + 1, size=(1.3 * (k + 1), 1.6 * len(rows)))
    for r, (title, entries) in enumerate(rows):
        _show(
            axes[r, 0],
            split.x_test[summary["image"]] if r == 0 else None,
            f"held-out\nlabel {summary['label']}" if r == 0 else "",
        )
        axes[r, 1].set_title(title, fontsize=8, loc="left")
        for c, entry in enumerate(entries[:k]):
            _show(
                axes[r, c + 1],
                split.x_train[entry["index"]],
                f"#{entry['index']} ({entry['label']})\n{entry['contribution']:+.2e}",
            )
    return report.save_figure(fig, path)


def _show(ax: Any, image: Tensor | None, text: str) -> None:
    ax.axis("off")
    if image is not None:
        ax.imshow(image.reshape(8, 8).numpy(), cmap="gray_r")
    ax.text(0.5, -0.08, text, transform=ax.transAxes, ha="center", va="top", fontsize=6)


def plot_layers(path: Path, summary: dict[str, Any]) -> Path:
    """Bar charts of the per-layer parts of ``Δp``: first step and whole run."""
    fig, axes = report.new_figure(1, 2, size=(9.0, 3.2))
    for ax, (title, layers) in zip(
        axes[0],
        (("first step", summary["one_step"]["layers"]), ("whole run", summary["run"]["layers"])),
        strict=True,
    ):
        names = list(layers)
        values = np.array([layers[n] for n in names])
        ax.bar(
            range(len(names)), values, color=["tab:green" if v >= 0 else "tab:red" for v in values]
        )
        ax.set_xticks(range(len(names)), [f"layer {n}" for n in names])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{title}: J_p^(l) Δw^(l) per layer")
        ax.set_ylabel("first-order change of p")
    return report.save_figure(fig, path)


def report_lines(summary: dict[str, Any]) -> list[str]:
    one, whole = summary["one_step"], summary["run"]

    def names(entries: list[dict[str, Any]]) -> str:
        return ", ".join(
            f"#{e['index']} (a {e['label']}, {e['contribution']:+.1e})" for e in entries
        )

    return [
        f"Held-out image {summary['image']} (a {summary['label']}): p went from "
        f"{summary['probability']['start']:.4f} to {summary['probability']['end']:.4f} over "
        f"{summary['steps_done']} steps.",
        f"First step: parts add up to ntcov.rate(p, L, metric=M) to "
        f"{one['sum_vs_rate_rel_error']:.1e} (tolerance {SUM_TOLERANCE:g}). Raised p most: "
        f"{names(one['top']['increased'])}. Lowered p most: {names(one['top']['decreased'])}.",
        f"Whole run: raised p most: {names(whole['top']['increased'])}. Lowered p most: "
        f"{names(whole['top']['decreased'])}.",
        f"Whole run: examples {whole['examples_total']:+.4f} + momentum/decay "
        f"{whole['momentum_and_decay_bias']:+.4f} = predicted {whole['predicted_change']:+.4f}; "
        f"actual {whole['actual_change']:+.4f} (higher order: "
        f"{_signed(whole['unexplained_higher_order'])}).",
        "Per layer (whole run): "
        + ", ".join(f"layer {n} {v:+.4f}" for n, v in whole["layers"].items())
        + ".",
    ]


def _signed(value: float | None) -> str:
    return "n/a (the last recorded step was not taken)" if value is None else f"{value:+.4f}"


def write_outputs(
    out: Path, payload: dict[str, Any], config: AttributeConfig, split: Split | None
) -> dict[str, Path]:
    files = {
        "results": report.write_json(out / "results.json", payload, config=config, seed=config.seed)
    }
    summary = payload.get("summary") or {}
    if summary and split is not None and report.plot_available():
        files["grid"] = plot_grid(out / "attribute.png", split, summary, config.top_k)
        files["layers"] = plot_layers(out / "layers.png", summary)
    lines = ["# ntcov attribute", "", f"Status: {payload['status']}. {__doc__.splitlines()[0]}", ""]
    if summary:
        lines += [f"- {line}" for line in report_lines(summary)]
    lines += ["", "Files: `results.json`, `attribute.png`, `layers.png`."]
    files["report"] = out / "report.md"
    report.atomic_write(files["report"], "\n".join(lines) + "\n")
    return files


def run(
    config: AttributeConfig,
    out: str | Path = "ntcov-attribute",
    *,
    progress: bool = True,
    echo: Any = print,
) -> dict[str, Any]:
    """The whole experiment; returns the payload (also written to ``out``). Ctrl-C stops the
    training early and writes what is done (``status: interrupted``)."""
    folder = output_folder(out)
    started = time.perf_counter()
    payload: dict[str, Any] = {"status": "interrupted"}
    state = RunState()
    with torch_threads(config.threads):
        split, model = load(config)
        try:
            train(config, split, model, state, progress)
            payload["status"] = "complete"
        except KeyboardInterrupt:
            pass
    payload["summary"] = summarise(config, split, state)
    payload["wall_time_s"] = time.perf_counter() - started
    files = write_outputs(folder, payload, config, split)
    if echo is not None and payload["summary"]:
        echo("\n".join(report_lines(payload["summary"])))
        echo(f"wrote {', '.join(p.name for p in files.values())} to {folder}/")
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = AttributeConfig()
    parser.add_argument(
        "--out", default="ntcov-attribute", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--image",
        type=int,
        default=defaults.image,
        help="held-out image index (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: {defaults.steps}; with --quick 8)",
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help="learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=defaults.momentum,
        help="SGD momentum (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="minibatch size (default: full batch)"
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help=f"images per row (default: {defaults.top_k})"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="300 training images, 8 steps")


def run_from_args(args: argparse.Namespace) -> int:
    """Exit status: 0 when the first step's parts add up to the rate, 1 if not, 130 if stopped."""
    try:
        base = AttributeConfig.quick() if args.quick else AttributeConfig()
        changes = {
            "image": args.image,
            "lr": args.lr,
            "momentum": args.momentum,
            "seed": args.seed,
            "batch_size": args.batch_size,
        }
        for name in ("steps", "top_k"):  # explicit values win over --quick
            if getattr(args, name) is not None:
                changes[name] = getattr(args, name)
        config = replace(base, **changes)
        payload = run(config, args.out, progress=not getattr(args, "no_progress", False))
    except ValueError as err:
        parser = getattr(args, "parser", None)
        if parser is None:
            raise
        parser.error(str(err))
    if payload["status"] != "complete":
        return 130
    error = payload["summary"]["one_step"]["sum_vs_rate_rel_error"]
    return 0 if error <= SUM_TOLERANCE else 1
