"""Benchmark the training overhead of ``ntcov.Monitor``: wall time with and without it.

Settings (stated in the JSON):

- ``digits``: the digits MLP (64 → 256 → 256 → 10, tanh, 85k weights, float32), Adam
  (lr 1e-3), a plain loop over shuffled minibatches (``--batch``, default 64 and the full batch of
  1,438 images); the monitor watches ``K = 64`` properties every step: the correct-class
  probabilities of 64 held-out digits.
- ``minilm``: fine-tuning the last two layers of the pretrained MiniLM sentence encoder
  (:func:`ntcov.experiments.minilm.build_setup`, frozen layers cached) with AdamW on minibatches
  of 8 sentence pairs; the monitor watches the cosine similarities of the held-out pairs (16).

Each is timed as ``plain`` (no monitor), ``observed`` (the default monitor: ``Δw`` taken from
the step) and ``optimizer`` (``update="optimizer"``: ``Δw = −M·p.grad + b`` from the optimizer's
state before the step). Every
repeat builds the model afresh and runs the variants in turn, so that load from other processes
hits them alike; the medians over repeats are reported, with the overhead ``t / t_plain − 1``.
Only the training steps are timed (the monitor's start and its final report are one-off costs,
reported separately).

    python benchmarks/bench_monitor.py            # full run
    python benchmarks/bench_monitor.py --quick    # smoke run (a test runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import ntcov
from ntcov import report
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_mlp
from ntcov.monitor import Monitor, read_records

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_monitor.json"
VARIANTS = ("plain", "observed", "optimizer")
FULL_BATCH = 0  # --batch 0: the whole training set


@dataclass(frozen=True)
class Config:
    """What one run measures; saved next to the results."""

    batches: tuple[int, ...] = (64, FULL_BATCH)
    hidden: int = 256
    properties: int = 64
    digits_steps: int = 200
    minilm_steps: int = 12
    minilm_batch: int = 8
    repeats: int = 5
    warmup: int = 5
    threads: int = 1
    quick: bool = False


QUICK = Config(batches=(64,), digits_steps=20, minilm_steps=2, repeats=1, warmup=1, quick=True)


@dataclass(frozen=True)
class Workload:
    """A fresh model with its optimizer, one training step, and the monitored properties."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]
    properties: dict[str, ntcov.Property]


