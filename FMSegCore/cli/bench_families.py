"""``fmseg bench families``: every model family's forward speed on this CPU beside the official code's timing of
the same call (:mod:`FMSegCore.bench.families_bench`)."""

from __future__ import annotations

import argparse
import sys

from FMSegCore.cli.bench_output import add_output_option, check_output_folder, write_figures

#: The families, in the order they run (kept here so ``fmseg --help`` does not import torch).
FAMILIES = ("universeg", "tyche", "multiverseg", "sam-med3d", "medsam", "vista3d", "litemedsam", "iris")


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("families", help="each model family's CPU speed beside the official code's timing")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, metavar="FAMILY",
                        help=f"the families timed: {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the median is kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (the official timings used 2)")
    add_output_option(parser, "families_cpu.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.families_bench import format_table, run_bench
    from FMSegCore.device import tune_cpu_runtime
    from FMSegCore.errors import InputError

    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        raise InputError(args.output, "--repeats and --threads must be at least 1, --warmup at least 0")
    check_output_folder(args.output)
    tune_cpu_runtime(args.threads)  # as every fmseg CPU run does (recorded as allocator_tuned)
    figures = run_bench(args.families, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                        allocator_tuned=True, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(figures))
    write_figures(args.output, figures)
    return 0
