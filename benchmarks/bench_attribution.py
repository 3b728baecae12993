"""Per-example attribution: ntcov against Captum's ``TracInCP`` and a ``vmap(grad)`` baseline.

The same digits MLP (64→h→h→10, tanh, for each width ``h`` of ``Config.hidden``: 64 and 256,
that is P = 8,970 and 85,002 weights; trained a few full-batch SGD steps and saved as one
checkpoint with its learning rate ``η``), the same ``N`` training images and the same ``K``
held-out images. Each method computes the ``[K, N]`` matrix of TracIn scores for one checkpoint,

    score[k, i] = η · ∇p_k · ∇ℓ_i          (p_k: correct-class probability of held-out image k)

Convention: ntcov's per-example contribution to ``dp_k/dt`` under ``Δw = −η ∇L``,
``L = (1/N) Σ_i ℓ_i``, is ``c[k, i] = −(1/N) ntcov_M(p_k, ℓ_i)`` with ``M = η I``
(``ntcov.attribution.attribute(p, ℓ, metric=η)``), so ``score = −N · c``. Captum's sign is "how
much training on i lowers the test loss"; with the probability as ``test_loss_fn`` it is
``η ∇p·∇ℓ_i``: positive when a step on ``i`` *lowers* ``p``. The numbers must agree to
``1e-5`` (max |a − b| / max |b| against ``vmap_grad``), and in float64 to ``1e-10``.

Methods (timed side by side, repeats interleaved, medians; one thread by default):

- ``ntcov``: :func:`ntcov.attribution.attribute` with ``strategy="auto"`` (batched JVPs of the
  ``[N]`` loss vector for ``K ≤ 16``, otherwise :func:`ntcov.ntcov`'s automatic choice);
- ``ntcov_jvp``: the same forced to ``K`` batched JVPs (``strategy="jvp"``);
- ``ntcov_per_example``, ``ntcov_structured``: the same with :func:`ntcov.ntcov`'s
  ``per_example`` (``vmap(jacrev)`` rows) and ``structured`` (per-layer rules) strategies, when
  this ntcov has them (``Config.extra_strategies``);
- ``captum``: ``TracInCP(sample_wise_grads_per_batch=True, batch_size=N)``: Captum's fast mode
  (per-sample gradients from layer hooks);
- ``captum_loop``: ``TracInCP`` in its default mode (one backward pass per example);
- ``vmap_grad``: ``torch.func.vmap(grad(...))`` per-sample gradients ``[N, P]`` and ``[K, P]``,
  then one matrix product.

Memory: each method runs once in a fresh child process (Linux); after setup (data, model and
imports loaded, one warm-up call on 2 examples) the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``), and reported is the peak RSS during the call (``VmHWM``) minus the
RSS at its start. It counts every allocation, torch's included (``tracemalloc`` sees only
Python's), plus allocator slack, so treat differences below a few MiB as noise.

    python benchmarks/bench_attribution.py            # N = 1,200, K ∈ {1, 64}, h ∈ {64, 256}
    python benchmarks/bench_attribution.py --quick    # smoke run: N = 200, K ∈ {1, 4}, h = 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import ntcov
from ntcov import properties as P
from ntcov.attribution import attribute
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_mlp

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_attribution.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = 1e-5  # max |a − b| / max |b| in the timing dtype
EXACT_TOLERANCE = 1e-10  # the same in float64
TARGET_RATIO = 20.0  # the goal: ntcov ≥ 20× faster than TracInCP
LEARNING_RATE = 0.5
CONVENTION = "score[k, i] = lr grad p_k . grad l_i = -N c[k, i] (ntcov attribute with metric = lr)"
MEMORY_METHOD = "child process: VmHWM during the call minus RSS at its start (peak reset first)"


@dataclass(frozen=True)
class Config:
    """What one run measures; saved next to the results."""

    n_train: int = 1200
    ks: tuple[int, ...] = (1, 64)
    hidden: tuple[int, ...] = (64, 256)
    dtype: str = "float32"
    threads: int = 1
    repeats: int = 7
    cell_seconds: float = 6.0
    train_steps: int = 30
    memory: bool = True
    extra_strategies: tuple[str, ...] = ("per_example", "structured")
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            n_train=200,
            ks=(1, 4),
            hidden=(64,),
            repeats=2,
            cell_seconds=1.0,
            train_steps=5,
            quick=True,
        )


@dataclass
class Problem:
    """The checkpointed model, ``N`` training and ``K`` held-out images, and the checkpoint."""

    model: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    checkpoint: str
    extra: tuple[str, ...] = field(default_factory=tuple)


# ----- the problem ---------------------------------------------------------------------------


def make_problem(
    config: Config, k: int, dtype: torch.dtype, folder: str, hidden: int = 64
) -> Problem:
    """Train the MLP of width ``hidden`` ``train_steps`` full-batch SGD steps on the ``N``
    images; save it."""
    split = load_digits_split(dtype=dtype)
    x_train, y_train = split.x_train[: config.n_train], split.y_train[: config.n_train]
    model = digits_mlp(hidden=hidden, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(config.train_steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    path = os.path.join(folder, f"mlp_{hidden}_{config.dtype}_{dtype}.pt")
    torch.save(model.state_dict(), path)
    extra = tuple(s for s in config.extra_strategies if s in {m.value for m in ntcov.Strategy})
    return Problem(model, x_train, y_train, split.x_test[:k], split.y_test[:k], path, extra)


class CorrectClassProbability:
    """Captum ``test_loss_fn``: ``Σ_k softmax(out_k)[y_k]`` (a "sum" reduction, as it needs)."""

    reduction = "sum"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.softmax(outputs, -1).gather(1, targets[:, None]).sum()


class PerExampleProbability:
    """Captum ``test_loss_fn`` for its default mode: one probability per example."""

    reduction = "none"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.softmax(outputs, -1).gather(1, targets[:, None]).squeeze(1)


# ----- the methods (each returns the [K, N] TracIn scores) -----------------------------------


def run_ntcov(problem: Problem, strategy: str = "auto") -> Tensor:
    model = problem.model
    x = P.probs(model, problem.x_test, problem.y_test)
    loss = P.per_example_loss(model, problem.x_train, problem.y_train)
    metric = {n: torch.full_like(p, LEARNING_RATE) for n, p in model.named_parameters()}
    contributions = attribute(x, loss, metric=metric, strategy=strategy).values
    return -problem.x_train.shape[0] * contributions


def _tracin(problem: Problem, fast: bool) -> Tensor:
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path))
        return LEARNING_RATE

    n = problem.x_train.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns about its own internals
        tracin = TracInCP(
            problem.model,
            TensorDataset(problem.x_train, problem.y_train),
            [problem.checkpoint],
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum" if fast else "none"),
            test_loss_fn=CorrectClassProbability() if fast else PerExampleProbability(),
            batch_size=n,
            sample_wise_grads_per_batch=fast,
        )
        return tracin.influence((problem.x_test, problem.y_test)).detach()


def run_captum(problem: Problem) -> Tensor:
    return _tracin(problem, fast=True)


def run_captum_loop(problem: Problem) -> Tensor:
    return _tracin(problem, fast=False)


def run_vmap_grad(problem: Problem) -> Tensor:
    """Per-sample gradients by ``vmap(grad)`` (``[N, P]`` and ``[K, P]``), then ``η G_x G_ℓᵀ``."""
    model = problem.model
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    def prob_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = torch.softmax(functional_call(model, p, (xi[None],)), -1)
        return out.gather(1, yi.reshape(1, 1)).reshape(())

    per_loss = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, problem.x_train, problem.y_train)
    per_prob = vmap(grad(prob_one), in_dims=(None, 0, 0))(params, problem.x_test, problem.y_test)
    k, n = problem.x_test.shape[0], problem.x_train.shape[0]
    total = sum(per_prob[m].reshape(k, -1) @ per_loss[m].reshape(n, -1).T for m in params)
    return LEARNING_RATE * total  # type: ignore[operator]


def methods(problem: Problem) -> dict[str, Callable[[], Tensor]]:
    out: dict[str, Callable[[], Tensor]] = {
        "ntcov": lambda: run_ntcov(problem),
        "ntcov_jvp": lambda: run_ntcov(problem, "jvp"),
    }
    for strategy in problem.extra:
        out[f"ntcov_{strategy}"] = lambda s=strategy: run_ntcov(problem, s)  # type: ignore[misc]
    out |= {
        "captum": lambda: run_captum(problem),
        "captum_loop": lambda: run_captum_loop(problem),
        "vmap_grad": lambda: run_vmap_grad(problem),
    }
    return out


# ----- timing and memory ---------------------------------------------------------------------


def measure(fns: dict[str, Callable[[], Tensor]], config: Config) -> tuple[dict, dict]:
    """Median seconds of each method (one warm-up call, then up to ``repeats`` interleaved
    rounds fitting in ``cell_seconds``; a method slower than ``cell_seconds`` is timed once)."""
    results, first = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        results[name] = fn()
        first[name] = time.perf_counter() - start
    fast = [n for n in fns if first[n] <= config.cell_seconds]
    per_round = sum(first[n] for n in fast)
    rounds = max(1, min(config.repeats, int(config.cell_seconds // max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name in fast:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    for name in fns:
        if not samples[name]:  # too slow to repeat: its timed second call
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    times = {n: {"median_s": statistics.median(v), "all_s": v} for n, v in samples.items()}
    return times, results


def peak_memory_mib(method: str, k: int, hidden: int, config: Config) -> float | None:
    """Peak RSS increase (MiB) of one call of ``method`` in a fresh child process."""
    command = [
        sys.executable,
        __file__,
        "--child-memory",
        method,
        "--child-k",
        str(k),
        "--child-hidden",
        str(hidden),
        "--child-config",
        json.dumps(asdict(config)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_MIB "):
            return float(line.split()[1])
    print(f"  memory of {method} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def child_memory(method: str, k: int, hidden: int, config: Config) -> None:
    torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory() as folder:
        problem = make_problem(config, k, DTYPES[config.dtype], folder, hidden)
        if method.startswith("captum"):
            import captum.influence  # noqa: F401  (imports are setup, not the method's cost)
        tiny = replace(problem, x_train=problem.x_train[:2], y_train=problem.y_train[:2])
        methods(replace(tiny, x_test=problem.x_test[:1], y_test=problem.y_test[:1]))[method]()
        fn = methods(problem)[method]  # after a warm-up call: lazy imports are not counted
        _reset_peak_rss()
        before = _peak_rss_mib()  # the current RSS, right after the reset
        fn()
        print(f"PEAK_MIB {_peak_rss_mib() - before:.3f}")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss_mib() -> float:
    """``VmHWM`` (the peak RSS since the last reset) from ``/proc/self/status``."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


