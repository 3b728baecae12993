"""The ``ntcov`` command line: commands, clean errors for bad arguments, version and help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ntcov
from ntcov import cli
from ntcov.experiments import demo


def test_demo_command_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["demo", "--steps", "3", "--out", str(out), "--seed", "2"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["steps"] == 3 and data["seed"] == 2 and data["status"] == "complete"
    assert (out / "summary.md").exists() and (out / "demo.png").exists()
    captured = capsys.readouterr()
    assert "min R²" in captured.out and "accuracy: train" in captured.out
    assert "ntcov demo" in captured.err  # the progress bar goes to stderr


def test_demo_command_maps_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(config: demo.DemoConfig, out: Path, *, progress: bool) -> demo.DemoResult:
        seen.update(config=config, out=out, progress=progress)
        return demo.DemoResult(config, "complete", {}, {}, [], {}, 0.0)

    monkeypatch.setattr(demo, "run_demo", fake_run)
    out = tmp_path / "d"
    argv = ["demo", "--out", str(out), "--steps", "7", "--lr", "0.05", "--seed", "3"]
    assert cli.main([*argv, "--dtype", "float32", "--no-progress"]) == 0
    assert seen["config"] == demo.DemoConfig(steps=7, lr=0.05, seed=3, dtype="float32")
    assert seen["out"] == out and out.is_dir() and seen["progress"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (["demo", "--steps", "ten"], "argument --steps: expected an integer >= 1, got 'ten'"),
        (["demo", "--lr", "-1"], "argument --lr: expected a finite number > 0"),
        (["demo", "--lr", "nan"], "argument --lr: expected a finite number > 0"),
        (["demo", "--seed", "-2"], "argument --seed: expected an integer >= 0"),
        (["demo", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_cleanly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: ntcov" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("make_out", "message"),
    [
        (lambda tmp: tmp / "file.txt", "exists and is not a folder"),
        (lambda tmp: tmp / "file.txt" / "sub", "cannot create the output folder"),
        (lambda tmp: Path("/proc/ntcov-cannot-be-here"), "cannot create the output folder"),
    ],
)
def test_unusable_output_folder_exits_cleanly(
    tmp_path: Path, make_out, message: str, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file.txt").write_text("not a folder")
    out = make_out(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--steps", "1", "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(out) in err and "Traceback" not in err


def test_seed_out_of_range_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--seed", "99999999999999999999", "--out", "unused", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seed must be <= 18446744073709551615" in err and "Traceback" not in err
    assert not Path("unused").exists()


def test_config_errors_become_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["demo"])
    args.lr = float("inf")  # what the argparse types already refuse, checked once more
    with pytest.raises(SystemExit) as exit_info:
        args.handler(args)
    assert exit_info.value.code == 2
    assert "DemoConfig: lr must be a finite number" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ntcov {ntcov.__version__}"


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ntcov") and "demo" in out


@pytest.mark.parametrize(
    "command",
    [["demo"], ["validate"], ["attribute"], ["kernel"]]
    + [["experiment", name] for name in cli.EXPERIMENTS],
    ids=lambda c: " ".join(c),
)
def test_help_is_plain_text_with_defaults(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ":class:" not in out
    for line in out.splitlines():  # every option with a value states its default
        if line.startswith("  --") and line.split()[0] in {"--steps", "--seed", "--held-out"}:
            assert "default" in out[out.index(line) :].split("\n  --")[0], line


def test_interrupted_demo_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(setup: demo.Setup, lr: float) -> demo.StepRecord:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "measure_step", interrupt)
    argv = ["demo", "--steps", "3", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"


def test_module_runs_as_a_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ntcov.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"ntcov {ntcov.__version__}"


def test_kernel_with_fewer_than_three_training_images(tmp_path: Path) -> None:
    out = tmp_path / "k"
    argv = ["kernel", "--out", str(out), "--train", "2", "--gram", "2", "--held-out", "2"]
    assert cli.main([*argv, "--steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shapes"] == {"influence": [2, 2], "gram": [2, 2]}
    assert [len(row) for row in summary["most_helpful_training_images"]] == [2, 2]


@pytest.mark.parametrize(
    ("module", "argv", "wanted"),
    [
        ("attribute", ["attribute", "--quick", "--steps", "3", "--top-k", "2"], (3, 2, 300)),
        ("minilm", ["experiment", "minilm", "--quick", "--steps", "2", "--layers", "2"], (2, 2, 8)),
    ],
)
def test_explicit_options_win_over_quick(
    module: str,
    argv: list[str],
    wanted: tuple[int, int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last number shows --quick still applies (its smaller training set)."""
    import importlib

    experiment = importlib.import_module(f"ntcov.experiments.{module}")
    seen: list[Any] = []

    def fake_run(config: Any, out: Any, *, progress: bool) -> dict[str, Any]:
        seen.append(config)
        raise KeyboardInterrupt  # stop here: only the configuration is under test

    monkeypatch.setattr(experiment, "run", fake_run)
    cli.main([*argv, "--out", str(tmp_path / "out")])
    config = seen[0]
    if module == "attribute":
        assert (config.steps, config.top_k, config.train_examples) == wanted
    else:
        assert (config.steps, config.trainable_layers, config.train_pairs) == wanted
