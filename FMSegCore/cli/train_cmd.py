"""``fmseg train incontext``: meta-train UniverSeg weights; ``fmseg train refine3d``: train the 3-D mask refiner on
simulated interaction; ``fmseg train incontext3d``: train the 3-D in-context network (all three resumable: run the same
command again to resume)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from FMSegCore.device import DEVICE_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train models (meta-training of in-context models)")
    kinds = train.add_subparsers(dest="train_kind", metavar="KIND")
    incontext = kinds.add_parser("incontext", help="meta-train UniverSeg on brain, body and synthetic tasks")
    _run_arguments(incontext, "final weights")
    incontext.set_defaults(func=run_train_incontext)
    refine3d = kinds.add_parser("refine3d", help="train the 3-D mask refiner on simulated clicks and flawed masks")
    _run_arguments(refine3d, "refiner3d.pt")
    refine3d.set_defaults(func=run_train_refine3d)
    incontext3d = kinds.add_parser("incontext3d", help="train the 3-D in-context network on brain, body and "
                                                       "synthetic episodes")
    _run_arguments(incontext3d, "iris3d.pt")
    incontext3d.set_defaults(func=run_train_incontext3d)
    train.set_defaults(func=lambda args: train.print_help() or 1)


def _run_arguments(parser: argparse.ArgumentParser, weights: str) -> None:
    """The options every training run takes (a resumable run folder)."""
    parser.add_argument("--config", type=Path, default=None, help="JSON training configuration")
    parser.add_argument("--output", type=Path, required=True,
                        help=f"run folder: config, checkpoint.pt, train.log, {weights}")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (with a checkpoint) after this long; run again to resume")


def run_train_incontext(args: argparse.Namespace) -> int:
    from FMSegCore.training.meta_train import TrainConfig, train

    return _train(args, TrainConfig, train, tune_cpu=True)


def run_train_refine3d(args: argparse.Namespace) -> int:
    from FMSegCore.training.refine3d_train import Refine3DConfig, train

    return _train(args, Refine3DConfig, train, tune_cpu=False)  # the refiner's config sets its own threads


def run_train_incontext3d(args: argparse.Namespace) -> int:
    from FMSegCore.training.incontext3d_train import InContext3DConfig, train

    return _train(args, InContext3DConfig, train, tune_cpu=False)  # the config sets its own threads


def _train(args: argparse.Namespace, config_class: type, train: Callable, tune_cpu: bool) -> int:
    """Read the run's configuration (one line naming the file when it is missing or invalid), then train."""
    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.errors import InputError

    if args.config is not None and not args.config.is_file():
        raise InputError(args.config, "training configuration not found")
    try:
        config = config_class.from_json(args.config) if args.config else config_class()
    except (ValueError, TypeError) as error:
        raise InputError(args.config, f"not a valid training configuration ({error})") from None
    device = resolve_device(args.device)
    if tune_cpu and device.type == "cpu":
        tune_cpu_runtime()
    weights = train(config, args.output, device, max_minutes=args.max_minutes)
    print(f"weights: {weights}")
    return 0
