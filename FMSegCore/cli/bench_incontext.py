"""``fmseg bench incontext``: Dice against support size on held-out tasks, speed per support image, a large volume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from FMSegCore.device import DEVICE_CHOICES


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("incontext", help="in-context segmentation: Dice vs support size, speed")
    parser.add_argument("--model", default="universeg-fmseg")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="support sizes (default 1 2 4 ... 64)")
    parser.add_argument("--queries", type=int, default=3, help="query slices per structure (default 3)")
    parser.add_argument("--ensemble", type=int, default=4, help="ensemble members for the ensembled Dice")
    parser.add_argument("--gap", type=int, default=2,
                        help="supports lie more than this many slices from the query slice (default 2)")
    parser.add_argument("--datasets", nargs="+", default=["ct", "brain"], choices=("ct", "brain"))
    parser.add_argument("--no-dice", action="store_true", help="speed only")
    parser.add_argument("--no-speed", action="store_true", help="Dice only")
    parser.add_argument("--large", action="store_true",
                        help="also segment 10 structures in the CT resampled to 512x512x100 with 16 supports")
    parser.add_argument("--cross", action="store_true",
                        help="across subjects instead: support and query from different scans (field of view, "
                             "CT<->MR, brain), Dice per structure of the aligned model, the old index matching, "
                             "the registration and copy baselines; seconds per query")
    parser.add_argument("--scenarios", nargs="+", default=None,
                        help="cross scenarios to run (default: the reported ones; dev_* are for tuning)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="with --cross: the methods to run (default: all; see incontext_cross_bench.METHODS)")
    parser.add_argument("--margins", type=float, nargs="*", default=None, metavar="MM",
                        help="with --cross: instead, sweep the spatial-prior margin (and none) on the scenarios")
    parser.add_argument("--registration-weights", type=float, nargs="+", default=[0.0], metavar="W",
                        help="with --margins: also sweep the weight of the registration prior (default 0)")
    parser.add_argument("--align-speed", action="store_true",
                        help="time aligning the bundled CT to a 512x512x300 copy of itself (with --cross: after "
                             "the scenarios; alone: only that)")
    parser.add_argument("--preview-dir", type=Path, default=None,
                        help="with --cross: write an overlay PNG of the aligned model's result per scenario")
    parser.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="write the Dice-vs-support-size plot (PNG)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm import tqdm

    from FMSegCore.bench import incontext_bench as bench
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.models.factory import load_model

    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    if args.align_speed and not args.cross:
        return _run_align_speed(args.json)
    dtype = inference_dtype(device, args.precision)
    model = load_model(args.model, device)
    if args.cross:
        return run_cross(args, model, device, dtype)
    sizes = tuple(args.sizes or bench.SUPPORT_SIZES)
    figures: dict = {"model": args.model, "device": str(device), "precision": args.precision,
                     "threads": torch.get_num_threads()}
    if not args.no_dice:
        tasks = []
        if "ct" in args.datasets:
            tasks += bench.ct_tasks()
        if "brain" in args.datasets:
            tasks += bench.brain_tasks()
        began = time.perf_counter()
        rows = []
        for task in tqdm(tasks, desc="Dice", unit="structure", leave=False):
            rows += bench.bench_task(model, task, sizes, args.queries, args.ensemble, args.gap, device, dtype)
        figures["dice_rows"] = bench.rows_as_dicts(rows)
        figures["dice_summary"] = bench.summarise(rows)
        figures["dice_seconds"] = time.perf_counter() - began
        _print_dice(rows, figures["dice_summary"], args.ensemble)
        if args.plot:
            bench.plot(figures["dice_summary"], args.plot)
            print(f"plot: {args.plot}")
    if not args.no_speed:
        figures["speed"] = bench.time_support_sizes(model, sizes, dtype=dtype)
        _print_speed(figures["speed"])
    if args.large:
        figures["large"] = bench.time_large_volume(model, device, dtype)
        large = figures["large"]
        scores = ", ".join(f"{k} {v:.2f}" for k, v in large["dice_unlabelled_slices"].items())
        print(f"\nlarge volume {'x'.join(map(str, large['shape'][::-1]))}, {large['structures']} structures, "
              f"support {large['support_size']}: {large['seconds']:.0f} s ({large['model_passes']} passes); "
              f"Dice on unlabelled slices: {scores}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=float))
    return 0


def run_cross(args: argparse.Namespace, model, device, dtype) -> int:
    """``--cross``: the cross-subject scenarios (or a margin sweep on them), printed and written as JSON."""
    import torch

    from FMSegCore.bench import cross_scenarios
    from FMSegCore.bench import incontext_cross_bench as cross

    names = args.scenarios or list(cross_scenarios.REPORTED)
    figures: dict = {"model": args.model, "device": str(device), "precision": args.precision,
                     "threads": torch.get_num_threads(), "support_size": 8, "scenarios": []}
    for name in names:
        scenario = cross_scenarios.build_scenario(name)
        if args.margins is not None:
            margins = [*args.margins, None]
            sweep = cross.prior_sweep(model, scenario, margins, args.registration_weights, device=device,
                                      dtype=dtype)
            figures["scenarios"].append(sweep)
            for row in sweep["rows"]:
                print(f"{name:<16} margin {str(row['margin_mm']):>5}  registration weight "
                      f"{row['registration_weight']:.2f}  mean Dice {row['mean']:.3f}", flush=True)
            continue
        result = cross.run_scenario(model, scenario, args.methods or cross.METHODS, device=device, dtype=dtype,
                                    preview=args.preview_dir / f"{name}.png" if args.preview_dir else None)
        figures["scenarios"].append(result)
        _print_cross(result)
        if args.json:  # written after every scenario, so a long run keeps what it has measured
            args.json.write_text(json.dumps(figures, indent=1, default=float))
    if args.align_speed:
        figures["align_speed"] = _time_alignment()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=float))
    return 0


def _time_alignment() -> dict:
    from FMSegCore.bench import incontext_cross_bench as cross

    speed = cross.time_large_alignment()
    print(f"\naligning the bundled CT to a {'x'.join(map(str, speed['shape'][::-1]))} copy: "
          f"{speed['seconds']:.1f} s ({speed['threads']} threads), body Dice {speed['body_dice']:.3f}", flush=True)
    return speed


def _run_align_speed(path: Optional[Path]) -> int:
    """``--align-speed`` alone: only the alignment's time, written as JSON when asked."""
    figures = {"align_speed": _time_alignment()}
    if path:
        path.write_text(json.dumps(figures, indent=1, default=float))
    return 0


