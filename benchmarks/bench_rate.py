"""Benchmark ``ntcov.rate`` against a loop of backward passes and ``torch.func.jacrev``.

Price's equation under gradient flow gives, for ``K`` properties ``x`` (here: the probability of
the correct class for ``K`` digit images) and the training loss ``L`` (1,438 training images),

    dx/dt = ntcov(x, −L) = −J_x ∇L          shape [K]

Three ways to compute it are timed side by side in one run:

- ``rate``:   ``ntcov.rate(x, loss)``: one backward pass of ``L``, one forward-mode JVP of ``x``;
- ``loop``:   ``K`` backward passes ``torch.autograd.grad(x_k, w)``, each dotted with ``−∇L``;
- ``jacrev``: ``torch.func.jacrev`` of ``x`` w.r.t. the parameter dict (``[K, *p]`` per
  parameter), contracted with ``−∇L``;

and the ``floor``: one full-batch gradient of ``L`` plus two forward passes over the ``K``
images (plain PyTorch, no ntcov). ``rate`` should stay within 2× of the floor for every ``K``,
while ``loop`` and ``jacrev`` grow with ``K`` (each of their K backward passes runs through the
graph of all K images, so they grow up to ``K²``).

Times are medians of repeats (``time.perf_counter``) after warm-up, with a fixed thread count
(default 1: on a small shared machine more threads than free cores makes every time erratic);
``floor`` and ``rate`` repeats are interleaved so that load from other processes hits both alike.
When one call of ``loop`` or ``jacrev`` would take longer than ``--max-seconds``, its time is
extrapolated from its first rows instead (marked ``~``; see :func:`time_slow`).
The three methods are checked to agree in the timing dtype (max |a − b| / max |b| against the
loop, tolerance 1e-4 in float32, 1e-8 in float64), and every run also checks them in float64 at
``K = 16``; a disagreement exits with status 1 after writing the JSON.

    python benchmarks/bench_rate.py                 # full run, K ∈ {1, 16, 256, 1024}
    python benchmarks/bench_rate.py --quick         # smoke run: K ∈ {1, 16}, one repeat
    python benchmarks/bench_rate.py --dtype float64 --threads 2 --out /tmp/rate64.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

import ntcov
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_cnn, digits_mlp

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_rate.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}  # max |a − b| / max |b|
MODELS = ("mlp", "cnn")
FULL_KS = (1, 16, 256, 1024)
QUICK_KS = (1, 16)
EXACTNESS_K = 16
TARGET_KS = (16, 1024)  # the targets: rate within 2× of the floor at these K
JACREV_BYTES = 128 << 20  # bound on one batched activation cotangent inside jacrev
FAST = ("floor", "rate")
SLOW = ("loop", "jacrev")


@dataclass(frozen=True)
class Config:
    """What one run measures and how; saved next to the results."""

    dtype: str = "float32"
    ks: tuple[int, ...] = FULL_KS
    models: tuple[str, ...] = MODELS
    threads: int = 1
    warmup: int = 2
    repeats: int = 11
    cell_seconds: float = 4.0
    max_seconds: float = 60.0
    quick: bool = False


@dataclass(frozen=True)
class Problem:
    """One model, ``K`` property images ``[K, ...]`` with labels ``[K]``, and the training set."""

    model_name: str
    model: nn.Module
    images: Tensor
    labels: Tensor
    x_train: Tensor
    y_train: Tensor
    x: ntcov.Property
    loss: ntcov.Property

    @property
    def k(self) -> int:
        return self.images.shape[0]


@dataclass
class Timing:
    """Median seconds of ``runs`` timed calls (``None`` when skipped), and why if unusual.

    ``estimated``: not a full call but a linear extrapolation from timed parts (see ``note``);
    ``predicted_s``: that extrapolation, also kept when the full call was then timed.
    """

    median_s: float | None
    runs: int = 0
    all_s: list[float] = field(default_factory=list)
    note: str = ""
    estimated: bool = False
    predicted_s: float | None = None


# ----- the problem ---------------------------------------------------------------------------


def make_model(name: str, dtype: torch.dtype) -> nn.Module:
    """The digits MLP (64→64→64→10, tanh) or the small CNN, in eval mode, seed 0."""
    if name == "mlp":
        return digits_mlp(dtype=dtype)
    if name == "cnn":
        return digits_cnn(dtype=dtype)
    raise ValueError(f"make_model: unknown model {name!r}; choose one of {MODELS}.")


def make_problem(name: str, model: nn.Module, k: int, dtype: torch.dtype) -> Problem:
    """Property images: the first ``k`` of train followed by test (1,797 distinct digits)."""
    split = load_digits_split(dtype=dtype, images=name == "cnn")
    pool_x = torch.cat([split.x_train, split.x_test])
    pool_y = torch.cat([split.y_train, split.y_test])
    if not 1 <= k <= pool_x.shape[0]:
        raise ValueError(f"make_problem: K must be in [1, {pool_x.shape[0]}], got {k}.")
    images, labels = pool_x[:k], pool_y[:k]
    x = ntcov.properties.probs(model, images, labels)
    loss = ntcov.properties.loss(model, split.x_train, split.y_train)
    return Problem(name, model, images, labels, split.x_train, split.y_train, x, loss)


def correct_class_probs(outputs: Tensor, labels: Tensor) -> Tensor:
    """``softmax(outputs)[i, labels_i]``, ``[K]``."""
    return torch.softmax(outputs, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)


def loss_ascent(problem: Problem) -> dict[str, Tensor]:
    """``−∇L`` over the training set, one backward pass with plain autograd, ``{name: [*p]}``."""
    names, params = zip(*problem.model.named_parameters(), strict=True)
    loss = nn.functional.cross_entropy(problem.model(problem.x_train), problem.y_train)
    grads = torch.autograd.grad(loss, params)
    return {n: -g for n, g in zip(names, grads, strict=True)}


# ----- the methods ---------------------------------------------------------------------------


def run_floor(problem: Problem) -> None:
    """One full-batch gradient of the training loss plus two forward passes over the K images."""
    loss_ascent(problem)
    with torch.no_grad():
        for _ in range(2):
            correct_class_probs(problem.model(problem.images), problem.labels)


def run_rate(problem: Problem) -> Tensor:
    """``ntcov.rate(x, loss)``, ``[K]``."""
    return ntcov.rate(problem.x, problem.loss)


def run_loop(problem: Problem, entries: int | None = None) -> Tensor:
    """``K`` backward passes of ``x_k`` through the graph of all K images, each dotted with −∇L.

    ``entries`` stops after the first few passes (to time a prefix of the loop).
    """
    ascent = loss_ascent(problem)
    params = [p for _, p in problem.model.named_parameters()]
    x = correct_class_probs(problem.model(problem.images), problem.labels)
    rates = []
    for k in range(problem.k if entries is None else entries):
        grads = torch.autograd.grad(x[k], params, retain_graph=True)
        rates.append(sum((g * a).sum() for g, a in zip(grads, ascent.values(), strict=True)))
    return torch.stack(rates).detach()  # type: ignore[arg-type]


def run_jacrev(problem: Problem) -> Tensor:
    """``torch.func.jacrev`` of x w.r.t. the parameter dict, then ``J (−∇L)``, ``[K]``."""
    ascent = loss_ascent(problem)
    jac = jacrev(_x_of(problem), chunk_size=jacrev_chunk(problem))(_param_dict(problem))
    parts = [jac[n].reshape(problem.k, -1) @ a.reshape(-1) for n, a in ascent.items()]
    return torch.stack(parts).sum(0).detach()


def run_jacrev_rows(problem: Problem, rows: int) -> None:
    """What ``jacrev`` does for its first ``rows`` rows: one ``vjp``, then ``vmap`` of the VJP
    over that many basis cotangents (to time a prefix of it)."""
    loss_ascent(problem)
    _, vjp_fn = vjp(_x_of(problem), _param_dict(problem))[:2]
    basis = torch.eye(problem.k, dtype=problem.images.dtype)[:rows]
    vmap(vjp_fn)(basis)


def _x_of(problem: Problem) -> Callable[[dict[str, Tensor]], Tensor]:
    def x_of(params: dict[str, Tensor]) -> Tensor:
        outputs = functional_call(problem.model, params, (problem.images,))
        return correct_class_probs(outputs, problem.labels)

    return x_of


def _param_dict(problem: Problem) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in problem.model.named_parameters()}


def jacrev_chunk(problem: Problem) -> int | None:
    """Rows per vmapped VJP such that one batched cotangent ``[c, K, widest]`` fits the bound."""
    widest = widest_activation(problem.model, problem.images[:1])
    per_row = problem.k * widest * problem.images.element_size()
    chunk = max(1, JACREV_BYTES // per_row)
    return None if chunk >= problem.k else chunk


def widest_activation(model: nn.Module, one: Tensor) -> int:
    """Most entries of any layer output for one input (layers of an ``nn.Sequential``)."""
    widest = one.numel()
    with torch.no_grad():
        h = one
        for layer in model.children() if isinstance(model, nn.Sequential) else [model]:
            h = layer(h)
            widest = max(widest, h.numel())
    return widest


METHODS: dict[str, Callable[[Problem], Tensor | None]] = {
    "floor": run_floor,
    "rate": run_rate,
    "loop": run_loop,
    "jacrev": run_jacrev,
}


# ----- timing --------------------------------------------------------------------------------


Call = Callable[[], Tensor | None]


def timed(fn: Call) -> tuple[float, Tensor | None]:
    """Seconds of one call of ``fn`` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(
    fns: dict[str, Call], config: Config, *, slow: bool = False
) -> tuple[dict[str, Timing], dict[str, Tensor]]:
    """Median times of ``fns``, their repeats interleaved round-robin, and their first results.

    The first ``warmup`` calls of each are not timed, then up to ``repeats`` calls that fit in
    ``cell_seconds`` are (at least one). For ``slow`` methods whose first call took longer than
    ``cell_seconds``, that call is the only sample (first-call overheads are then negligible).
    """
    warm = {name: timed(fn) for name, fn in fns.items()}
    results = {name: r for name, (_, r) in warm.items() if r is not None}
    if slow and max(t for t, _ in warm.values()) > config.cell_seconds:
        return {n: Timing(t, 1, [t], "one run (its first)") for n, (t, _) in warm.items()}, results
    for _ in range(config.warmup - 1):
        warm = {name: timed(fn) for name, fn in fns.items()}
    per_round = sum(t for t, _ in warm.values())
    repeats = max(1, min(config.repeats, int(config.cell_seconds // max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn)[0])
    timings = {n: Timing(statistics.median(v), len(v), v) for n, v in samples.items()}
    return timings, results


# ----- one model, all K ----------------------------------------------------------------------


def bench_model(name: str, config: Config) -> list[dict]:
    """Rows ``{model, K, P, times, ratios, max_rel_diff}`` for one model over ``config.ks``."""
    dtype = DTYPES[config.dtype]
    model = make_model(name, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    rows = []
    for k in config.ks:
        problem = make_problem(name, model, k, dtype)
        fast, values = measure({m: _bound(METHODS[m], problem) for m in FAST}, config)
        timings = dict(fast)
        for method in SLOW:
            timings[method], result = time_slow(method, problem, config)
            if result is not None:
                values[method] = result
        diffs = agreement({m: values[m] for m in ("rate", *SLOW) if m in values})
        rows.append(_row(name, k, num_params, timings, diffs))
        print_row(rows[-1])
    return rows


def time_slow(method: str, problem: Problem, config: Config) -> tuple[Timing, Tensor | None]:
    """Time ``loop`` or ``jacrev`` in full, or only estimate it when that would take too long.

    From ``K = 8`` on, the first ``n`` and ``2n`` rows (``n = K / 64``) are timed first; every
    row costs the same (one backward pass through the graph of all K images), so
    ``t(K) ≈ setup + K · per_row``. Over ``max_seconds``, that extrapolation is the result.
    """
    guess = None
    if problem.k >= 8:
        rows = max(1, problem.k // 64)
        guess, t1, t2 = extrapolate(method, problem, rows)
        if guess > config.max_seconds:
            note = (
                f"estimated: {guess:.0f} s > --max-seconds {config.max_seconds:g}, extrapolated "
                f"linearly from {rows} and {2 * rows} of {problem.k} {PREFIX_UNITS[method]} "
                f"({t1:.2f} s, {t2:.2f} s)"
            )
            return Timing(guess, 0, [t1, t2], note, estimated=True, predicted_s=guess), None
    timings, results = measure({method: _bound(METHODS[method], problem)}, config, slow=True)
    timings[method].predicted_s = guess
    return timings[method], results.get(method)


PREFIXES: dict[str, Callable[[Problem, int], Tensor | None]] = {
    "loop": run_loop,
    "jacrev": run_jacrev_rows,
}
PREFIX_UNITS = {"loop": "backward passes", "jacrev": "vmapped VJP rows"}


def extrapolate(method: str, problem: Problem, rows: int) -> tuple[float, float, float]:
    """``(setup + K · per_row, t(rows), t(2 rows))`` from timing the method's first rows."""
    prefix = PREFIXES[method]
    prefix(problem, 1)  # warm-up at this K
    t1 = timed(lambda: prefix(problem, rows))[0]
    t2 = timed(lambda: prefix(problem, 2 * rows))[0]
    per_row = max(t2 - t1, 0.0) / rows
    return max(t1 - rows * per_row, 0.0) + problem.k * per_row, t1, t2


def _bound(method: Callable[[Problem], Tensor | None], problem: Problem) -> Call:
    return lambda: method(problem)


def agreement(values: dict[str, Tensor]) -> dict[str, float]:
    """``max |a − ref| / max |ref|`` of each method against the loop (else jacrev), ``{}`` if
    neither ran in full."""
    ref_name = next((m for m in SLOW if m in values), None)
    if ref_name is None:
        return {}
    ref = values[ref_name]
    scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
    return {
        f"{name}_vs_{ref_name}": float((value - ref).abs().max() / scale)
        for name, value in values.items()
        if name != ref_name
    }


def _row(
    name: str, k: int, num_params: int, timings: dict[str, Timing], diffs: dict[str, float]
) -> dict:
    t = {m: timings[m].median_s for m in METHODS}
    return {
        "model": name,
        "K": k,
        "P": num_params,
        "times": {m: asdict(timings[m]) for m in METHODS},
        "ratios": {
            "rate/floor": _ratio(t["rate"], t["floor"]),
            "loop/rate": _ratio(t["loop"], t["rate"]),
            "jacrev/rate": _ratio(t["jacrev"], t["rate"]),
        },
        "max_rel_diff": diffs,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ----- float64 exactness ---------------------------------------------------------------------


def exactness_check(models: Sequence[str]) -> dict[str, dict[str, float]]:
    """The three methods in float64 at ``K = 16``: ``{model: {pair: max rel diff}}``."""
    out = {}
    for name in models:
        problem = make_problem(name, make_model(name, torch.float64), EXACTNESS_K, torch.float64)
        values = {m: METHODS[m](problem) for m in ("rate", *SLOW)}
        out[name] = agreement({m: v for m, v in values.items() if v is not None})
    return out


# ----- printing and saving -------------------------------------------------------------------

HEADER = (
    f"{'model':<5} {'K':>5} {'floor ms':>9} {'rate ms':>9} {'loop ms':>10} {'jacrev ms':>10}"
    f" {'rate/floor':>10} {'loop/rate':>10} {'jacrev/rate':>11} {'max rel diff':>12}"
)


def print_row(row: dict) -> None:
    times, ratios = row["times"], row["ratios"]
    diff = max(row["max_rel_diff"].values(), default=None)
    print(
        f"{row['model']:<5} {row['K']:>5} {_ms(times['floor']):>9} {_ms(times['rate']):>9}"
        f" {_ms(times['loop']):>10} {_ms(times['jacrev']):>10}"
        f" {_num(ratios['rate/floor'], 2):>10}"
        f" {_num(ratios['loop/rate'], 1, times['loop']['estimated']):>10}"
        f" {_num(ratios['jacrev/rate'], 1, times['jacrev']['estimated']):>11} {_sci(diff):>12}",
        flush=True,
    )
    for method in METHODS:
        if times[method]["note"]:
            print(f"{'':<12}{method}: {times[method]['note']}", flush=True)


def _ms(timing: dict) -> str:
    """Milliseconds; ``~`` marks an extrapolated estimate."""
    if timing["median_s"] is None:
        return "skipped"
    return ("~" if timing["estimated"] else "") + f"{1e3 * timing['median_s']:.2f}"


def _num(value: float | None, digits: int, estimated: bool = False) -> str:
    return "-" if value is None else ("~" if estimated else "") + f"{value:.{digits}f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def targets(rows: list[dict], models: Sequence[str], ks: Sequence[int]) -> dict[str, dict]:
    """The issue's targets: rate within 2× of the floor; loop and jacrev growing with K."""
    out = {}
    for name in models:
        mine = {r["K"]: r for r in rows if r["model"] == name}
        ratios = {k: mine[k]["ratios"]["rate/floor"] for k in ks}
        growth = {}
        for method in SLOW:
            timed_ks = [k for k in ks if mine[k]["times"][method]["median_s"] is not None]
            if len(timed_ks) >= 2:
                first, last = (mine[k]["times"][method] for k in (timed_ks[0], timed_ks[-1]))
                growth[method] = {
                    "from_K": timed_ks[0],
                    "to_K": timed_ks[-1],
                    "time_ratio": last["median_s"] / first["median_s"],
                    "estimated": last["estimated"],
                }
        checked = [ratios[k] for k in TARGET_KS if k in ratios]
        out[name] = {
            "rate/floor": ratios,
            "target_ks": [k for k in TARGET_KS if k in ratios],
            "rate_within_2x_of_floor": bool(checked)
            and all(r is not None and r <= 2.0 for r in checked),
            "growth": growth,
        }
    return out


def print_targets(summary: dict[str, dict]) -> None:
    for name, s in summary.items():
        ratios = ", ".join(f"K={k}: {_num(r, 2)}" for k, r in s["rate/floor"].items())
        at = ", ".join(f"K={k}" for k in s["target_ks"])
        verdict = "yes" if s["rate_within_2x_of_floor"] else "NO"
        tail = f" -> within 2x of the floor at {at}: {verdict}" if at else ""
        print(f"{name}: rate/floor {ratios}{tail}")
        for method, g in s["growth"].items():
            mark = " (estimated at the last K)" if g["estimated"] else ""
            print(
                f"{name}: {method} time grows {g['time_ratio']:.0f}x from K={g['from_K']} "
                f"to K={g['to_K']}{mark}"
            )


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ntcov": ntcov.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="K values to time")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per cell (>= 1)")
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per cell (at most)")
    parser.add_argument(
        "--cell-seconds", type=float, default=4.0, help="time for the repeats of one cell"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="estimate loop/jacrev (from their first rows) instead of running them when one "
        "call is predicted to take longer than this",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: K in {1, 16}, 1 repeat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--threads, --warmup and --repeats must be at least 1")
    ks = tuple(args.ks) if args.ks else (QUICK_KS if args.quick else FULL_KS)
    config = Config(
        dtype=args.dtype,
        ks=ks,
        models=tuple(args.models),
        threads=args.threads,
        warmup=1 if args.quick else args.warmup,
        repeats=1 if args.quick else args.repeats,
        cell_seconds=args.cell_seconds,
        max_seconds=args.max_seconds,
        quick=args.quick,
    )
    return config, args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the methods disagree. Restores the thread count."""
    config, out = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return run(config, out)
    finally:
        torch.set_num_threads(threads)


def run(config: Config, out: Path) -> int:
    start = time.perf_counter()
    print(
        f"bench_rate: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"dtype {config.dtype}, K {list(config.ks)}, {_cpu_model()}",
        flush=True,
    )
    print(HEADER, flush=True)
    rows = [row for name in config.models for row in bench_model(name, config)]
    summary = targets(rows, config.models, config.ks)
    exact = exactness_check(config.models)
    print()
    print_targets(summary)
    for name, diffs in exact.items():
        worst = max(diffs.values(), default=float("nan"))
        print(f"{name}: float64 check at K={EXACTNESS_K}: max rel diff {worst:.1e} (tol 1e-8)")
    failures = _failures(rows, exact, TOLERANCE[config.dtype])
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.1f} s")
    _save(out, config, rows, summary, exact, failures, elapsed)
    if failures:
        print("AGREEMENT FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _failures(rows: list[dict], exact: dict[str, dict[str, float]], tol: float) -> list[str]:
    bad = [
        f"{r['model']} K={r['K']} {pair}: {d:.2e} > {tol:g}"
        for r in rows
        for pair, d in r["max_rel_diff"].items()
        if not d <= tol
    ]
    bad += [
        f"{name} float64 K={EXACTNESS_K} {pair}: {d:.2e} > 1e-8"
        for name, diffs in exact.items()
        for pair, d in diffs.items()
        if not d <= TOLERANCE["float64"]
    ]
    return bad


def _save(
    out: Path,
    config: Config,
    rows: list[dict],
    summary: dict,
    exact: dict,
    failures: list[str],
    elapsed: float,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_rate",
        "config": asdict(config),
        "tolerance": TOLERANCE[config.dtype],
        "machine": machine(),
        "rows": rows,
        "targets": summary,
        "float64_check": {"K": EXACTNESS_K, "max_rel_diff": exact},
        "failures": failures,
        "elapsed_s": elapsed,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
