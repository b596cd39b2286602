"""``fmseg bench roi``: tilted ROIs prompted slice by slice (their own extent) vs as their enclosing box."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from FMSegCore.device import DEVICE_CHOICES
from FMSegCore.zoo.cache import resources_dir


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("roi", help="tilted ROIs: per-slice extent vs enclosing box (Dice)")
    parser.add_argument("--data", type=Path, default=resources_dir() / "SampleData" / "ct_abdomen_pelvis",
                        help="a case folder (image.nii.gz, label.nii.gz, labels.json); default: the bundled CT")
    parser.add_argument("--structures", nargs="*", default=["kidney_left", "spleen", "liver"])
    parser.add_argument("--angles", type=float, nargs="+", default=[20.0, 35.0], help="tilts in degrees")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FMSegCore.bench.prompt_bench import load_case
    from FMSegCore.bench.roi_bench import run_roi_bench
    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.engines.prompting.session import PromptSession
    from FMSegCore.models.factory import load_model

    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    image, labels, names = load_case(args.data)
    session = PromptSession(image, load_model("litemedsam", device), device)
    print(f"ROIs tilted about the left-right axis, 2 mm margin, {args.data.name}, {device} (Dice):")
    rows = run_roi_bench(session, image, labels.array, names, args.structures, args.angles)
    means = {kind: round(sum(r[kind] for r in rows) / len(rows), 3) for kind in ("per_slice", "enclosing")}
    print(f"mean: per-slice extent {means['per_slice']:.3f}, enclosing box {means['enclosing']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "case": args.data.name, "rows": rows,
                                         "mean": means}, indent=2) + "\n")
        print(f"Wrote {args.json}")
    return 0