def _print_cross(result: dict) -> None:
    methods = result["methods"]
    alignment = result["alignment"]
    print(f"\n{result['scenario']}: {result['description']}")
    print(f"alignment: {alignment['seconds']:.1f} s, body Dice {alignment['body_dice']:.3f}, "
          f"query covered {100 * alignment['overlap']:.0f} %")
    print(f"{'structure':<24} " + " ".join(f"{m:>12}" for m in methods))
    for name in result["structures"]:
        print(f"{name:<24} " + " ".join(f"{methods[m]['dice'][name]:>12.3f}" for m in methods))
    print(f"{'mean':<24} " + " ".join(f"{methods[m]['mean']:>12.3f}" for m in methods))
    large = " ".join(f"{methods[m]['mean_large_organs']:>12.3f}" if methods[m]["mean_large_organs"] is not None
                     else f"{'-':>12}" for m in methods)
    print(f"{'mean, large organs':<24} {large}")
    print(f"{'seconds':<24} " + " ".join(f"{methods[m]['seconds']:>12.1f}" for m in methods), flush=True)


def _print_dice(rows, summary: dict, ensemble: int) -> None:
    sizes = sorted({r.support_size for r in rows})
    print(f"Dice per held-out structure (ours / ours + ensemble of {ensemble}); baseline: nearest support mask")
    header = f"{'dataset':<28} {'structure':<28} {'baseline':>8} " + " ".join(f"{'N=' + str(n):>11}" for n in sizes)
    print(header)
    keys = sorted({(r.dataset, r.structure) for r in rows}, key=lambda k: (k[0], k[1]))
    for dataset, structure in keys:
        mine = {r.support_size: r for r in rows if (r.dataset, r.structure) == (dataset, structure)}
        base = next(iter(mine.values())).dice_baseline
        cells = " ".join(f"{mine[n].dice:.2f}/{mine[n].dice_ensemble:.2f}".rjust(11) if n in mine else " " * 11
                         for n in sizes)
        print(f"{dataset:<28} {structure:<28} {base:>8.2f} {cells}")
    print()
    for family, by_size in summary.items():
        line = " ".join(f"{v['dice']:.3f}/{v['dice_ensemble']:.3f}".rjust(11) for _, v in sorted(by_size.items()))
        base = next(iter(by_size.values()))["dice_baseline"]
        print(f"{'mean ' + family:<57} {base:>8.3f} {line}")


def _print_speed(speed: dict) -> None:
    print(f"\nseconds per support image per 128x128 query slice ({speed['threads']} threads)")
    print(f"{'support':>8} {'batched (8)':>12} {'one by one':>11} {'straightforward':>16}")
    for row in speed["rows"]:
        straight = f"{row['straightforward_s']:.4f}" if "straightforward_s" in row else "-"
        print(f"{row['support']:>8} {row['batched_s']:>12.4f} {row['one_at_a_time_s']:>11.4f} {straight:>16}")
    print(f"max |logit difference| ours vs straightforward: {speed['max_abs_logit_difference']:.2e}")
