"""Linearity and chain rules of ntcov, checked on networks trained on the digits.

ntcov(a, b) = J_a J_bᵀ is built from Jacobians, so it inherits their algebra. On an MLP (and
optionally a CNN) trained for a few full-batch SGD steps, with ntcov's public API, this checks:

- bilinearity: ``ntcov(F a, G b) = F ntcov(a, b) Gᵀ`` for constant matrices ``F``, ``G``
  (``ntcov(a, b)`` by the ``auto``, ``per_example`` and ``vjp`` strategies);
- sums: ``ntcov(a + c, b) = ntcov(a, b) + ntcov(c, b)``;
- product rule: ``ntcov(a ⊙ b, c) = a ⊙ ntcov(b, c) + b ⊙ ntcov(a, c)``;
- sigmoid chain rule: ``ntvar(σ(z)) = σ(z)²(1 − σ(z))² ntvar(z)`` (``z`` the one-vs-rest
  log-odds of class ``k``);
- softmax chain rule: ``∇p_k = p_k(∇z_k − Σ_j p_j ∇z_j)``, so
  ``ntcov(p_k, c) = p_k(ntcov(z_k, c) − Σ_j p_j ntcov(z_j, c))`` and
  ``ntvar(p_k) = p_k² (K_kk − 2 Σ_j p_j K_kj + Σ_jl p_j p_l K_jl)`` with ``K = ntcov(z, z)``.

Each identity is scored by ``max |lhs − rhs| / max |rhs|``; in float64 it must be ≤ 1e-10.
Two negative controls show that the check can fail: the wrong sigmoid rule
``ntvar(σ(z)) = σ(1 − σ) ntvar(z)`` and the softmax rule without its ``Σ_j p_j ∇z_j`` term.
Writes ``results.json``, ``verdict.md`` and ``linearity.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ntcov import properties, report
from ntcov.covariance import ntcov, ntvar
from ntcov.data import Split, load_digits_split
from ntcov.experiments.common import output_folder, torch_threads
from ntcov.experiments.models import digits_cnn, digits_mlp
from ntcov.property import Property

__all__ = [
    "HELP",
    "THRESHOLD",
    "Check",
    "LinearityConfig",
    "add_arguments",
    "discrepancy",
    "run",
    "run_from_args",
]

HELP = "check ntcov's bilinearity, sum, product and chain rules on trained digits networks"
THRESHOLD = 1e-10  # float64 pass threshold of max |lhs − rhs| / max |rhs|
MODELS = ("mlp", "cnn")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
BILINEAR_STRATEGIES = ("auto", "per_example", "vjp")
SCATTER_POINTS = 400  # points per identity kept for the figure


@dataclass(frozen=True)
class LinearityConfig:
    """Settings (validated on construction).

    ``train_steps`` full-batch SGD steps at ``lr`` in float64 move the network away from its
    initialisation; ``images`` held-out images are used by the chain-rule checks (the ntvar of
    the softmax needs the ``[images·10]²`` matrix ``ntcov(z, z)``). ``models`` is a subset of
    ``("mlp", "cnn")``; ``float32`` also runs every check in float32 (for information only).
    """

    seed: int = 0
    train_steps: int = 100
    lr: float = 0.2
    images: int = 120
    models: tuple[str, ...] = ("mlp", "cnn")
    float32: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        for name, minimum in (("seed", 0), ("train_steps", 0), ("images", 2), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"LinearityConfig: {name} must be an integer >= {minimum}, got {value!r}."
                )
        if self.images > 359:
            raise ValueError(f"LinearityConfig: images must be <= 359, got {self.images}.")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0 or lr == math.inf:
            raise ValueError(f"LinearityConfig: lr must be a finite number > 0, got {lr!r}.")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(
                f"LinearityConfig: models must be a non-empty subset of {MODELS}, got "
                f"{self.models!r}."
            )

    @classmethod
    def quick(cls, seed: int = 0) -> LinearityConfig:
        """A small configuration for tests: the MLP only, 40 images, 30 training steps."""
        return cls(seed=seed, train_steps=30, images=40, models=("mlp",), float32=False)


@dataclass(frozen=True)
class Check:
    """One identity on one model: both sides (flattened) and how far apart they are."""

    model: str
    dtype: str
    identity: str
    strategy: str
    control: bool  # a negative control: expected to FAIL
    lhs: np.ndarray
    rhs: np.ndarray

    @property
    def discrepancy(self) -> float:
        return discrepancy(self.lhs, self.rhs)

    def row(self) -> dict[str, Any]:
        threshold = THRESHOLD if self.dtype == "float64" else None
        passed = None if threshold is None else bool(self.discrepancy <= threshold)
        return {
            "model": self.model,
            "dtype": self.dtype,
            "identity": self.identity,
            "strategy": self.strategy,
            "negative_control": self.control,
            "max_rel_discrepancy": self.discrepancy,
            "threshold": threshold,
            "passed": passed,
            "entries": int(self.lhs.size),
        }


def discrepancy(lhs: Tensor | np.ndarray, rhs: Tensor | np.ndarray) -> float:
    """``max |lhs − rhs| / max |rhs|`` over all entries (``inf`` if ``rhs`` is all zero)."""
    left, right = (_numpy(v) for v in (lhs, rhs))
    if left.shape != right.shape:
        raise ValueError(f"discrepancy: shapes differ, {left.shape} and {right.shape}.")
    scale = float(np.max(np.abs(right)))
    residual = float(np.max(np.abs(left - right)))
    return residual / scale if scale > 0 else (0.0 if residual == 0 else math.inf)


def _numpy(value: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(value, dtype=np.float64).reshape(-1)


# ----- the trained networks ------------------------------------------------------------------


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> float:
    """``steps`` full-batch SGD steps on the mean cross-entropy (in place); the final loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def trained_model(name: str, config: LinearityConfig) -> tuple[nn.Module, Split, float]:
    """The float64 ``name`` network trained on its digits split, the split, the final loss."""
    split = load_digits_split(seed=config.seed, images=name == "cnn")
    make = digits_mlp if name == "mlp" else digits_cnn
    model = make(seed=config.seed)
    loss = train(model, split.x_train, split.y_train, config.train_steps, config.lr)
    return model, split, loss


