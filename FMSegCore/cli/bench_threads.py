"""``fmseg bench threads``: the CPU thread default measured on an idle machine and beside busy jobs
(:mod:`FMSegCore.bench.threads_bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from FMSegCore.zoo.cache import resources_dir


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("threads", help="LiteMedSAM's encoder with 1 thread, every core and the default, "
                                              "idle and beside busy jobs")
    parser.add_argument("--busy-jobs", nargs="+", type=int, default=[0, 1], metavar="N",
                        help="conditions: this many busy-loop processes beside the timing (default 0 and 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (the median is kept)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds busy jobs run first, so that the load average sees them")
    parser.add_argument("--output", type=Path, default=resources_dir() / "Benchmarks" / "threads_cpu.json",
                        help="the JSON file written (atomically)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.threads_bench import run_bench
    from FMSegCore.errors import InputError
    from FMSegCore.io.atomic import atomic_output

    if args.repeats < 1 or min(args.busy_jobs) < 0 or args.settle < 0:
        raise InputError(None, "--repeats must be at least 1, --busy-jobs and --settle at least 0")
    if not args.output.parent.is_dir():
        raise InputError(args.output, f"output folder {args.output.parent} does not exist")
    figures = run_bench(args.busy_jobs, args.repeats, args.settle,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    with atomic_output(args.output) as temporary:
        temporary.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"Wrote {args.output}")
    return 0
