"""Benchmark K×K neural tangent covariance matrices: structured rules against the other ways.

For ``p`` = the probability of the correct class for ``K`` digit images, ``ntcov(p, p) = J Jᵀ``
(``[K, K]``, the empirical NTK of these outputs) is computed, in one run, by:

- ``structured``:  ``ntcov.ntcov(p, p, strategy="structured")`` (per-layer rules, no per-example
  gradients of ``nn.Linear``/``Conv``/``Embedding`` weights where that is cheaper);
- ``auto``:        ``ntcov.ntcov(p, p)`` with the default strategy (what a user gets);
- ``vmap``:        per-example gradients ``vmap(grad)`` over examples (``[K, P]``), then ``G Gᵀ``;
- ``jacrev``:      ``torch.func.jacrev`` of the batch output w.r.t. the weights, then ``J Jᵀ``;
- ``ntk_jac``:     the torch.func NTK tutorial's "Jacobian contraction" (``vmap(jacrev)`` per
  example,
  contracted per parameter with ``einsum``);
- ``ntk_vps``:     the tutorial's "NTK-vector products" (``vjp`` then ``jvp``, vmapped over pairs);
- ``nngeometry``:  ``nngeometry.GramMatrix`` (hooks, 0.4) with a dense representation.

Models: the digits MLP ``64→256→256→10``, a small CNN (two 3×3 convolutions, 16 channels) and a
small transformer encoder (8 tokens of 8 pixels, ``nn.TransformerEncoderLayer`` width 32, 4 heads).
Times are medians of repeats after a warm-up call, the methods taking turns within each
(model, K) so that a load on a shared machine hits them alike; peak memory is the largest
resident set size seen by a sampling thread during the first call, minus the size at its start
(after ``malloc_trim``).
A method predicted (from its time at the previous K, scaled by ``(K/K_prev)²``) to exceed
``--max-seconds`` is skipped and its prediction recorded. Exactness: every method, in float64 at
``K = --check-k``, against the brute-force Jacobian (one ``autograd.grad`` per entry):
``max |G − G_ref| / max |G_ref|``.

    python benchmarks/bench_gram.py                # K ∈ {64, 256, 1024}, all models (minutes)
    python benchmarks/bench_gram.py --quick        # smoke run: K = 16, one repeat
    python benchmarks/bench_gram.py --large-k 10000 --models mlp --methods structured
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import ntcov
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_cnn, digits_mlp

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_gram.json"
METHODS = ("structured", "auto", "vmap", "jacrev", "ntk_jac", "ntk_vps", "nngeometry")
MODELS = ("mlp", "cnn", "transformer")
FULL_KS = (64, 256, 1024)
QUICK_KS = (16,)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
EXACT_TOLERANCE = 1e-10  # float64, relative to the largest entry


# ----- models and data ------------------------------------------------------------------------


class DigitsEncoder(nn.Module):
    """Rows of an 8×8 digit as 8 tokens: linear embedding + positions → one
    ``nn.TransformerEncoderLayer`` (no dropout) → mean over tokens → linear head."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(0.1 * torch.randn(8, width))
        self.encoder = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, 10)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.embed(images.reshape(-1, 8, 8)) + self.position
        return self.head(self.encoder(tokens).mean(1))


def make_model(name: str, dtype: torch.dtype) -> nn.Module:
    if name == "mlp":
        return digits_mlp(hidden=256, depth=2, dtype=dtype)
    if name == "cnn":
        return digits_cnn(channels=16, dtype=dtype)
    torch.manual_seed(0)
    return DigitsEncoder().to(dtype).eval()