def as_dtype(model: nn.Module, split: Split, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    """A copy of ``model`` and the held-out inputs in ``dtype``."""
    return copy.deepcopy(model).to(dtype), split.x_test.to(dtype)


# ----- the identities ------------------------------------------------------------------------

Sides = tuple[Tensor, Tensor]


def bilinearity(model: nn.Module, x: Tensor, gen: torch.Generator, strategy: str) -> Sides:
    """``ntcov(F a, G b)`` vs ``F ntcov(a, b) Gᵀ``: ``a`` = logits of 8 images ``[8, 10]``
    (flattened to ``[80]`` on the left), ``b`` = logits of 6 others, ``F`` ``[5, 80]``, ``G``
    ``[7, 60]``. The right side's ntcov uses ``strategy``."""
    a, b = properties.logits(model, x[:8]), properties.logits(model, x[8:14])
    f = torch.randn(5, 80, generator=gen, dtype=torch.float64).to(x.dtype)
    g = torch.randn(7, 60, generator=gen, dtype=torch.float64).to(x.dtype)
    lhs = ntcov(f @ a.reshape(80), g @ b.reshape(60))
    rhs = f @ ntcov(a, b, strategy=strategy).reshape(80, 60) @ g.T
    return lhs, rhs


def sums(model: nn.Module, x: Tensor) -> Sides:
    """``ntcov(a + c, b)`` vs ``ntcov(a, b) + ntcov(c, b)``: logits and log-softmax of 8 images,
    ``b`` the logits of 6 others."""
    a = properties.logits(model, x[:8])
    c = a.map_rows(lambda v: torch.log_softmax(v, dim=-1))
    b = properties.logits(model, x[8:14])
    return ntcov(a + c, b), ntcov(a, b) + ntcov(c, b)


def product(model: nn.Module, x: Tensor) -> Sides:
    """``ntcov(a ⊙ b, c)`` vs ``a ⊙ ntcov(b, c) + b ⊙ ntcov(a, c)``: ``a`` the logits of 8 images,
    ``b`` the softmax of 8 others (``[8, 10]``), ``c`` the logits of 6 more."""
    a = properties.logits(model, x[:8])
    b = properties.logits(model, x[8:16]).map_rows(lambda v: torch.softmax(v, dim=-1))
    c = properties.logits(model, x[16:22])
    va, vb = (p.value()[..., None, None] for p in (a, b))
    return ntcov(a * b, c), va * ntcov(b, c) + vb * ntcov(a, c)


def one_vs_rest(model: nn.Module, x: Tensor, k: int) -> Property:
    """``z_i = logit_k − log Σ_{j≠k} exp(logit_j)`` of each image, ``[N]``; ``σ(z) = p_k``."""

    def log_odds(v: Tensor) -> Tensor:
        rest = torch.cat([v[:, :k], v[:, k + 1 :]], dim=1)
        return v[:, k] - torch.logsumexp(rest, dim=1)

    return properties.logits(model, x).map_rows(log_odds, name=f"log_odds_{k}")


def sigmoid_chain(model: nn.Module, x: Tensor, k: int) -> tuple[Sides, Tensor]:
    """``ntvar(σ(z))`` vs ``σ²(1 − σ)² ntvar(z)``, and the wrong guess ``σ(1 − σ) ntvar(z)``."""
    z = one_vs_rest(model, x, k)
    s = torch.sigmoid(z.value())
    var_z = ntvar(z)
    lhs = ntvar(z.map_rows(torch.sigmoid))
    return (lhs, s**2 * (1 - s) ** 2 * var_z), s * (1 - s) * var_z


def softmax_cov(model: nn.Module, x: Tensor, c: Property) -> tuple[Sides, Tensor]:
    """``ntcov(p, c)`` vs ``p_k(ntcov(z_k, c) − Σ_j p_j ntcov(z_j, c))`` (``[N, 10, *c]``), and
    the control without the ``Σ_j`` term."""
    z = properties.logits(model, x)
    p = z.map_rows(lambda v: torch.softmax(v, dim=-1))
    pv = p.value()
    cov_z = ntcov(z, c).reshape(*pv.shape, -1)  # [N, 10, C]
    mean = torch.einsum("nj,njc->nc", pv, cov_z)[:, None, :]
    rhs = pv[..., None] * (cov_z - mean)
    lhs = ntcov(p, c).reshape(rhs.shape)
    return (lhs, rhs), pv[..., None] * cov_z


def softmax_var(model: nn.Module, x: Tensor) -> Sides:
    """``ntvar(p)`` vs ``p_k² (K_kk − 2 Σ_j p_j K_kj + Σ_jl p_j p_l K_jl)`` with ``K`` the
    ``[10, 10]`` block of ``ntcov(z, z)`` of each image, ``[N, 10]``."""
    z = properties.logits(model, x)
    p = z.map_rows(lambda v: torch.softmax(v, dim=-1))
    pv = p.value()
    blocks = torch.einsum("nanb->nab", ntcov(z, z))  # [N, 10, 10]
    diag = torch.diagonal(blocks, dim1=1, dim2=2)
    cross = torch.einsum("nj,nkj->nk", pv, blocks)
    total = torch.einsum("nj,njl,nl->n", pv, blocks, pv)[:, None]
    return ntvar(p), pv**2 * (diag - 2 * cross + total)


# ----- the run -------------------------------------------------------------------------------

Task = tuple[str, str, bool, Callable[[], Sides]]


def checks_for(model: nn.Module, split: Split, config: LinearityConfig) -> list[Task]:
    """The checks of one model (in the model's dtype) as ``(identity, strategy, control, run)``."""
    x = split.x_test.to(next(model.parameters()).dtype)
    many = x[: config.images]
    k = 3  # class of the one-vs-rest log-odds
    test_prop = properties.per_example_loss(model, x[-5:], split.y_test[-5:])
    gen = torch.Generator().manual_seed(config.seed)
    memo: dict[str, tuple[Sides, Tensor]] = {}

    def cached(key: str, compute: Callable[[], tuple[Sides, Tensor]]) -> tuple[Sides, Tensor]:
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def sigmoid() -> tuple[Sides, Tensor]:
        return cached("sigmoid", lambda: sigmoid_chain(model, many, k))

    def softmax() -> tuple[Sides, Tensor]:
        return cached("softmax", lambda: softmax_cov(model, many, test_prop))

    tasks: list[Task] = [
        (
            "bilinearity: ntcov(Fa, Gb) = F ntcov(a,b) Gᵀ",
            s,
            False,
            functools.partial(bilinearity, model, x, gen, s),
        )
        for s in BILINEAR_STRATEGIES
    ]
    tasks.extend(
        [
            (
                "sums: ntcov(a+c, b) = ntcov(a,b) + ntcov(c,b)",
                "auto",
                False,
                lambda: sums(model, x),
            ),
            (
                "product: ntcov(a⊙b, c) = a⊙ntcov(b,c) + b⊙ntcov(a,c)",
                "auto",
                False,
                lambda: product(model, x),
            ),
            ("sigmoid: ntvar(σ(z)) = σ²(1−σ)² ntvar(z)", "auto", False, lambda: sigmoid()[0]),
            (
                "softmax: ntcov(p_k, c) = p_k(ntcov(z_k,c) − Σ p_j ntcov(z_j,c))",
                "auto",
                False,
                lambda: softmax()[0],
            ),
            (
                "softmax: ntvar(p_k) = p_k²‖∇z_k − Σ p_j ∇z_j‖²",
                "auto",
                False,
                lambda: softmax_var(model, many),
            ),
            (
                "control (wrong): ntvar(σ(z)) = σ(1−σ) ntvar(z)",
                "auto",
                True,
                lambda: (sigmoid()[0][0], sigmoid()[1]),
            ),
            (
                "control (wrong): ntcov(p_k, c) = p_k ntcov(z_k, c)",
                "auto",
                True,
                lambda: (softmax()[0][0], softmax()[1]),
            ),
        ]
    )
    return tasks


def _flat_check(model: str, dtype: str, task: Task) -> Check:
    identity, strategy, control, compute = task
    lhs, rhs = compute()
    return Check(model, dtype, identity, strategy, control, _numpy(lhs), _numpy(rhs))


def run_checks(
    config: LinearityConfig, *, progress: bool = True
) -> tuple[list[Check], dict[str, Any], str]:
    """Every check on every model and dtype; the checks, training info and the run's status."""
    dtypes = ["float64", "float32"] if config.float32 else ["float64"]
    checks: list[Check] = []
    trained: dict[str, Any] = {}
    bar = tqdm(
        total=len(config.models) * len(dtypes) * 10,
        desc="ntcov linearity",
        unit="check",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for name in config.models:
            model64, split, loss = trained_model(name, config)
            trained[name] = {"final_train_loss": loss, "num_params": _num_params(model64)}
            for dtype in dtypes:
                model, _ = as_dtype(model64, split, DTYPES[dtype])
                for task in checks_for(model, split, config):
                    checks.append(_flat_check(name, dtype, task))
                    bar.update()
    except KeyboardInterrupt:
        return checks, trained, "interrupted"
    finally:
        bar.close()
    return checks, trained, "complete"


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarise(checks: list[Check]) -> dict[str, Any]:
    """Worst float64 discrepancy of the identities and of the controls; overall verdict."""
    f64 = [c for c in checks if c.dtype == "float64"]
    identities = [c.discrepancy for c in f64 if not c.control]
    controls = [c.discrepancy for c in f64 if c.control]
    return {
        "max_identity_discrepancy_float64": max(identities, default=math.nan),
        "min_control_discrepancy_float64": min(controls, default=math.nan),
        "all_identities_pass": bool(identities) and max(identities) <= THRESHOLD,
        "all_controls_fail": bool(controls) and min(controls) > THRESHOLD,
    }


def run(
    config: LinearityConfig | None = None,
    out: str | Path = "ntcov-linearity",
    *,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run every check; write ``results.json``, ``verdict.md`` and ``linearity.png`` to ``out``.

    Returns the results payload (``payload["checks"]`` holds one row per check).
    """
    config = config if config is not None else LinearityConfig()
    folder = output_folder(out)
    started = time.perf_counter()
    with torch_threads(config.threads):
        checks, trained, status = run_checks(config, progress=progress)
    payload = {
        "status": status,
        "wall_time_s": time.perf_counter() - started,
        "threshold": THRESHOLD,
        "trained": trained,
        "summary": summarise(checks),
        "checks": [c.row() for c in checks],
    }
    report.write_json(folder / "results.json", payload, config=config, seed=config.seed)
    files = ["results.json"]
    if checks and report.plot_available():
        plot(folder / "linearity.png", checks)
        files.append("linearity.png")
    else:
        (folder / "linearity.png").unlink(missing_ok=True)
    (folder / "verdict.md").write_text(verdict_markdown(config, payload), encoding="utf-8")
    files.append("verdict.md")
    payload["files"] = {name: folder / name for name in files}
    if echo is not None:
        echo(verdict_text(payload) + f"\nwrote {', '.join(files)} to {folder}/")
    return payload


# ----- reporting -----------------------------------------------------------------------------

HEADERS = ["model", "dtype", "identity", "strategy", "max rel. discrepancy", "threshold", "result"]


def table_rows(payload: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in payload["checks"]:
        if r["negative_control"]:
            result = "FAIL (expected)" if r["passed"] is False else "info"
            result = "PASS (!)" if r["passed"] else result
        else:
            result = {True: "PASS", False: "FAIL", None: "info"}[r["passed"]]
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.0e}"
        value = r["max_rel_discrepancy"]
        shown = "inf" if value is None else f"{value:.2e}"
        rows.append(
            [r["model"], r["dtype"], r["identity"], r["strategy"], shown, threshold, result]
        )
    return rows


def verdict_text(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    ok = s["all_identities_pass"] and s["all_controls_fail"]
    head = "PASS" if ok else "FAIL"
    return (
        f"{head}: worst float64 discrepancy of the identities "
        f"{s['max_identity_discrepancy_float64']:.2e} (threshold {THRESHOLD:.0e}); the wrong "
        f"rules (negative controls) are off by at least {s['min_control_discrepancy_float64']:.2e}."
    )


def verdict_markdown(config: LinearityConfig, payload: dict[str, Any]) -> str:
    trained = ", ".join(
        f"{name} ({t['num_params']} weights, train loss {t['final_train_loss']:.3f})"
        for name, t in payload["trained"].items()
    )
    status = "" if payload["status"] == "complete" else f" ({payload['status'].upper()})"
    lines = [
        f"# ntcov linearity and chain rules{status}",
        "",
        f"Networks trained on the digits by {config.train_steps} full-batch SGD steps "
        f"(lr {config.lr:g}, float64, seed {config.seed}): {trained}. Each identity is scored "
        "by max |lhs − rhs| / max |rhs|; float64 must be ≤ 1e-10; float32 rows are for "
        "information. Negative controls are wrong rules that must FAIL. Chain-rule checks use "
        f"{config.images} held-out images; `c` is the per-example loss of 5 other images.",
        "",
        report.format_markdown_table(HEADERS, table_rows(payload)),
        "",
        f"**{verdict_text(payload)}**",
        "",
        "Files: `results.json` (all numbers), `linearity.png` (lhs vs rhs; discrepancies).",
    ]
    return "\n".join(lines) + "\n"


def plot(path: Path, checks: list[Check]) -> Path:
    """A scatter of lhs against rhs per float64 identity of the first model, and a log-scale bar
    chart of every discrepancy against the 1e-10 line."""
    first = [c for c in checks if c.dtype == "float64" and c.model == checks[0].model]
    shown = [c for c in first if not c.control and c.strategy in ("auto",)]
    fig, axes = report.new_figure(2, 4, size=(20.0, 9.5))
    for ax, check in zip(axes.flat, shown, strict=False):
        _scatter(ax, check, [c for c in first if c.control and np.array_equal(c.lhs, check.lhs)])
    _bars(axes.flat[-1], checks)
    for ax in list(axes.flat)[len(shown) : -1]:
        ax.set_visible(False)
    fig.suptitle(f"ntcov identities on a trained digits {checks[0].model}: lhs vs rhs (float64)")
    return report.save_figure(fig, path)


def _scatter(ax: Any, check: Check, controls: list[Check]) -> None:
    pick = np.random.default_rng(0).permutation(check.lhs.size)[:SCATTER_POINTS]
    ax.scatter(check.rhs[pick], check.lhs[pick], s=6, label="rhs (the rule)", rasterized=True)
    for control in controls:
        ax.scatter(
            control.rhs[pick],
            control.lhs[pick],
            s=6,
            marker="x",
            color="C3",
            label="wrong rule (control)",
            rasterized=True,
        )
    report.add_identity_line(ax)
    ax.set_title(f"{check.identity}\nmax rel. discrepancy {check.discrepancy:.1e}", fontsize=8)
    ax.set_xlabel("rhs")
    ax.set_ylabel("lhs")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _bars(ax: Any, checks: list[Check]) -> None:
    values = [max(c.discrepancy, 1e-18) for c in checks]
    colors = ["C3" if c.control else ("C0" if c.dtype == "float64" else "C1") for c in checks]
    ax.barh(np.arange(len(checks)), values, color=colors)
    ax.set_xscale("log")
    ax.axvline(THRESHOLD, color="black", linestyle=":", label="threshold 1e-10")
    labels = [f"{c.model} {c.dtype[-2:]} {c.identity.split(':')[0]} {c.strategy}" for c in checks]
    ax.set_yticks(np.arange(len(checks)), labels, fontsize=5)
    ax.invert_yaxis()
    ax.set_title("max rel. discrepancy (blue f64, orange f32, red wrong rules)", fontsize=8)
    ax.legend(fontsize=7)


# ----- command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ntcov experiment linearity``."""
    parser.add_argument("--out", default="ntcov-linearity", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="data, model and matrix seed")
    parser.add_argument("--quick", action="store_true", help="MLP only, fewer images and steps")
    parser.add_argument(
        "--steps", type=int, default=None, help="SGD training steps (default: per mode)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="images for the chain rules (default: per mode)"
    )
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 checks")


def run_from_args(args: argparse.Namespace) -> int:
    """``ntcov experiment linearity``: 0 when every identity passes and every control fails."""
    try:
        config = LinearityConfig.quick(args.seed) if args.quick else LinearityConfig(seed=args.seed)
        changes: dict[str, Any] = {}
        if args.steps is not None:
            changes["train_steps"] = args.steps
        if args.images is not None:
            changes["images"] = args.images
        if args.no_float32:
            changes["float32"] = False
        config = dataclasses.replace(config, **changes)
        out = output_folder(args.out)
    except ValueError as err:
        args.parser.error(str(err))
    payload = run(config, out, progress=not getattr(args, "no_progress", False))
    if payload["status"] != "complete":
        return 130
    summary = payload["summary"]
    return 0 if summary["all_identities_pass"] and summary["all_controls_fail"] else 1
