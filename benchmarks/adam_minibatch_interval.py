"""Coverage of ``predict_step``'s minibatch interval for a fresh Adam: simulated real steps
against ``M`` frozen at the full-batch gradient (``simulate=0``).

A digits MLP (64 → 32 → 10, tanh, float64, 400 training images), Adam lr 1e-3 with no state
yet, B = 16: the 95% interval of the change of 20 held-out correct-class probabilities is
compared with 200 real minibatch steps taken from the same state (deep copies).

    python benchmarks/adam_minibatch_interval.py
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

import ntcov
from ntcov import properties as P
from ntcov.data import load_digits_split

BATCH, REAL_STEPS, TRAIN, HELD_OUT = 16, 200, 400, 20


def main() -> None:
    torch.manual_seed(0)
    split = load_digits_split()
    x_train, y_train = split.x_train.double()[:TRAIN], split.y_train[:TRAIN]
    x_test, y_test = split.x_test.double()[:HELD_OUT], split.y_test[:HELD_OUT]
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double().eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    p = P.probs(model, x_test, y_test)
    loss, per_example = P.loss(model, x_train, y_train), P.per_example_loss(model, x_train, y_train)
    actual = real_changes(model, optimizer, (x_train, y_train), (x_test, y_test))
    print(f"actual spread (mean std over properties): {actual.std(0).mean():.4g}")
    for simulate in (None, 0):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ntcov.ApproximationWarning)
            pred = ntcov.predict_step(
                p,
                loss,
                optimizer,
                batch_size=BATCH,
                per_example_loss=per_example,
                simulate=simulate,
            )
        seconds = time.perf_counter() - start
        low, high = pred.interval(0.95)
        coverage = ((actual >= low) & (actual <= high)).double().mean()
        label = "simulated (default)" if simulate is None else "frozen M (simulate=0)"
        print(
            f"{label:22} coverage {coverage:.3f}  predicted spread {pred.std.mean():.4g}  "
            f"{seconds:.2f} s"
        )


def real_changes(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``[REAL_STEPS, K]``: the change of the held-out probabilities over one real minibatch
    step, each from the same state."""
    x, y = train
    before = P.probs(model, *held_out).value()
    generator = torch.Generator().manual_seed(7)
    changes = []
    for _ in range(REAL_STEPS):
        twin, twin_optimizer = copy.deepcopy((model, optimizer))
        rows = torch.randperm(x.shape[0], generator=generator)[:BATCH]
        twin_optimizer.zero_grad()
        nn.functional.cross_entropy(twin(x[rows]), y[rows]).backward()
        twin_optimizer.step()
        changes.append(P.probs(twin, *held_out).value() - before)
    return torch.stack(changes)


if __name__ == "__main__":
    main()