def make_data(name: str, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``K`` digit images (train then test; beyond 1,797 the images repeat with a little noise)
    shaped for the model, and their labels."""
    split = load_digits_split(dtype=dtype)
    x, y = torch.cat([split.x_train, split.x_test]), torch.cat([split.y_train, split.y_test])
    copies = -(-k // x.shape[0])
    noise = torch.randn(copies * x.shape[0], 64, generator=torch.Generator().manual_seed(0))
    repeated = torch.arange(copies * x.shape[0]) >= x.shape[0]  # noise on the copies only
    x = (x.repeat(copies, 1) + 0.05 * noise.to(dtype) * repeated.unsqueeze(1).to(dtype))[:k]
    y = y.repeat(copies)[:k]
    return (x.reshape(k, 1, 8, 8) if name == "cnn" else x), y


# ----- methods --------------------------------------------------------------------------------


def _prob(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """``softmax(model(x))[i, y_i]`` for a batch, ``[n]``."""
    out = functional_call(model, params, (x,))
    return torch.softmax(out, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def run_structured(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    prop = ntcov.properties.probs(model, x, y)
    return ntcov.ntcov(prop, prop, strategy="structured", memory_budget=budget)


def run_auto(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    """``ntcov.ntcov(p, p)`` with the default ``strategy='auto'`` (its own choice)."""
    prop = ntcov.properties.probs(model, x, y)
    return ntcov.ntcov(prop, prop, memory_budget=budget)


def run_vmap(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    """Per-example gradients by ``vmap(grad)`` (``[K, P]``), then one matrix product."""
    params = _params(model)

    def single(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return _prob(model, p, xi.unsqueeze(0), yi.unsqueeze(0))[0]

    grads = vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)
    return flat @ flat.T


def run_jacrev(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    """``jacrev`` of the batch output (K vmapped backward passes through the whole batch)."""
    params = _params(model)
    jac = jacrev(lambda p: _prob(model, p, x, y))(params)
    flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], 1)
    return flat @ flat.T


def run_ntk_jac(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    """The torch.func NTK tutorial's Jacobian contraction (empirical_ntk_jacobian_contraction)."""
    params = _params(model)

    def single(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return _prob(model, p, xi.unsqueeze(0), yi.unsqueeze(0))

    jac = vmap(jacrev(single), (None, 0, 0))(params, x, y)  # {name: [K, 1, *p]}
    blocks = [j.flatten(2) for j in jac.values()]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j, j) for j in blocks]).sum(0)
    return result[:, :, 0, 0]


def run_ntk_vps(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    """The torch.func NTK tutorial's NTK-vector products (``empirical_ntk_ntk_vps``)."""
    params = _params(model)

    def get_ntk(x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor) -> Tensor:
        def func_x1(p: dict[str, Tensor]) -> Tensor:
            return _prob(model, p, x1.unsqueeze(0), y1.unsqueeze(0))

        def func_x2(p: dict[str, Tensor]) -> Tensor:
            return _prob(model, p, x2.unsqueeze(0), y2.unsqueeze(0))

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec: Tensor) -> Tensor:
            (vjps,) = vjp_fn(vec)
            return jvp(func_x2, (params,), (vjps,))[1]

        basis = torch.eye(output.numel(), dtype=output.dtype).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    inner = vmap(get_ntk, (None, None, 0, 0))
    return vmap(inner, (0, 0, None, None))(x, y, x, y).reshape(x.shape[0], x.shape[0])


def run_nngeometry(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
    """``nngeometry.GramMatrix`` with a dense representation (its hooks backend)."""
    from nngeometry import GramMatrix
    from nngeometry.object import FMatDense
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=min(256, x.shape[0]))

    def function(xs: Tensor, ys: Tensor) -> Tensor:
        return torch.softmax(model(xs), -1).gather(-1, ys.unsqueeze(-1))

    gram = GramMatrix(model, loader, function=function, representation=FMatDense)
    return gram.to_torch().reshape(x.shape[0], x.shape[0])


RUNNERS: dict[str, Callable[[nn.Module, Tensor, Tensor, int], Tensor]] = {
    "structured": run_structured,
    "auto": run_auto,
    "vmap": run_vmap,
    "jacrev": run_jacrev,
    "ntk_jac": run_ntk_jac,
    "ntk_vps": run_ntk_vps,
    "nngeometry": run_nngeometry,
}


def brute_force(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``J Jᵀ`` from one ``torch.autograd.grad`` per entry, on the model's own parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.softmax(model(x), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True)])
        for v in out
    ]
    jac = torch.stack(rows)
    return jac @ jac.T


