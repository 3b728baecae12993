"""Run under ``torchrun --nproc_per_node R``: sharded ntcov results, saved by rank 0.

Used by tests/test_distributed.py, which compares them with one process. Not a test module.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.parallel import DistributedDataParallel

import ntcov
from ntcov import distributed as dd
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_mlp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=101)
    parser.add_argument("--held-out", type=int, default=7)
    parser.add_argument("--ddp-monitor", action="store_true", help="train with DDP under a Monitor")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dd.init("gloo")
    if args.ddp_monitor:
        train_monitored(args.out)
    else:
        results = compute(args.train, args.held_out)
        if dd.rank() == 0:
            torch.save(results, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def compute(train: int, held_out: int) -> dict[str, torch.Tensor]:
    """The sharded results for the digits MLP (float64); one process gives the reference."""
    model = digits_mlp(hidden=16, depth=2, seed=0)
    split = load_digits_split()
    x_train, y_train = dd.shard(split.x_train[:train], split.y_train[:train])
    x_test, y_test = split.x_test[:held_out], split.y_test[:held_out]
    losses = ntcov.properties.per_example_loss(model, x_train, y_train)
    probs = ntcov.properties.probs(model, x_test, y_test)
    grad = dd.full_gradient(losses.sum(), train)
    return {
        "gradient": torch.cat([g.reshape(-1) for g in grad.values()]),
        "rate": dd.rate(probs, losses.sum(), train),
        "examples": dd.ntcov_examples(probs, losses),
        "gram": dd.gram(ntcov.properties.probs(model, x_train, y_train)),
        "attribute": dd.attribute(probs, losses, train).values,
        "layers": dd.attribute(probs, losses, train, by="layer").values,
        "world_size": torch.tensor(dd.world_size()),
    }


def train_monitored(log_root: str, steps: int = 4) -> None:
    """SGD with momentum on 100 digits split over the ranks (DistributedDataParallel when there
    are several), watched by a Monitor that logs to ``log_root/rank<r>``."""
    model = digits_mlp(hidden=16, depth=2, seed=0)
    split = load_digits_split()
    x, y = dd.shard(split.x_train[:100], split.y_train[:100])
    trained = DistributedDataParallel(model) if dd.world_size() > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    probs = ntcov.properties.probs(model, split.x_test[:8], split.y_test[:8])
    log_dir = f"{log_root}/rank{dd.rank()}"
    # update="optimizer": the prediction is made from p.grad, the all-reduced gradient
    monitor = ntcov.Monitor(
        model, {"p": probs}, optimizer=optimizer, log_dir=log_dir, update="optimizer"
    )
    with monitor:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(trained(x), y).backward()
            optimizer.step()


if __name__ == "__main__":
    main()
