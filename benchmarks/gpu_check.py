"""One short check for a machine with a GPU (runs on CPU too, skipping the GPU-only parts).

1. Exactness (a subset with ``--quick`` or on the CPU): every model of the test zoo
   (``tests/zoo.py``) is moved to the device; for each strategy, ``ntcov(logits, logits)`` on
   the device in float64 is compared with the brute-force loop on the CPU in float64
   (max |a − b| / max |b| ≤ 1e-9), the float32 result with 1e-4, and the bfloat16 model (row
   strategies accumulate in float32) with 5e-2. Results must come back on the model's
   device (nothing moves to the CPU silently).
2. Speed, on a ResNet-style CNN (larger on a GPU), timed with device synchronisation:
   - W1 — K properties vs one objective: ``ntcov.rate`` vs a loop of K backward passes;
   - W2 — one property vs N per-example losses: ``ntcov.ntcov(x, ℓ)`` (one gradient, one JVP)
     vs per-sample gradients with ``torch.func.vmap(grad)`` dotted with ``∇x``;
   - W3 — the K×K matrix: ``ntcov.ntcov(p, p)`` (strategy ``auto``) vs ``vmap(grad)``
     per-example gradients and a matrix product.
   Each prints the ratio baseline / ntcov measured in this run.

    python benchmarks/gpu_check.py                   # cuda when available, else cpu
    python benchmarks/gpu_check.py --quick           # tiny sizes (the CI smoke run)
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu_check.json

Exits 1 if any exactness check fails. Budget: under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import ntcov
from ntcov.reference import ntcov_loop

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--models", help="comma-separated zoo models (default: all)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    quick = args.quick or device.type == "cpu"
    exact = check_exactness(device, quick=quick, models=args.models)
    speed = measure_speed(device, quick=quick)
    report = {"device": str(device), "name": device_name(device), "exactness": exact}
    report["speed"] = speed
    report["ok"] = all(row["ok"] for row in exact)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0 if report["ok"] else 1


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ----- 1. exactness ----------------------------------------------------------------------------


def load_zoo() -> dict[str, Callable]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from zoo import ZOO
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return ZOO


def check_exactness(device: torch.device, *, quick: bool, models: str | None = None) -> list[dict]:
    """Every zoo model × dtype × strategy against the float64 CPU loop.

    ``quick`` (and any CPU run, where the test suite already checks float64 exactly): float32
    and bfloat16 only, strategies ``auto`` and ``vjp``.
    """
    rows = []
    strategies = [s for s in ntcov.Strategy if s is not ntcov.Strategy.LOOP]
    dtypes = [torch.float64, torch.float32, torch.bfloat16]
    if quick:
        strategies, dtypes = [ntcov.Strategy.AUTO, ntcov.Strategy.VJP], dtypes[1:]
    zoo = load_zoo()
    names = models.split(",") if models else list(zoo)
    unknown = sorted(set(names) - set(zoo))
    if unknown:
        raise SystemExit(f"gpu_check: unknown zoo models {unknown}; choose from {sorted(zoo)}")
    for name in names:
        case = zoo[name]()
        reference = ntcov_loop(*[logits(case.model, case.x)] * 2)
        for dtype in dtypes:
            model = _copy(case.model, device, dtype)
            x = case.x.to(device, dtype if case.x.is_floating_point() else case.x.dtype)
            for strategy in strategies:
                rows.append(_compare(name, model, x, dtype, strategy, reference))
    return rows


def logits(model: nn.Module, x: Tensor) -> ntcov.Property:
    return ntcov.Property.from_per_example(model, lambda m, xs: m(xs), x, name="logits")


def _copy(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _compare(
    name: str,
    model: nn.Module,
    x: Tensor,
    dtype: torch.dtype,
    strategy: ntcov.Strategy,
    reference: Tensor,
) -> dict:
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "strategy": strategy.value}
    try:
        result = ntcov.ntcov(*[logits(model, x)] * 2, strategy=strategy)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        # low precision is not supported by every op on every device: report, do not fail
        row.update(ok=dtype != torch.float64, error=f"{type(err).__name__}: {str(err)[:120]}")
        return row
    error = float((result.double().cpu() - reference).abs().max() / reference.abs().max())
    on_device = result.device.type == x.device.type
    row.update(rel_error=error, on_device=on_device, ok=error <= TOLERANCE[dtype] and on_device)
    return row


# ----- 2. speed -------------------------------------------------------------------------------


class Block(nn.Module):
    """A residual block: conv → GroupNorm → ReLU → conv → GroupNorm, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(4, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def resnet(channels: int, blocks: int, classes: int = 10) -> nn.Module:
    """A ResNet-style CNN for ``[N, 3, H, W]`` images (GroupNorm: no batch statistics)."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        *[Block(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    ).eval()


def measure_speed(device: torch.device, *, quick: bool) -> dict:
    channels, blocks, side, k, n = (8, 1, 8, 16, 32) if quick else (64, 4, 32, 256, 1024)
    model = resnet(channels, blocks).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, side, side, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    held = x[:k]
    probs = ntcov.properties.probs(model, held, y[:k])
    losses = ntcov.properties.per_example_loss(model, x, y)
    params = {name: p.detach() for name, p in model.named_parameters()}
    result = {"sizes": {"channels": channels, "blocks": blocks, "side": side, "K": k, "N": n}}
    result["W1"] = _ratio(
        device,
        lambda: ntcov.rate(probs, losses.mean()),
        lambda: _loop_rate(model, params, held, y[:k], x, y),
    )
    one = probs[0]
    result["W2"] = _ratio(
        device,
        lambda: ntcov.ntcov(one, losses),
        lambda: _per_sample_dot(model, params, held[:1], y[:1], x, y),
    )
    result["W3"] = _ratio(
        device,
        lambda: ntcov.ntcov(probs, probs),
        lambda: _per_sample_gram(model, params, held, y[:k]),
    )
    return result


def _ratio(device: torch.device, fast: Callable, baseline: Callable) -> dict:
    fast_value, fast_time = _timed(device, fast)
    base_value, base_time = _timed(device, baseline)
    diff = float((fast_value.double() - base_value.double()).abs().max())
    scale = float(base_value.double().abs().max())
    return {
        "ntcov_s": fast_time,
        "baseline_s": base_time,
        "ratio": base_time / fast_time,
        "rel_diff": diff / scale if scale else diff,
    }


def _timed(device: torch.device, fn: Callable[[], Tensor], repeats: int = 3) -> tuple:
    value = fn()  # warm-up
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        value = fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return value.detach(), statistics.median(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _example_prob(model: nn.Module, params: dict, x: Tensor, y: Tensor) -> Tensor:
    probs = torch.softmax(functional_call(model, params, (x[None],)), -1)[0]
    return probs.gather(0, y[None])[0]


def _example_loss(model: nn.Module, params: dict, x: Tensor, y: Tensor) -> Tensor:
    out = functional_call(model, params, (x[None],))
    return nn.functional.cross_entropy(out, y[None])


def _per_example_grads(
    fn: Callable, model: nn.Module, params: dict, x: Tensor, y: Tensor
) -> Tensor:
    rows = vmap(grad(lambda p, xi, yi: fn(model, p, xi, yi)), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([r.reshape(x.shape[0], -1) for r in rows.values()], dim=1)


def _loop_rate(
    model: nn.Module, params: dict, held: Tensor, y_held: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    names = list(params)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    loss = nn.functional.cross_entropy(functional_call(model, leaves, (x,)), y)
    g = torch.autograd.grad(loss, [leaves[n] for n in names])
    out = torch.softmax(functional_call(model, leaves, (held,)), -1)
    out = out.gather(1, y_held[:, None])[:, 0]
    rates = []
    for i in range(out.shape[0]):
        gi = torch.autograd.grad(out[i], [leaves[n] for n in names], retain_graph=True)
        rates.append(-sum((a * b).sum() for a, b in zip(gi, g, strict=True)))
    return torch.stack(rates)


def _per_sample_dot(
    model: nn.Module, params: dict, held: Tensor, y_held: Tensor, x: Tensor, y: Tensor
) -> Tensor:
    gx = _per_example_grads(_example_prob, model, params, held, y_held)  # [1, P]
    gl = _per_example_grads(_example_loss, model, params, x, y)  # [N, P]
    return gx @ gl.T


def _per_sample_gram(model: nn.Module, params: dict, held: Tensor, y_held: Tensor) -> Tensor:
    gp = _per_example_grads(_example_prob, model, params, held, y_held)
    return gp @ gp.T


def print_report(report: dict) -> None:
    failed = [r for r in report["exactness"] if not r["ok"]]
    count = len(report["exactness"])
    print(f"device: {report['device']} ({report['name']})")
    print(f"exactness: {count - len(failed)}/{count} checks pass")
    for row in failed:
        print(f"  FAIL {row}")
    worst = {}
    for row in report["exactness"]:
        if "rel_error" in row:
            worst[row["dtype"]] = max(worst.get(row["dtype"], 0.0), row["rel_error"])
    for dtype, error in worst.items():
        print(f"  worst relative error in {dtype}: {error:.1e}")
    sizes = report["speed"]["sizes"]
    print(f"speed on a ResNet-style CNN {sizes}:")
    for name in ("W1", "W2", "W3"):
        row = report["speed"][name]
        print(
            f"  {name}: ntcov {row['ntcov_s']:.4f} s, baseline {row['baseline_s']:.4f} s, "
            f"ratio {row['ratio']:.1f}x, rel diff {row['rel_diff']:.1e}"
        )


if __name__ == "__main__":
    sys.exit(main())