def digits_workload(config: Config, batch: int) -> Workload:
    split = load_digits_split(dtype=torch.float32)
    model = digits_mlp(hidden=config.hidden, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    k = config.properties
    probs = ntcov.properties.probs(model, split.x_test[:k], split.y_test[:k])
    count = split.x_train.shape[0]
    size = count if batch == FULL_BATCH else batch
    generator = torch.Generator().manual_seed(0)
    order: list[Tensor] = []

    def step(i: int) -> None:
        if not order:  # a new epoch: shuffled minibatches
            order.extend(torch.randperm(count, generator=generator).split(size))
        index = order.pop()
        optimizer.zero_grad()
        logits = model(split.x_train[index])
        nn.functional.cross_entropy(logits, split.y_train[index]).backward()
        optimizer.step()

    return Workload(model, optimizer, step, {"probs": probs})


def minilm_workload(config: Config) -> Workload:
    from ntcov.experiments.minilm import build_setup, pair_loss

    setup = build_setup(trainable_layers=2, cache_frozen=True)
    optimizer = setup.make_optimizer()
    count = len(setup.train)
    generator = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        index = torch.randperm(count, generator=generator)[: config.minilm_batch]
        pairs = setup.train.subset(index)
        optimizer.zero_grad()
        pair_loss(setup.model, *pairs.inputs, pairs.targets).mean().backward()
        optimizer.step()

    return Workload(setup.model, optimizer, step, {"similarity": setup.similarity})


def time_variant(make: Callable[[], Workload], variant: str, steps: int, warmup: int) -> dict:
    """Seconds per step of one variant on a fresh workload (and the monitor's one-off costs)."""
    work = make()
    for i in range(warmup):
        work.step(i)
    if variant == "plain":
        start = time.perf_counter()
        for i in range(steps):
            work.step(i)
        return {"per_step": (time.perf_counter() - start) / steps}
    with tempfile.TemporaryDirectory() as folder:
        opened = time.perf_counter()
        monitor = Monitor(
            work.model, work.properties, optimizer=work.optimizer, log_dir=folder, update=variant
        )
        monitor.start()
        start = time.perf_counter()
        for i in range(steps):
            work.step(i)
        per_step = (time.perf_counter() - start) / steps
        closing = time.perf_counter()
        monitor.close()
        records = read_records(folder)
        summary = report_summary(folder)
    if len(records) != steps:
        raise RuntimeError(f"bench_monitor: {len(records)} records for {steps} steps.")
    return {
        "per_step": per_step,
        "start_seconds": start - opened,
        "close_seconds": time.perf_counter() - closing,
        "r_squared": summary["r_squared"],
    }


def report_summary(folder: str) -> dict[str, Any]:
    import json

    saved = json.loads((Path(folder) / "report.json").read_text())
    return next(iter(saved["properties"].values()))


def bench(name: str, make: Callable[[], Workload], steps: int, config: Config) -> dict:
    """Medians over repeats of every variant, the variants interleaved within each repeat."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(config.repeats):
        for variant in VARIANTS:
            runs[variant].append(time_variant(make, variant, steps, config.warmup))
    per_step = {v: statistics.median(r["per_step"] for r in runs[v]) for v in VARIANTS}
    overhead = {v: per_step[v] / per_step["plain"] - 1 for v in VARIANTS if v != "plain"}
    row = {
        "setting": name,
        "steps": steps,
        "ms_per_step": {v: 1e3 * t for v, t in per_step.items()},
        "overhead": overhead,
        "r_squared": {v: runs[v][-1]["r_squared"] for v in VARIANTS if v != "plain"},
        "close_seconds": {v: runs[v][-1]["close_seconds"] for v in VARIANTS if v != "plain"},
    }
    print(
        f"{name:<34} plain {per_step['plain'] * 1e3:8.2f} ms/step   overhead: default "
        f"(observed) {overhead['observed']:+7.1%}  optimizer {overhead['optimizer']:+7.1%}   "
        f"R² {row['r_squared']['observed']:.4f}",
        flush=True,
    )
    return row


def minilm_rows(config: Config) -> tuple[list[dict], str | None]:
    """The MiniLM rows, or none and the reason when its setup is unavailable here."""
    name = f"minilm top-2 layers, B={config.minilm_batch}"
    try:
        row = bench(name, lambda: minilm_workload(config), config.minilm_steps, config)
    except (ImportError, OSError) as err:
        reason = f"MiniLM skipped: {type(err).__name__}: {err}"
        print(reason, flush=True)
        return [], reason
    return [row], None


def run(config: Config, out: Path) -> int:
    started = time.perf_counter()
    print(f"bench_monitor: torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    rows = []
    for batch in config.batches:
        label = "full batch" if batch == FULL_BATCH else f"B={batch}"
        name = f"digits MLP h={config.hidden}, {label}, K={config.properties}"
        rows.append(
            bench(name, lambda b=batch: digits_workload(config, b), config.digits_steps, config)
        )
    minilm, skipped = minilm_rows(config)
    elapsed = time.perf_counter() - started
    results = {"rows": rows + minilm, "minilm_skipped": skipped, "seconds": elapsed}
    report.write_json(out, results, config=config, seed=0)
    print(f"total {elapsed:.1f} s; wrote {out}")
    return 0


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, one repeat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per variant")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    changes: dict[str, Any] = {"threads": args.threads}
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    return Config(**{**config.__dict__, **changes}), args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with ``--threads`` threads (the previous count is restored)."""
    config, out = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return run(config, out)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