# ----- one K ---------------------------------------------------------------------------------


def agreement(results: dict[str, Tensor], reference: str = "vmap_grad") -> dict[str, float]:
    ref = results[reference]
    scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
    return {
        f"{name}_vs_{reference}": float((value - ref).abs().max() / scale)
        for name, value in results.items()
        if name != reference
    }


def bench_k(k: int, hidden: int, config: Config, folder: str) -> dict:
    problem = make_problem(config, k, DTYPES[config.dtype], folder, hidden)
    times, results = measure(methods(problem), config)
    median = {n: t["median_s"] for n, t in times.items()}
    ratios = {f"{n}/ntcov": median[n] / median["ntcov"] for n in median if n != "ntcov"}
    row = {
        "K": k,
        "hidden": hidden,
        "N": problem.x_train.shape[0],
        "P": sum(p.numel() for p in problem.model.parameters()),
        "times": times,
        "ratios": ratios,
        "max_rel_diff": agreement(results),
    }
    if config.memory and (not config.quick or k == config.ks[-1]):
        names = list(median) if not config.quick else ["ntcov", "captum"]
        row["peak_memory_mib"] = {n: peak_memory_mib(n, k, hidden, config) for n in names}
    print_row(row)
    return row


def exactness(config: Config, folder: str) -> dict[str, float]:
    """Every method in float64 at ``K = 4``: max relative difference against ``vmap_grad``."""
    exact = replace(config, dtype="float64")
    problem = make_problem(exact, 4, torch.float64, folder)
    return agreement({n: fn() for n, fn in methods(problem).items()})


