"""Strong scaling of the sharded computations: 1 process vs R processes (torchrun, gloo, CPU).

The same work is timed with the data split over 1 and over ``R`` processes (one thread each):

- ``gradient``: the full-data gradient ``∇(1/N)Σℓ_i`` (``ntcov.distributed.full_gradient``);
- ``examples``: the ``[K, N]`` matrix ``ntcov(p, ℓ)`` of ``K`` held-out probabilities against
  the ``N`` per-example training losses (``ntcov_examples``: each rank its ``N/R`` columns);
- ``gram``: the ``[M, M]`` Gram matrix of ``M`` training-example probabilities (``gram``: the
  inputs are gathered, each rank computes ``M/R`` rows).

Times are medians of repeats measured inside the workers between barriers (the slowest rank
counts); the launcher prints the speedup ``t(1) / t(R)`` per workload and checks that the results
of both runs agree (max |a − b| / max |b| ≤ 1e-10 in float64). On a machine with fewer free
cores than ``R`` the speedup cannot reach ``R``: the JSON records the core count.

    python benchmarks/bench_distributed.py                # R = 2, digits MLP (hidden 512)
    python benchmarks/bench_distributed.py --quick        # small sizes, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_distributed.json"
WORKLOADS = ("gradient", "examples", "gram")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--held-out", type=int, default=256, help="K held-out probabilities")
    parser.add_argument("--gram", type=int, default=1438, help="M examples in the Gram matrix")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.held_out, args.gram, args.repeats = 32, 8, 64, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs = {r: launch(args, r) for r in (1, args.processes)}
    report = summarise(args, runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0 if report["agree"] else 1


def launch(args: argparse.Namespace, processes: int) -> dict:
    """Run the workers under torchrun; rank 0's timings and results come back through a file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.pt"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", __file__, "--worker", str(out),
            "--hidden", str(args.hidden), "--held-out", str(args.held_out),
            "--gram", str(args.gram), "--repeats", str(args.repeats),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(
                f"torchrun with {processes} processes failed:\n{done.stderr[-3000:]}"
            )
        return torch.load(out)


def worker(args: argparse.Namespace) -> None:
    from ntcov import distributed as dd

    torch.set_num_threads(1)
    dd.init("gloo")
    tasks = build_tasks(args)
    times, results = {}, {}
    for name, task in tasks.items():
        results[name], times[name] = timed(task, args.repeats)
    if dd.rank() == 0:
        torch.save({"times": times, "results": results, "world_size": dd.world_size()}, args.worker)
    torch.distributed.destroy_process_group()


def build_tasks(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    import ntcov
    from ntcov import distributed as dd
    from ntcov.data import load_digits_split
    from ntcov.experiments.models import digits_mlp

    model = digits_mlp(hidden=args.hidden, depth=2, seed=0)
    split = load_digits_split()
    n = split.x_train.shape[0]
    x_train, y_train = dd.shard(split.x_train, split.y_train)
    losses = ntcov.properties.per_example_loss(model, x_train, y_train)
    held_out = ntcov.properties.probs(
        model, split.x_test[: args.held_out], split.y_test[: args.held_out]
    )
    x_gram, y_gram = dd.shard(split.x_train[: args.gram], split.y_train[: args.gram])
    gram_prop = ntcov.properties.probs(model, x_gram, y_gram)
    return {
        "gradient": lambda: torch.cat(
            [g.reshape(-1) for g in dd.full_gradient(losses.sum(), n).values()]
        ),
        "examples": lambda: dd.ntcov_examples(held_out, losses),
        "gram": lambda: dd.gram(gram_prop),
    }


def timed(task: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """Median wall time of ``task`` between barriers (so the slowest rank counts)."""
    result = task()  # warm-up
    samples = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        result = task()
        barrier()
        samples.append(time.perf_counter() - start)
    return result, statistics.median(samples)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def summarise(args: argparse.Namespace, runs: dict[int, dict]) -> dict:
    one, many = runs[1], runs[args.processes]
    rows = []
    for name in WORKLOADS:
        a, b = many["results"][name], one["results"][name]
        diff = float((a - b).abs().max() / b.abs().max())
        t1, tr = one["times"][name], many["times"][name]
        rows.append(
            {"workload": name, "t1_s": t1, "tR_s": tr, "speedup": t1 / tr, "rel_diff": diff}
        )
    return {
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
        "agree": all(row["rel_diff"] <= 1e-10 for row in rows),
    }


def print_report(report: dict) -> None:
    r = report["config"]["processes"]
    print(f"strong scaling, 1 vs {r} processes (gloo, 1 thread each, {report['cpu_count']} cores)")
    print(f"{'workload':<10} {'t(1) s':>9} {f't({r}) s':>9} {'speedup':>8} {'rel diff':>9}")
    for row in report["rows"]:
        print(
            f"{row['workload']:<10} {row['t1_s']:>9.4f} {row['tR_s']:>9.4f} "
            f"{row['speedup']:>8.2f} {row['rel_diff']:>9.1e}"
        )
    print("results agree" if report["agree"] else "RESULTS DISAGREE")


if __name__ == "__main__":
    sys.exit(main())
