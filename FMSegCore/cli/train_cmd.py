"""``fmseg train incontext``: meta-train UniverSeg weights; ``fmseg train refine3d``: train the 3-D mask refiner on
simulated interaction (both resumable: run the same command again to resume)."""

from __future__ import annotations

import argparse
from pathlib import Path

from FMSegCore.device import DEVICE_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train models (meta-training of in-context models)")
    kinds = train.add_subparsers(dest="train_kind", metavar="KIND")
    incontext = kinds.add_parser("incontext", help="meta-train UniverSeg on brain, body and synthetic tasks")
    incontext.add_argument("--config", type=Path, default=None, help="JSON training configuration")
    incontext.add_argument("--output", type=Path, required=True,
                           help="run folder: config, checkpoint.pt, train.log, final weights")
    incontext.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    incontext.add_argument("--max-minutes", type=float, default=None,
                           help="stop (with a checkpoint) after this long; run again to resume")
    incontext.set_defaults(func=run_train_incontext)
    refine3d = kinds.add_parser("refine3d", help="train the 3-D mask refiner on simulated clicks and flawed masks")
    refine3d.add_argument("--config", type=Path, default=None, help="JSON training configuration")
    refine3d.add_argument("--output", type=Path, required=True,
                          help="run folder: config, checkpoint.pt, train.log, refiner3d.pt")
    refine3d.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    refine3d.add_argument("--max-minutes", type=float, default=None,
                          help="stop (with a checkpoint) after this long; run again to resume")
    refine3d.set_defaults(func=run_train_refine3d)
    train.set_defaults(func=lambda args: train.print_help() or 1)


def run_train_incontext(args: argparse.Namespace) -> int:
    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.errors import InputError
    from FMSegCore.training.meta_train import TrainConfig, train

    if args.config is not None and not args.config.is_file():
        raise InputError(args.config, "training configuration not found")
    try:
        config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    except (ValueError, TypeError) as error:
        raise InputError(args.config, f"not a valid training configuration ({error})") from None
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    weights = train(config, args.output, device, max_minutes=args.max_minutes)
    print(f"weights: {weights}")
    return 0


def run_train_refine3d(args: argparse.Namespace) -> int:
    from FMSegCore.device import resolve_device
    from FMSegCore.errors import InputError
    from FMSegCore.training.refine3d_train import Refine3DConfig, train

    if args.config is not None and not args.config.is_file():
        raise InputError(args.config, "training configuration not found")
    try:
        config = Refine3DConfig.from_json(args.config) if args.config else Refine3DConfig()
    except (ValueError, TypeError) as error:
        raise InputError(args.config, f"not a valid training configuration ({error})") from None
    weights = train(config, args.output, resolve_device(args.device), max_minutes=args.max_minutes)
    print(f"weights: {weights}")
    return 0
