"""The ``ntcov`` command line: one ``add_<command>`` and one ``run_<command>`` function each.

``ntcov demo [--out DIR] [--steps N] [--lr LR] [--seed S] [--dtype float32|float64]`` trains an
MLP on the digits and checks Price's equation at every step; ``ntcov --version``; ``ntcov`` alone
prints the help. To add a command, write ``add_<name>(subparsers)`` that builds its parser and
sets ``handler=run_<name>``, and list it in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence

from ntcov import __version__

__all__ = ["build_parser", "main"]

EXIT_INTERRUPTED = 130  # the shell's convention for a run stopped by Ctrl-C


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


class DefaultsFormatter(argparse.HelpFormatter):
    """States each option's default unless its help already does (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class DocstringFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`DefaultsFormatter` keeping a module docstring's own line breaks."""


def plain_text(doc: str | None) -> str:
    """A module docstring as ``--help`` text: reST literals and roles become plain words."""
    text = re.sub(r":(?:func|class|meth|attr|mod|data):`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


# ----- ntcov demo ----------------------------------------------------------------------------


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    from ntcov.experiments.demo import DTYPES, DemoConfig

    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        formatter_class=DefaultsFormatter,
        help="train an MLP on digits and check Price's equation at every step",
        description=(
            "Train an MLP on scikit-learn's 8×8 digits by full-batch SGD. Before each step, "
            "predict the change of every held-out image's correct-class probability and of the "
            "held-out loss with Price's equation (Δx = lr·ntcov(x, −L)); after it, measure the "
            "actual change. Prints a summary table and writes results.json, summary.md and "
            "demo.png."
        ),
    )
    parser.add_argument("--out", default="ntcov-demo", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="SGD steps (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=defaults.lr,
        help="learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=defaults.seed, help="seed (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=defaults.dtype, help="(default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_demo, parser=parser)


def run_demo(args: argparse.Namespace) -> int:
    from ntcov.experiments import demo

    try:
        config = demo.DemoConfig(steps=args.steps, lr=args.lr, seed=args.seed, dtype=args.dtype)
        out = demo.output_folder(args.out)
    except ValueError as err:
        args.parser.error(str(err))
    result = demo.run_demo(config, out, progress=not args.no_progress)
    return EXIT_INTERRUPTED if result.interrupted else 0


# ----- ntcov validate ------------------------------------------------------------------------


def add_validate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        formatter_class=DefaultsFormatter,
        help="check Price's equation against real training across lr, batch size, optimizer",
        description=(
            "Train an MLP and a CNN on the digits, one factor at a time around a baseline "
            "(learning rate up to the edge of stability, batch size, SGD/momentum/Adam/AdamW), "
            "and compare the predicted change of held-out probabilities and losses with the "
            "actual change at every step: plain ntcov, metric-aware first and second order, "
            "minibatch intervals, forecasts, loss scaling. Writes report.md, results.json, "
            "changes.npz and PNG plots."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="MLP only, fewer and shorter cells")
    parser.add_argument(
        "--out", default="ntcov-validate", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps of every cell (default: per mode)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the cells an earlier run in --out finished with the same settings",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_validate, parser=parser)


def run_validate(args: argparse.Namespace) -> int:
    from ntcov.experiments import demo, validate

    try:
        make = validate.ValidateConfig.quick if args.quick else validate.ValidateConfig
        config = make(seed=args.seed)
        if args.steps is not None:
            config = config.with_steps(args.steps)
        out = demo.output_folder(args.out)
    except ValueError as err:
        args.parser.error(str(err))
    result = validate.run(config, out, progress=not args.no_progress, resume=args.resume)
    return EXIT_INTERRUPTED if result.interrupted else 0


# ----- ntcov experiment NAME ------------------------------------------------------------------

EXPERIMENTS: tuple[str, ...] = ("linearity", "juice", "bernoulli", "minilm")
"""Modules of :mod:`ntcov.experiments` run by ``ntcov experiment NAME``. Each defines ``HELP``
(one line), ``add_arguments(parser)`` and ``run_from_args(args) -> int`` (the exit status;
``args.parser.error`` reports bad values)."""


def add_experiment(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run one of the seed's claims as an experiment (plots, JSON, markdown verdict)",
        description="Run one experiment: " + ", ".join(EXPERIMENTS) + ".",
    )
    names = parser.add_subparsers(title="experiments", metavar="NAME")
    for name in EXPERIMENTS:
        module = importlib.import_module(f"ntcov.experiments.{name}")
        sub = names.add_parser(
            name,
            help=module.HELP,
            description=plain_text(module.__doc__),
            formatter_class=DocstringFormatter,
        )
        module.add_arguments(sub)
        sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        sub.set_defaults(handler=module.run_from_args, parser=sub)
    parser.set_defaults(parser=parser)


# ----- ntcov attribute ------------------------------------------------------------------------


def add_attribute(subparsers: argparse._SubParsersAction) -> None:
    from ntcov.experiments import attribute

    parser = subparsers.add_parser(
        "attribute",
        help=attribute.HELP,
        description=plain_text(attribute.__doc__),
        formatter_class=DocstringFormatter,
    )
    attribute.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=attribute.run_from_args, parser=parser)


# ----- ntcov kernel ---------------------------------------------------------------------------


def add_kernel(subparsers: argparse._SubParsersAction) -> None:
    from ntcov.experiments import kernel

    parser = subparsers.add_parser(
        "kernel",
        help=kernel.HELP,
        description=plain_text(kernel.__doc__),
        formatter_class=DocstringFormatter,
    )
    kernel.add_arguments(parser)
    parser.set_defaults(handler=kernel.run_from_args, parser=parser)


# ----- the parser ----------------------------------------------------------------------------

COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_demo,
    add_validate,
    add_attribute,
    add_kernel,
    add_experiment,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``ntcov`` parser with every command in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ntcov",
        description="Price's equation for neural networks: predict how any property of a "
        "network changes during training (neural tangent covariances).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ntcov`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stdout)
        return 0
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        print("ntcov: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # an output file that cannot be written (disk full, a folder there)
        print(f"ntcov: error: {_os_error_text(err)}", file=sys.stderr)
        return EXIT_USAGE


EXIT_USAGE = 2  # argparse's status for bad arguments, also used for unwritable outputs


def _os_error_text(err: OSError) -> str:
    """One line: why, and on which file (a rename's destination)."""
    reason = err.strerror or str(err) or type(err).__name__
    target = err.filename2 or err.filename
    return f"{reason}: {str(target)!r}" if target else reason


if __name__ == "__main__":
    sys.exit(main())
