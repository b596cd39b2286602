"""``fmseg bench batch``: cohort throughput of the local and Ray engines (:mod:`FMSegCore.bench.batch_bench`)."""

from __future__ import annotations

import argparse
import sys

from FMSegCore.cli.bench_output import add_output_option, check_output_folder, write_figures


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("batch", help="fmseg batch: scans per minute, local engine vs Ray, overhead per scan")
    parser.add_argument("--scans", type=int, default=8, help="scans in the cohort (copies of the bundled CT)")
    parser.add_argument("--workers", type=int, default=2, help="workers of each engine")
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=("local", "ray"))
    parser.add_argument("--gpu-case-seconds", type=float, default=None,
                        help="also project GPU workers from this measured case time (seconds per scan on a GPU)")
    add_output_option(parser, "batch_cpu.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.batch_bench import run_bench
    from FMSegCore.errors import InputError

    if args.scans < 2 or args.workers < 1:
        raise InputError(None, "--scans must be at least 2 and --workers at least 1")
    check_output_folder(args.output)
    figures = run_bench(args.scans, args.workers, args.engines, args.gpu_case_seconds,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    for engine in figures["engines"]:
        print(f"{engine['engine']:>5}: {engine['scans_per_minute']:.1f} scans/min ({engine['workers']} workers), "
              f"fixed {engine['fixed_cost_s']:.1f} s per run, case {engine['mean_case_s']:.1f} s, overhead "
              f"{engine['overhead_per_scan_s']:.2f} s per scan")
    write_figures(args.output, figures)
    return 0
