"""The ``fmseg`` command: one sub-command per module in this package, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Optional

from FMSegCore import __version__
from FMSegCore.device import THREADS_ENV
from FMSegCore.errors import FMSegError

THREADS_HELP = (f"CPU threads (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else the cores the machine's load "
                "leaves idle)")

#: Sub-command modules (FMSegCore.cli.<name>); each defines ``register(subparsers)`` which sets ``func``.
COMMAND_MODULES = ("prompt_cmd", "incontext_cmd", "adapt_cmd", "segment_cmd", "models_cmd", "demo_cmd", "bench_cmd",
                   "train_cmd", "serve_cmd", "task_cmd", "data_cmd", "batch_cmd")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(prog="fmseg", description="Medical segmentation foundation models.")
    parser.add_argument("--version", action="version", version=f"fmseg {__version__}")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"FMSegCore.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"FMSegCore.cli.{name}":
                continue
            raise
        module.register(subparsers)
    for command in subparsers.choices.values():  # `fmseg demo --threads 1` as well as `fmseg --threads 1 demo`
        if "--threads" not in command._option_string_actions:
            command.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N", help=THREADS_HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fmseg``; user errors become one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    previous = os.environ.get(THREADS_ENV)
    try:
        if args.threads is not None:  # read by FMSegCore.device.tune_cpu_runtime wherever the command runs it
            if args.threads < 1:
                raise FMSegError(f"--threads must be at least 1, not {args.threads}")
            os.environ[THREADS_ENV] = str(args.threads)
        return int(args.func(args) or 0)
    except FMSegError as error:
        print(f"fmseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fmseg models | head`): stop quietly, as Unix tools do
        _silence_stdout()
        return 141
    finally:  # main() called in a process that goes on (tests, scripts) leaves the environment as it was
        if previous is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = previous


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush raises nothing more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass


if __name__ == "__main__":
    sys.exit(main())