def print_row(row: dict) -> None:
    t = {n: v["median_s"] * 1e3 for n, v in row["times"].items()}
    cells = "  ".join(f"{n} {v:9.2f} ms" for n, v in t.items())
    print(f"h={row['hidden']:<3} P={row['P']:<6} K={row['K']:<3} N={row['N']}  {cells}")
    print("       ratios: " + "  ".join(f"{n} {v:7.1f}x" for n, v in row["ratios"].items()))
    print(
        "       max rel diff: " + "  ".join(f"{n} {v:.1e}" for n, v in row["max_rel_diff"].items())
    )
    if "peak_memory_mib" in row:
        mem = row["peak_memory_mib"]
        print(
            "       peak MiB: "
            + "  ".join(f"{n} {v if v is None else round(v, 1)}" for n, v in mem.items())
        )


# ----- main ----------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200, K ∈ {1, 4}")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the child-process memory runs"
    )
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    parser.add_argument("--child-k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-hidden", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.child_memory:
        config = Config(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in json.loads(args.child_config).items()
            }
        )
        child_memory(args.child_memory, args.child_k, args.child_hidden, config)
        return 0
    base = Config.quick_config() if args.quick else Config()
    config = replace(base, dtype=args.dtype, threads=args.threads, memory=not args.no_memory)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory() as folder:
            rows = [bench_k(k, h, config, folder) for h in config.hidden for k in config.ks]
            exact = exactness(config, folder)
    finally:
        torch.set_num_threads(previous)
    failures = [
        f"h={row['hidden']} K={row['K']}: {name} {value:.1e} > {TOLERANCE:g}"
        for row in rows
        for name, value in row["max_rel_diff"].items()
        if not value <= TOLERANCE
    ] + [
        f"float64: {n} {v:.1e} > {EXACT_TOLERANCE:g}"
        for n, v in exact.items()
        if not v <= EXACT_TOLERANCE
    ]
    print("float64 agreement: " + "  ".join(f"{n} {v:.1e}" for n, v in exact.items()))
    for row in rows:
        ratio = row["ratios"]["captum/ntcov"]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        loop = row["ratios"]["captum_loop/ntcov"]
        print(
            f"h={row['hidden']} (P={row['P']}) K={row['K']}: ntcov is {ratio:.1f}x faster than "
            f"TracInCP's fast mode ({verdict} the {TARGET_RATIO:g}x goal) and {loop:.1f}x faster "
            "than its default mode"
        )
    payload = {
        "config": asdict(config),
        "tolerance": TOLERANCE,
        "exact_tolerance": EXACT_TOLERANCE,
        "learning_rate": LEARNING_RATE,
        "convention": CONVENTION,
        "memory_method": MEMORY_METHOD,
        "rows": rows,
        "float64_max_rel_diff": exact,
        "failures": failures,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ntcov": ntcov.__version__,
            "threads": config.threads,
            "cpu": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    for failure in failures:
        print("DISAGREEMENT " + failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
