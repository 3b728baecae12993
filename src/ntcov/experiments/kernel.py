"""``ntcov kernel``: the training-example influence matrix and Gram matrix on the digits, sharded.

For a digits MLP (trained for ``--steps`` full-batch SGD steps first, so the kernel is not that of
random weights), compute over the training set of ``N`` images:

- ``influence`` ``[K, N]``: ``c_ki = −(1/N) ntcov(p_k, ℓ_i)``, how much training image ``i``
  pushes the correct-class probability ``p_k`` of held-out image ``k`` up under gradient descent
  (the parts add up to Price's rate ``dp_k/dt``);
- ``gram`` ``[M, M]``: ``ntcov(p_i, p_j)`` between the correct-class probabilities of the first
  ``M`` training images (the empirical neural tangent kernel of that property).

Launched with ``torchrun --nproc_per_node R -m ntcov kernel ...``, the training set is split over
the ``R`` processes (gloo on CPU, NCCL on GPUs): each computes its columns of ``influence`` and its
rows of ``gram``, and only those results travel; rank 0 writes ``kernel.pt``, ``summary.json``
and ``kernel.png``. Without torchrun it runs in one process with the same results.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ntcov import distributed, properties, report
from ntcov.data import load_digits_split
from ntcov.experiments.common import output_folder
from ntcov.experiments.models import digits_mlp

HELP = "influence [K, N] and Gram [M, M] matrices on the digits, sharded under torchrun"


@dataclass(frozen=True)
class KernelConfig:
    """What one run computes (float64 throughout)."""

    held_out: int = 16
    train: int = 0  # 0: the whole training set
    gram: int = 256
    hidden: int = 64
    steps: int = 20
    lr: float = 0.5
    seed: int = 0


def trained_model(config: KernelConfig) -> tuple[torch.nn.Module, Any]:
    """The digits MLP after ``config.steps`` full-batch SGD steps, with the data split (the sizes
    in ``config`` are checked against it before any training)."""
    split = load_digits_split(seed=config.seed)
    _check_sizes(config, split.x_train.shape[0], split.x_test.shape[0])
    model = digits_mlp(hidden=config.hidden, depth=2, seed=config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    for _ in range(config.steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(split.x_train), split.y_train).backward()
        optimizer.step()
    return model, split


def compute(config: KernelConfig) -> dict[str, Any]:
    """``influence``, ``gram`` and timings; the same on every rank."""
    model, split = trained_model(config)
    count = config.train or split.x_train.shape[0]
    x_train, y_train = distributed.shard(split.x_train[:count], split.y_train[:count])
    held = properties.probs(model, split.x_test[: config.held_out], split.y_test[: config.held_out])
    losses = properties.per_example_loss(model, x_train, y_train)
    start = time.perf_counter()
    influence = distributed.attribute(held, losses, count).values
    middle = time.perf_counter()
    size = config.gram
    x_gram, y_gram = distributed.shard(split.x_train[:size], split.y_train[:size])
    gram = distributed.gram(properties.probs(model, x_gram, y_gram))
    seconds = {"influence": middle - start, "gram": time.perf_counter() - middle}
    return {"influence": influence, "gram": gram, "seconds": seconds, "held_labels": split.y_test}


def summary(config: KernelConfig, result: dict[str, Any]) -> dict[str, Any]:
    influence = result["influence"]
    top = influence.topk(min(3, influence.shape[1]), dim=1)
    return {
        "world_size": distributed.world_size(),
        "shapes": {"influence": list(influence.shape), "gram": list(result["gram"].shape)},
        "seconds": result["seconds"],
        "rate_per_held_out": influence.sum(1).tolist(),
        "most_helpful_training_images": top.indices.tolist(),
        "gram_diagonal_mean": float(result["gram"].diagonal().mean()),
        "config": asdict(config),
    }


def write(out: Path, config: KernelConfig, result: dict[str, Any]) -> dict[str, Any]:
    info = summary(config, result)
    torch.save({"influence": result["influence"], "gram": result["gram"]}, out / "kernel.pt")
    report.write_json(out / "summary.json", info, config=config, seed=config.seed)
    if report.plot_available():
        _plot(out / "kernel.png", result)
    return info


def _plot(path: Path, result: dict[str, Any]) -> None:
    fig, grid = report.new_figure(1, 2, size=(11.0, 4.5))
    axes = grid[0]
    limit = float(result["influence"].abs().max()) or 1.0
    image = axes[0].imshow(
        result["influence"].numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit
    )
    axes[0].set(title="influence c_ki (held-out k × training i)", xlabel="i", ylabel="k")
    fig.colorbar(image, ax=axes[0])
    image = axes[1].imshow(result["gram"].numpy(), cmap="viridis")
    axes[1].set(title="Gram ntcov(p_i, p_j)", xlabel="j", ylabel="i")
    fig.colorbar(image, ax=axes[1])
    report.save_figure(fig, path)


def _check_sizes(config: KernelConfig, train: int, held_out: int) -> None:
    """Refuse sizes the digits split cannot supply (rather than silently using fewer)."""
    count = config.train or train
    limits = [
        ("--held-out", config.held_out, held_out, "held-out images"),
        ("--train", count, train, "training images"),
        ("--gram", config.gram, count, "training images in use (--train)"),
    ]
    for flag, value, limit, what in limits:
        if value > limit:
            raise ValueError(f"{flag} {value} exceeds the {limit} {what}.")
    if config.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {config.steps}.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = KernelConfig()
    parser.add_argument(
        "--out", default="ntcov-kernel", help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--held-out",
        type=_positive,
        default=defaults.held_out,
        help="K, held-out images whose probability is attributed (default: %(default)s)",
    )
    parser.add_argument(
        "--train", type=_positive, default=None, help="N, training images (default: all 1,438)"
    )
    parser.add_argument(
        "--gram",
        type=_positive,
        default=defaults.gram,
        help="M, training images in the Gram matrix (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=_non_negative,
        default=defaults.steps,
        help="full-batch SGD steps before the kernel is taken (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=_non_negative, default=defaults.seed, help="seed (default: %(default)s)"
    )


def _positive(text: str) -> int:
    from ntcov.cli import positive_int

    return positive_int(text)


def _non_negative(text: str) -> int:
    from ntcov.cli import non_negative_int

    return non_negative_int(text)


def run_from_args(args: argparse.Namespace) -> int:
    config = KernelConfig(
        held_out=args.held_out,
        train=args.train or 0,
        gram=args.gram,
        steps=args.steps,
        seed=args.seed,
    )
    distributed.init()
    out = None
    if distributed.rank() == 0:
        try:
            out = output_folder(args.out)
        except ValueError as err:
            args.parser.error(str(err))
    try:
        result = compute(config)
    except ValueError as err:
        args.parser.error(str(err))
    if out is not None:
        info = write(out, config, result)
        print(
            f"ntcov kernel: {distributed.world_size()} process(es); influence "
            f"{info['shapes']['influence']} in {info['seconds']['influence']:.2f} s, gram "
            f"{info['shapes']['gram']} in {info['seconds']['gram']:.2f} s; wrote {out}"
        )
    return 0
