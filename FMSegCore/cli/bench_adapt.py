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
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="labelled slices (default 1 5 10)")
    parser.add_argument("--steps", type=int, default=150, help="steps of frozen-encoder methods (default 150)")
    parser.add_argument("--encoder-steps", type=int, default=40,
                        help="steps of encoder methods (LoRA, ARENA, BitFit, ...; default 40: they cost ~10x more a step on CPU)")
    parser.add_argument("--encoder-shots", type=int, nargs="+", default=[5], help="shots for encoder methods (default 5)")
    parser.add_argument("--encoder-datasets", nargs="+", default=["ct"], choices=("ct", "mr"))
    parser.add_argument("--prompt-shots", type=int, nargs="+", default=[5], help="shots for prompt-mode methods (default 5)")
    parser.add_argument("--prompt-methods", nargs="+", default=["decoder"], choices=("decoder", "spatial-adapter"),
                        help="prompt-mode methods (default: decoder)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

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
