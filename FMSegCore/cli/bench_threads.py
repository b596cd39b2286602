"""``fmseg bench threads``: the CPU thread default measured on an idle machine and beside busy jobs
(:mod:`FMSegCore.bench.threads_bench`)."""

from __future__ import annotations

import argparse
import sys

from FMSegCore.cli.bench_output import add_output_option, check_output_folder, write_figures


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("threads", help="LiteMedSAM's encoder with 1 thread, every core and the default, "
                                              "idle and beside busy jobs")
    parser.add_argument("--busy-jobs", nargs="+", type=int, default=[0, 1], metavar="N",
                        help="conditions: this many busy-loop processes beside the timing (default 0 and 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (the median is kept)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds busy jobs run first, so that the load average sees them")
    add_output_option(parser, "threads_cpu.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.threads_bench import run_bench
    from FMSegCore.errors import InputError

    if args.repeats < 1 or min(args.busy_jobs) < 0 or args.settle < 0:
        raise InputError(None, "--repeats must be at least 1, --busy-jobs and --settle at least 0")
    check_output_folder(args.output)
    figures = run_bench(args.busy_jobs, args.repeats, args.settle,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    write_figures(args.output, figures)
    return 0