# ----- measuring ------------------------------------------------------------------------------


class PeakMemory:
    """Largest resident set size above the level at entry, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _trim()
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Cell:
    """One (model, K, method) measurement."""

    model: str
    k: int
    method: str
    seconds: float | None = None
    peak_mib: float | None = None
    rel_diff_to_vmap: float | None = None
    status: str = "ok"
    predicted_s: float | None = None


def quiet(name: str) -> Callable[[nn.Module, Tensor, Tensor, int], Tensor]:
    """The runner with warnings silenced (torch's notes on missing batching rules), except
    ntcov's fallback warnings, which are raised: a structured time must not be a fallback's."""

    def run(model: nn.Module, x: Tensor, y: Tensor, budget: int) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", ntcov.FallbackWarning)
            return RUNNERS[name](model, x, y, budget)

    return run


def first_call(
    name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
) -> tuple[Tensor, float, float]:
    """The result, the seconds and the peak memory (MiB) of one call."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = quiet(name)(model, x, y, args.memory_budget)
        seconds = time.perf_counter() - start
    return result.detach(), seconds, memory.bytes / 2**20


def measure(args: argparse.Namespace) -> tuple[list[Cell], dict[str, dict[str, float | str]]]:
    cells: list[Cell] = []
    dtype = DTYPES[args.dtype]
    for model_name in args.models:
        model = make_model(model_name, dtype)
        _warm_up(model_name, model, dtype, args)
        last: dict[str, tuple[int, float]] = {}
        for k in args.ks:
            x, y = make_data(model_name, k, dtype)
            results: dict[str, Tensor] = {}
            row = [_cell(model_name, model, k, m, x, y, last, results, args) for m in args.methods]
            _repeat_interleaved(row, model, x, y, args)
            for cell in row:
                if cell.seconds is not None:
                    last[cell.method] = (k, cell.seconds)
                    print(
                        f"{model_name:12s} K={k:6d} {cell.method:11s} {cell.seconds:9.4f} s "
                        f"{cell.peak_mib:9.1f} MiB"
                    )
            _compare(row, results)
            cells += row
    exactness = {m: check_exactness(m, args) for m in args.models}
    return cells, exactness


def _repeat_interleaved(
    row: list[Cell], model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
) -> None:
    """Further calls, the methods taking turns (a load on the shared machine hits them all
    alike), while the round fits in ``--cell-seconds``; each cell's time is its median."""
    timed = [c for c in row if c.seconds is not None]
    times = {c.method: [c.seconds] for c in timed}
    deadline = time.perf_counter() + args.cell_seconds
    for _ in range(args.repeats - 1):
        if time.perf_counter() + sum(c.seconds or 0.0 for c in timed) > deadline:
            break
        for cell in timed:
            start = time.perf_counter()
            quiet(cell.method)(model, x, y, args.memory_budget)
            times[cell.method].append(time.perf_counter() - start)
    for cell in timed:
        cell.seconds = statistics.median(times[cell.method])


def _warm_up(name: str, model: nn.Module, dtype: torch.dtype, args: argparse.Namespace) -> None:
    x, y = make_data(name, 4, dtype)
    for method in args.methods:
        with contextlib.suppress(Exception):  # a method that fails is reported when measured
            quiet(method)(model, x, y, args.memory_budget)


def _cell(
    model_name: str,
    model: nn.Module,
    k: int,
    method: str,
    x: Tensor,
    y: Tensor,
    last: dict[str, tuple[int, float]],
    results: dict[str, Tensor],
    args: argparse.Namespace,
) -> Cell:
    """The first call of one method (or why it is skipped); repeats come later, interleaved."""
    cell = Cell(model_name, k, method)
    held = k * k * sum(p.numel() for p in model.parameters()) * x.element_size()
    if method in ("ntk_vps", "jacrev") and held > args.max_bytes:  # K × (K-sized) buffers
        cell.status = f"skipped (holds about K²·P = {held / 2**30:.1f} GiB > --max-bytes)"
        return cell
    if method in last:
        previous_k, previous_s = last[method]
        cell.predicted_s = previous_s * (k / previous_k) ** 2
        if cell.predicted_s > args.max_seconds:
            cell.status = "skipped (predicted time over --max-seconds)"
            return cell
    try:
        result, cell.seconds, cell.peak_mib = first_call(method, model, x, y, args)
    except Exception as err:
        cell.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return cell
    results[method] = result
    return cell


def _compare(cells: list[Cell], results: dict[str, Tensor]) -> None:
    reference = results.get("vmap", results.get("structured"))
    if reference is None:
        return
    scale = float(reference.abs().max())
    for cell in cells:
        if cell.method in results:
            diff = float((results[cell.method].to(reference.dtype) - reference).abs().max())
            cell.rel_diff_to_vmap = diff / scale


def check_exactness(model_name: str, args: argparse.Namespace) -> dict[str, float | str]:
    """Every method in float64 at ``K = --check-k`` against the brute force."""
    model = make_model(model_name, torch.float64)
    x, y = make_data(model_name, args.check_k, torch.float64)
    reference = brute_force(model, x, y)
    scale = float(reference.abs().max())
    errors: dict[str, float | str] = {}
    for method in args.methods:
        try:
            got = quiet(method)(model, x, y, args.memory_budget)
            errors[method] = float((got - reference).abs().max()) / scale
        except Exception as err:
            errors[method] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return errors


def measure_large(args: argparse.Namespace) -> dict[str, object]:
    """The structured ``K×K`` matrix of the MLP at ``K = --large-k`` under ``--memory-budget``."""
    dtype = DTYPES[args.dtype]
    model = make_model("mlp", dtype)
    x, y = make_data("mlp", args.large_k, dtype)
    _warm_up("mlp", model, dtype, argparse.Namespace(**{**vars(args), "methods": ["structured"]}))
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = quiet("structured")(model, x, y, args.memory_budget)
        seconds = time.perf_counter() - start
    symmetric = float((result - result.T).abs().max() / result.abs().max())
    return {
        "K": args.large_k,
        "seconds": seconds,
        "peak_mib": memory.bytes / 2**20,
        "result_mib": result.numel() * result.element_size() / 2**20,
        "memory_budget_mib": args.memory_budget / 2**20,
        "asymmetry": symmetric,
    }


# ----- report ---------------------------------------------------------------------------------


def summarise(cells: list[Cell]) -> dict[str, dict[str, float]]:
    """Per model and K: time of each method divided by the structured time."""
    ratios: dict[str, dict[str, float]] = {}
    for cell in cells:
        if cell.method == "structured" or cell.seconds is None:
            continue
        base = next(
            (c for c in cells if (c.model, c.k, c.method) == (cell.model, cell.k, "structured")),
            None,
        )
        if base is not None and base.seconds:
            key = f"{cell.model}/K={cell.k}"
            ratios.setdefault(key, {})[f"{cell.method}/structured"] = cell.seconds / base.seconds
    return ratios


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 16, one repeat")
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cell-seconds", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--check-k", type=int, default=None, help="K of the float64 check")
    parser.add_argument("--memory-budget", type=int, default=1 << 30)
    parser.add_argument(
        "--max-bytes", type=int, default=4 << 30, help="skip ntk_vps and jacrev above"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--large-k", type=int, default=None, help="also time structured at this K")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.ks is None:
        args.ks = list(QUICK_KS if args.quick else FULL_KS)
    if args.check_k is None:
        args.check_k = 8 if args.quick else 64
    if args.quick:
        args.repeats = 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cells, exactness = measure(args) if args.ks else ([], {})
    large = measure_large(args) if args.large_k else None
    failures = [
        f"{model}/{method}: {error}"
        for model, errors in exactness.items()
        for method, error in errors.items()
        if method == "structured" and not (isinstance(error, float) and error < EXACT_TOLERANCE)
    ]
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "cells": [asdict(c) for c in cells],
        "ratios": summarise(cells),
        "exactness_float64": exactness,
        "large": large,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps({"ratios": result["ratios"], "exactness": exactness, "large": large}, indent=1)
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
