"""``fmseg adapt``: teach a foundation model structures from a few labelled cases; writes a small adapter file.

Everything is read and checked before the model loads; the adapter is written atomically at the end, so a
cancelled (Ctrl-C) or failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from FMSegCore.cli import option_args
from FMSegCore.cli.option_args import add_option, modality_name
from FMSegCore.cli.prompt_cmd import check_not_input, check_output
from FMSegCore.engines.adaptation.defaults import (
    AUTO_DEFAULTS,
    ENCODER_METHODS,
    HEAD_WARMUPS,
    PROMPT_DEFAULTS,
    default_method,
)
from FMSegCore.errors import InputError
from FMSegCore.options import Adaptation


def _by_value(settings: dict) -> dict:
    """Methods grouped by their setting: {setting: [method, ...]}, in first-seen order."""
    groups: dict = {}
    for method, value in settings.items():
        groups.setdefault(value, []).append(method)
    return groups


def _steps_help() -> str:
    steps = {method: schedule[0] for method, schedule in AUTO_DEFAULTS.items()}
    auto = "; ".join(f"{n} for {', '.join(methods)}" for n, methods in sorted(_by_value(steps).items()))
    warmups = "; ".join(f"{n} {warm} steps before {', '.join(methods)}"
                        for (warm, n), methods in _by_value(HEAD_WARMUPS).items())
    return (f"training steps (default: auto mode {auto}; prompt mode {PROMPT_DEFAULTS[0]}). Auto mode first "
            f"trains the new head alone: {warmups}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``adapt`` to the ``fmseg`` parser."""
    parser = subparsers.add_parser(
        "adapt", help="adapt a foundation model to a few labelled cases (LoRA, ARENA, adapters, heads)",
        description="Fine-tune a foundation model parameter-efficiently on labelled cases (slices or volumes; "
                    "partial labels allowed) and save only what was trained, as an adapter file. Mode 'auto' "
                    "trains an automatic segmenter (use it with 'fmseg segment'); mode 'prompt' adapts the "
                    "promptable model (use it with 'fmseg prompt --adapter').")
    add_option(parser, Adaptation, "model", "base zoo model")
    add_option(parser, Adaptation, "method",
               "adaptation method (default decoder: in auto mode a light decoder on the frozen encoder, in prompt "
               "mode SAM's mask decoder; both fast on CPU and best measured here)")
    add_option(parser, Adaptation, "mode", "auto: segment with no prompt; prompt: a better promptable model")
    parser.add_argument("--train", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labelled case: image and label map (.nii.gz/.nrrd with labels.json, or .seg.nrrd); repeat")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME|VALUE",
                        help="structures to learn (default: every labelled structure)")
    parser.add_argument("--val", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"),
                        help="a validation case (repeat); its Dice is stored in the adapter")
    add_option(parser, Adaptation, "holdout", "hold out the last N training cases for validation", metavar="N")
    add_option(parser, Adaptation, "steps", _steps_help())
    add_option(parser, Adaptation, "batch_size",
               f"slices per step (default {PROMPT_DEFAULTS[1]}; in auto mode {AUTO_DEFAULTS[ENCODER_METHODS[0]][1]} "
               "for the encoder methods)")
    add_option(parser, Adaptation, "pixel_mm",
               "auto mode: the pixel size (mm) slices are resampled to; windows are 256 pixels "
               f"({256 * Adaptation.pixel_mm:g} mm at the default), larger slices are tiled; stored in the adapter")
    add_option(parser, Adaptation, "views",
               "auto mode: augmented training views, as many per structure, spread over the slices that show it")
    add_option(parser, Adaptation, "whole_slice",
               "auto mode: the pipeline before physical units (each whole slice as stored, resized to the model "
               "input, no augmentation); for comparison")
    add_option(parser, Adaptation, "rank", "LoRA/ARENA rank")
    add_option(parser, Adaptation, "lr", "learning rate (default: the method's)")
    parser.add_argument("--targets", nargs="+", default=None, metavar="REGEX",
                        help="LoRA/ARENA target layers by name pattern (default: attention qkv projections)")
    parser.add_argument("--arena-lambda", type=float, default=1e-3, help="ARENA's L1 weight (default 1e-3)")
    add_option(parser, Adaptation, "seed", "random seed")
    add_option(parser, Adaptation, "axis", "slicing direction")
    add_option(parser, Adaptation, "modality", "intensity normalisation (auto: guessed from each image)",
               type=modality_name)
    add_option(parser, Adaptation, "window", "CT window: abdomen, lung or bone")
    add_option(parser, Adaptation, "device", "auto, cpu, cuda, cuda:N or mps")
    add_option(parser, Adaptation, "precision", "auto: mixed precision on CUDA and on CPUs with bf16 units")
    parser.add_argument("--output", required=True, metavar="ADAPTER", help="the adapter file to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def check_adapter_output(path: Path, overwrite: bool) -> Path:
    """An adapter path that may be written: ends in .pt, then the usual output checks (folder, no file in the
    way unless overwrite)."""
    if not path.name.endswith(".pt"):
        from FMSegCore.engines.adaptation.adapter_file import ADAPTER_SUFFIX

        raise InputError(path, f"adapter files end in .pt: use --output {path.with_name(path.name + ADAPTER_SUFFIX)}")
    return check_output(path, overwrite, suffixes=(".pt",))


def run(args: argparse.Namespace) -> int:
    option_args.check_options(Adaptation, vars(args))  # before anything heavy is imported

    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.engines.adaptation.adapter_file import save_adapter
    from FMSegCore.engines.adaptation.cases import load_case, resolve_structures
    from FMSegCore.engines.adaptation.engine import adapt, split_validation, train_settings
    from FMSegCore.engines.adaptation.geometry import SliceGeometry
    from FMSegCore.engines.adaptation.methods import MethodSettings
    from FMSegCore.preprocessing.intensity import ct_window
    from FMSegCore.progress import bar_callback, progress_bar
    from FMSegCore.zoo.registry import get_card

    began = time.perf_counter()
    output = check_adapter_output(Path(args.output), args.overwrite)
    inputs = [path for pair in args.train + args.val for path in pair]
    check_not_input(output, inputs)
    get_card(args.model)
    ct_window(args.window)
    args.method = default_method(args.mode, args.method)
    try:
        method = MethodSettings(args.method, rank=args.rank, targets=args.targets, arena_lambda=args.arena_lambda)
    except ValueError as error:
        raise InputError(None, str(error)) from None
    if args.mode == "prompt" and args.method == "linear-probe":
        raise InputError(None, "a linear probe trains a head for automatic segmentation: use --mode auto")
    device = resolve_device(args.device)
    cases = [load_case(image, labels, args.modality, args.window, args.axis) for image, labels in args.train]
    cases, held_out = split_validation(cases, args.holdout)
    val_cases = held_out + [load_case(i, lab, args.modality, args.window, args.axis) for i, lab in args.val]
    structures = resolve_structures(cases, args.labels)
    options = {"learning_rate": args.lr, "seed": args.seed, "precision": args.precision}
    training = train_settings(args.mode, args.method, args.steps, args.batch_size, **options)
    geometry = None if args.whole_slice else SliceGeometry(pixel_mm=args.pixel_mm)
    if device.type == "cpu":
        tune_cpu_runtime()
    bar = progress_bar(not args.no_progress, total=training.total_steps, unit="step",
                       desc=f"Adapting ({args.method})")
    try:
        result = adapt(args.model, args.mode, cases, structures, method, training, device, val_cases,
                       modality=cases[0].modality, window=args.window, axis=args.axis,
                       progress=bar_callback(bar), geometry=geometry, views=args.views)  # the phase as its title
    finally:
        bar.close()
    save_adapter(output, result.metadata, result.state, overwrite=args.overwrite)
    _report(result, output, time.perf_counter() - began)
    return 0


def _report(result, output: Path, seconds: float) -> None:
    meta = result.metadata
    names = ", ".join(s["name"] for s in meta["structures"])
    print(f"Adapted {meta['base_model']} with {meta['method']['method']} ({meta['mode']} mode) on {meta['cases']} "
          f"case(s) for: {names}")
    print(f"Trainable parameters: {result.report.trainable:,} of {result.report.total:,}; "
          f"{result.fit.steps} steps in {result.fit.seconds:.0f} s"
          f"{' (stopped early: loss plateau)' if result.fit.stopped_early else ''}; final loss {result.fit.final_loss:.3f}")
    if meta["kept_ranks"] and meta["method"]["method"] == "arena":
        ranks = list(meta["kept_ranks"].values())
        print(f"ARENA kept ranks: {ranks} (of {meta['method']['rank']})")
    if "geometry" in meta:
        geometry = meta["geometry"]
        print(f"Physical units: {geometry['pixel_mm']:g} mm pixels, {geometry['window_mm']:g} mm windows, "
              f"orientation {geometry['orientation']}; {meta['views']} augmented training views")
    if result.validation:
        print("Validation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in result.validation.items()))
    print(f"Wrote {output} ({output.stat().st_size / 1e6:.2f} MB) in {seconds:.0f} s")
