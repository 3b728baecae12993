"""Every ``ntcov`` command refuses unknown options, bad values and unwritable outputs with one
error line and exit status 2 — never a traceback, never a run that starts and then crashes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ntcov import cli, report

COMMANDS = {
    "demo": ["demo"],
    "validate": ["validate"],
    "linearity": ["experiment", "linearity"],
    "juice": ["experiment", "juice"],
    "bernoulli": ["experiment", "bernoulli"],
    "kernel": ["kernel"],
}
BAD_VALUES = [
    ("demo", ["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ("demo", ["--lr", "inf"], "argument --lr: expected a finite number > 0"),
    ("validate", ["--steps", "-3"], "argument --steps: expected an integer >= 1, got -3"),
    ("validate", ["--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
    ("validate", ["--seed", str(10**22)], "ValidateConfig: seed must be <= "),
    ("linearity", ["--seed", "-1"], "LinearityConfig: seed must be an integer >= 0, got -1"),
    ("linearity", ["--images", "1"], "LinearityConfig: images must be an integer >= 2, got 1"),
    ("linearity", ["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ("juice", ["--seed", "-1"], "JuiceConfig: need distractors >= 0, seed >= 0"),
    ("bernoulli", ["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ("bernoulli", ["--seed", "-2"], "BernoulliConfig: seed must be an integer >= 0, got -2"),
    ("kernel", ["--steps", "-3"], "argument --steps: expected an integer >= 0, got -3"),
    ("kernel", ["--train", "5000"], "--train 5000 exceeds the 1438 training images"),
    ("kernel", ["--train", "100", "--gram", "200"], "--gram 200 exceeds the 100 training images"),
    ("kernel", ["--held-out", "400"], "--held-out 400 exceeds the 359 held-out images"),
    ("kernel", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    # refused before the (long) training, not after it
    ("kernel", ["--train", "5000", "--steps", "100000"], "--train 5000 exceeds the 1438"),
]


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs ``ntcov argv``; checks exit status 2 and no traceback; returns the error line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ntcov") and ": error: " in last
    return last


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_options_are_refused(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails_cleanly([*COMMANDS[command], "--frobnicate", "3"], capsys)
    assert "unrecognized arguments: --frobnicate 3" in line


@pytest.mark.parametrize(
    ("command", "options", "message"), BAD_VALUES, ids=[f"{c}{o}" for c, o, _ in BAD_VALUES]
)
def test_bad_values_are_refused_before_anything_runs(
    command: str,
    options: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    line = _fails_cleanly([*COMMANDS[command], *options, "--out", str(out)], capsys)
    assert message in line
    assert not out.exists() or not any(out.iterdir())  # nothing was run


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("obstacle", ["file", "inside_a_file", "proc"])
def test_unwritable_output_folders_are_refused(
    command: str, obstacle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file.txt").write_text("in the way")
    out = {
        "file": tmp_path / "file.txt",
        "inside_a_file": tmp_path / "file.txt" / "out",
        "proc": Path("/proc/ntcov-cannot-be-here"),
    }[obstacle]
    quiet = [] if command == "kernel" else ["--no-progress"]  # kernel has no progress bar
    line = _fails_cleanly([*COMMANDS[command], "--out", str(out), *quiet], capsys)
    assert str(out) in line
    assert "exists and is not a folder" in line or "cannot create the output folder" in line


def test_an_output_file_that_cannot_be_written_mid_run_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder was fine at the start; writing results.json fails later (disk full)."""

    def disk_full(path: str | Path, data: str | bytes) -> Path:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "atomic_write", disk_full)
    argv = ["demo", "--steps", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ntcov: error: No space left on device: '{tmp_path}/results.json'"


def test_validate_with_a_folder_in_place_of_results_json_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "results.json").mkdir()
    argv = ["validate", "--quick", "--steps", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ntcov: error: Is a directory: '{tmp_path}/results.json'"


def test_errors_through_a_real_process_have_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a file")
    argv = ["experiment", "juice", "--seed", "-1", "--out", str(tmp_path / "f" / "x")]
    done = subprocess.run(
        [sys.executable, "-m", "ntcov.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "JuiceConfig: need distractors >= 0" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and done.stdout == ""
