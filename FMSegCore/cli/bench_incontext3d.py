"""``fmseg bench incontext3d``: the 3-D in-context model on the cross-subject scenarios, beside the 2-D path and
the registration baseline (:mod:`FMSegCore.bench.incontext3d_bench`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from FMSegCore.bench.incontext3d_bench import METHODS, SCENARIOS
from FMSegCore.device import DEVICE_CHOICES


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("incontext3d", help="3-D in-context model across subjects (Dice, seconds, memory)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--model", default="iris-fmseg", help="the 3-D in-context zoo model")
    parser.add_argument("--large", action="store_true",
                        help="also time a task applied to the bundled CT resampled to 512 x 512 x 300")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.incontext3d_bench import run_bench
    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.zoo.families import INCONTEXT, require_kind

    require_kind(args.model, INCONTEXT, dims=3)
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    figures = run_bench(args.scenarios, args.methods, device, args.model, large=args.large)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
        print(f"Wrote {args.json}")
    return 0
