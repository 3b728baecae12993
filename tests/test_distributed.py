"""Sharded computation over torch.distributed: two gloo processes equal one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ntcov
from ntcov import distributed as dd
from ntcov.cli import main
from ntcov.data import load_digits_split
from ntcov.experiments.models import digits_mlp
from ntcov.monitor import read_records

HERE = Path(__file__).parent


def _run_worker(out: Path, processes: int, *extra: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", str(HERE / "distributed_worker.py"), "--out", str(out),
        *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


def _launch(tmp_path: Path, processes: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"results_{processes}.pt"
    _run_worker(out, processes)
    return torch.load(out)


def test_monitor_under_ddp_uses_the_reduced_gradient_and_rank_0_writes(tmp_path: Path) -> None:
    _run_worker(tmp_path / "ddp", 2, "--ddp-monitor")
    sys.path.insert(0, str(HERE))
    try:
        from distributed_worker import train_monitored
    finally:
        sys.path.remove(str(HERE))
    train_monitored(str(tmp_path / "one"))  # one process, the whole batch
    assert not (tmp_path / "ddp" / "rank1").exists()
    sharded = read_records(tmp_path / "ddp" / "rank0")
    single = read_records(tmp_path / "one" / "rank0")
    assert [r["step"] for r in sharded] == [0, 1, 2, 3]
    for a, b in zip(sharded, single, strict=True):
        for key in ("predicted", "actual"):
            got = torch.tensor(a["properties"]["p"][key], dtype=torch.float64)
            want = torch.tensor(b["properties"]["p"][key], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(HERE))
    try:
        from distributed_worker import compute
    finally:
        sys.path.remove(str(HERE))
    return compute(101, 7)


def test_two_processes_equal_one(tmp_path: Path, single: dict[str, torch.Tensor]) -> None:
    sharded = _launch(tmp_path, 2)
    assert int(sharded["world_size"]) == 2
    for key in ("gradient", "rate", "examples", "gram", "attribute", "layers"):
        assert sharded[key].shape == single[key].shape, key
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-10, atol=1e-14, msg=key)


def test_single_process_results_match_ntcov(single: dict[str, torch.Tensor]) -> None:
    # with no process group the sharded functions are the plain ones
    assert int(single["world_size"]) == 1
    assert single["examples"].shape == (7, 101)
    assert single["gram"].shape == (101, 101)
    torch.testing.assert_close(single["gram"], single["gram"].T, rtol=1e-12, atol=1e-15)
    model = digits_mlp(hidden=16, depth=2, seed=0)
    split = load_digits_split()
    x, y = split.x_train[:101], split.y_train[:101]
    losses = ntcov.properties.per_example_loss(model, x, y)
    probs = ntcov.properties.probs(model, split.x_test[:7], split.y_test[:7])
    expected = {
        "rate": ntcov.rate(probs, losses.mean(), strategy="loop"),
        "examples": ntcov.ntcov(probs, losses, strategy="loop"),
        "gram": ntcov.ntcov(*[ntcov.properties.probs(model, x, y)] * 2, strategy="vjp"),
        "attribute": ntcov.attribute(probs, losses).values,
        "layers": ntcov.attribute(probs, losses, by="layer").values,
    }
    torch.testing.assert_close(single["attribute"].sum(-1), expected["rate"], rtol=1e-10, atol=0)
    for key, value in expected.items():
        torch.testing.assert_close(single[key], value, rtol=1e-10, atol=1e-14, msg=key)


@pytest.mark.parametrize("count", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_cover_the_range_in_order(count: int, size: int) -> None:
    parts = [dd.shard_slice(count, rank_=r, size=size) for r in range(size)]
    covered = [i for part in parts for i in range(count)[part]]
    assert covered == list(range(count))
    lengths = [part.stop - part.start for part in parts]
    assert max(lengths) - min(lengths) <= 1


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="rank"):
        dd.shard_slice(5, rank_=2, size=2)
    with pytest.raises(ValueError, match="first"):
        dd.shard(torch.zeros(3), torch.zeros(4))


def test_torchrun_module_kernel_equals_one_process(tmp_path: Path) -> None:
    options = ["--train", "60", "--gram", "16", "--held-out", "4", "--steps", "2"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ntcov", "kernel", "--out", str(tmp_path / "two"), *options,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stdout
    assert main(["kernel", "--out", str(tmp_path / "one"), *options]) == 0
    two, one = (torch.load(tmp_path / name / "kernel.pt") for name in ("two", "one"))
    assert one["influence"].shape == (4, 60) and one["gram"].shape == (16, 16)
    for key in ("influence", "gram"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-10, atol=1e-15, msg=key)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
