"""``natgrad``: the command-line entry point, dispatching to one module per subcommand.

Exit status: 0 success, 1 a diverged run (a loss that is not finite, or a train loss above 10×
its step-0 value), 2 bad usage or missing/corrupt data or run files (one message line, no
traceback), 130 interrupted by Ctrl-C, 143 stopped by SIGTERM (a checkpoint was saved in both).
A Ctrl-C during start-up (loading data, building the model) exits with 130 without a
traceback; after an interruption, further Ctrl-Cs are ignored until the process has exited.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from natgrad.cli import launch, records
from natgrad.data import DataError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``natgrad`` parser with its subcommands."""
    from natgrad.cli import compare, fisher, train

    parser = argparse.ArgumentParser(
        prog="natgrad",
        description="Natural-gradient training for PyTorch: train, compare optimizers, and "
                    "measure how well Fisher approximations match the exact Fisher.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_parser(subparsers)
    compare.add_parser(subparsers)
    fisher.add_parser(subparsers)
    return parser


EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``natgrad`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Usage errors raise ``SystemExit(2)`` (argparse's convention), as do data errors and
    unusable run files. Without ``argv`` (the console script), an interrupted command leaves
    Ctrl-C ignored so that the interpreter's exit handlers end quietly.
    """
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _run(argv)
    except KeyboardInterrupt:  # before or outside the training loop, e.g. loading data
        print("natgrad: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    if console and status >= 128:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


def _run(argv: list[str]) -> int:
    records.COMMAND[:] = ["natgrad", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    nproc = getattr(args, "nproc_per_node", 1)
    if nproc < 1:
        parser.error(f"argument --nproc-per-node: must be >= 1, got {nproc}")
    batch = getattr(args, "batch_size", None)
    if nproc > 1 and batch is not None and batch < nproc:
        parser.error(f"argument --batch-size: {batch} examples cannot be split over "
                     f"--nproc-per-node {nproc} ranks; pass at least {nproc}")
    if nproc > 1 and not launch.under_torchrun():
        return launch.relaunch(argv, nproc)
    if launch.under_torchrun():
        launch.init_from_environment(getattr(args, "device", None))
    try:
        status = int(args.handler(args))
        launch.finish()
        return status
    except DataError as err:
        print(f"natgrad {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
