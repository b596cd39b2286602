"""``fmseg bench adapt``: held-out Dice of every adaptation method on real scans, with its cost."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from FMSegCore.device import DEVICE_CHOICES


def add_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser("adapt", help="few-shot adaptation: Dice per method and shots, time, memory")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--datasets", nargs="+", default=["ct", "mr"], choices=("ct", "mr"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10],
                        help="labelled slices (default 1 5 10); the zero-shot baseline is scored on the first "
                             "one's test set (test_shots in the JSON)")
    parser.add_argument("--steps", type=int, default=150, help="steps of frozen-encoder methods (default 150)")
    parser.add_argument("--encoder-steps", type=int, default=40,
                        help="steps of encoder methods (LoRA, ARENA, BitFit, ...; default 40: their steps cost far more on CPU)")
    parser.add_argument("--encoder-shots", type=int, nargs="+", default=[5], help="shots for encoder methods (default 5)")
    parser.add_argument("--encoder-datasets", nargs="+", default=["ct"], choices=("ct", "mr"))
    parser.add_argument("--prompt-shots", type=int, nargs="+", default=[5], help="shots for prompt-mode methods (default 5)")
    parser.add_argument("--prompt-methods", nargs="+", default=["decoder"], choices=("decoder", "spatial-adapter"),
                        help="prompt-mode methods (default: decoder)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (a name matching none, e.g. none: only the zero-shot baseline)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file (with "
                        f"--cross, default Resources/{CROSS_JSON})")
    parser.add_argument("--cross", action="store_true",
                        help="cross-subject instead: adapters trained on one whole scan (the bundled CT, the MR), "
                             "tested on other scans (fov_shift, ct_to_mr, mr_to_ct; brain_cross: a brain template "
                             "to another), physical units beside the whole-slice pipeline; and the training time of "
                             "every method at its defaults")
    parser.add_argument("--cross-method", default=None, help="with --cross: the method trained on every scenario "
                        "(default: fmseg adapt's auto-mode default)")
    parser.add_argument("--cross-part", choices=CROSS_PARTS, default="all",
                        help="with --cross: only the scenarios, only the brain scenario, or only the timing of every "
                             "method (--methods: these), merged into the JSON written before (default all); dev: "
                             f"--methods (default: the default method) at their defaults on {DEV_SCENARIO}, the "
                             f"development scenario defaults are chosen on, into Resources/{DEV_JSON}")
    parser.add_argument("--no-timing-dice", action="store_true",
                        help="with --cross: time the methods without scoring each on fov_shift")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    parser.set_defaults(func=run)


#: Where ``--cross`` writes its figures unless told (under FMSeg's Resources).
CROSS_JSON = Path("Benchmarks") / "adapt_cross_cpu.json"
#: ``--cross-part dev``: the development scenario defaults are chosen on, and where its figures go.
DEV_SCENARIO = "dev_mr_shift"
DEV_JSON = Path("Benchmarks") / "adapt_cross_dev_cpu.json"
CROSS_PARTS = ("all", "scenarios", "brain", "timing", "dev")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.cross:
        return run_cross(args)

    from FMSegCore.bench.adapt_bench import run_benchmark
    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.engines.adaptation.engine import load_base

    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    base, _ = load_base("litemedsam", device)
    print(f"device {device} ({torch.get_num_threads()} threads)")

    def show(result) -> None:
        dice = "  ".join(f"{k} {v:.3f}" for k, v in result.dice.items())
        print(f"{result.dataset:>3} k={result.shots:<2} {result.mode:<6} {result.method:<16} mean {result.mean:.3f} | "
              f"{dice} | {result.trainable:>9,} params {result.seconds:6.1f} s {result.steps:>3} steps "
              f"{result.peak_mb:6.0f} MB", flush=True)

    results = run_benchmark(base, args.datasets, args.shots, device, args.steps, args.encoder_steps,
                            args.encoder_shots, args.encoder_datasets, args.methods, args.prompt_shots,
                            args.prompt_methods, report=show)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                         "results": [asdict(r) | {"mean": r.mean} for r in results]}, indent=1))
    return 0


def run_cross(args: argparse.Namespace) -> int:
    """``fmseg bench adapt --cross``: every figure of the README's cross-subject tables, written as it comes."""
    import platform
    import time

    import torch

    from FMSegCore.bench import adapt_cross_bench as cross
    from FMSegCore.bench.cross_scenarios import BRAIN_STRUCTURES
    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.engines.adaptation.defaults import AUTO_DEFAULTS, DEFAULT_METHODS, DEFAULT_VIEWS, METHODS
    from FMSegCore.engines.adaptation.engine import load_base
    from FMSegCore.engines.adaptation.geometry import SliceGeometry
    from FMSegCore.zoo.cache import resources_dir

    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base("litemedsam", device)
    method = args.cross_method or DEFAULT_METHODS["auto"]
    path = args.json or resources_dir() / (DEV_JSON if args.cross_part == "dev" else CROSS_JSON)
    began = time.perf_counter()
    figures: dict = {"device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or
                     platform.machine(), "geometry": SliceGeometry().to_json(), "views": DEFAULT_VIEWS,
                     "defaults": {m: {"steps": s, "batch_size": b} for m, (s, b) in AUTO_DEFAULTS.items()},
                     "method": method, "cross": [], "timing": []}
    rerun = args.methods or ([method] if args.cross_part == "dev" else None)  # methods a part run measures again
    if args.cross_part != "all" and path.exists():  # a part run: keep the figures it does not measure again
        figures |= kept_figures(json.loads(path.read_text()), args.cross_part, rerun)
    print(f"device {device} ({torch.get_num_threads()} threads); method {method}", flush=True)

    def save() -> None:
        figures["seconds"] = round(time.perf_counter() - began, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1))

    def finish() -> int:
        save()
        print(f"wrote {path} ({figures['seconds']:.0f} s)")
        return 0

    def show(cell) -> None:
        figures["cross"].append(asdict(cell) | {"mean": cell.mean, "mean_large": cell.mean_large})
        dice = "  ".join(f"{k} {v:.3f}" for k, v in cell.dice.items())
        print(f"{cell.scenario:<9} {cell.pipeline:<11} {cell.method:<15} large {cell.mean_large:.3f} mean "
              f"{cell.mean:.3f} | {dice} | train {cell.train_seconds:.0f} s, segment {cell.segment_seconds:.0f} s",
              flush=True)
        save()

    def timed(cell) -> None:
        figures["timing"].append(asdict(cell) | {"mean_large": cell.mean_large})
        print(f"timing {cell.method:<15} {cell.seconds:6.1f} s  {cell.head_steps}+{cell.steps} steps x "
              f"{cell.batch_size}, {cell.views} views; {cell.scenario} large {cell.mean_large:.3f}", flush=True)
        save()

    def run_brain() -> None:  # a brain template's adapter on another template: its brain structures
        cross.run_cross(base, (BRAIN_SCENARIO,), [method], cross.PIPELINES, device, report=show,
                        wanted=BRAIN_STRUCTURES)

    scenarios = [cross.build_scenario(name) for name in ("fov_shift", "ct_to_mr")]
    union = list(dict.fromkeys(s for scenario in scenarios for s in cross.scored_structures(scenario)))
    if args.cross_part == "dev":  # the methods at their defaults on the development scenario (not reported)
        development = cross.build_scenario(DEV_SCENARIO)
        cross.run_timing(base, development.support, cross.scored_structures(development), device, rerun,
                         report=timed, scenario=development)
        return finish()
    if args.cross_part == "timing":  # every method (or --methods) at its defaults, timed on an otherwise idle run
        cross.run_timing(base, scenarios[0].support, union, device, args.methods or METHODS, report=timed,
                         scenario=None if args.no_timing_dice else scenarios[0])
        return finish()
    if args.cross_part == "brain":
        run_brain()
        return finish()
    results = cross.run_cross(base, ("fov_shift", "ct_to_mr"), [method], cross.PIPELINES, device, report=show)
    cross.run_cross(base, ("mr_to_ct",), [method], cross.PIPELINES, device, report=show)
    run_brain()
    if args.cross_part == "scenarios":
        return finish()
    # every method at its defaults on the CT (all annotated slices, the same structures as the CT adapter above),
    # each scored on the field-of-view shift
    trained = next(r for r in results if r.scenario == "fov_shift" and r.pipeline == "physical")
    timed(cross.TimingResult(method, trained.train_seconds, trained.steps, trained.batch_size, trained.views,
                             trained.extra["trainable"], trained.extra["structures_trained"], 0, "fov_shift",
                             trained.dice))
    cross.run_timing(base, scenarios[0].support, union, device, [m for m in METHODS if m != method], report=timed,
                     scenario=None if args.no_timing_dice else scenarios[0])
    return finish()


BRAIN_SCENARIO = "brain_cross"


def kept_figures(earlier: dict, part: str, methods) -> dict:
    """What a part run (``--cross-part``) keeps from the JSON written before: the cells it does not measure again,
    and the superseded figures kept for the record (``*_superseded``)."""
    cross, timing = earlier.get("cross", []), earlier.get("timing", [])
    kept = {key: value for key, value in earlier.items() if key.endswith("_superseded")}
    if part in ("timing", "dev"):  # every scenario; the timing of methods not run again
        return kept | {"cross": cross, "timing": [c for c in timing if methods and c["method"] not in methods]}
    if part == "brain":
        return kept | {"cross": [c for c in cross if c["scenario"] != BRAIN_SCENARIO], "timing": timing}
    return kept | {"timing": timing}  # scenarios
