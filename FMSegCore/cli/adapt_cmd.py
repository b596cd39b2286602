"""``fmseg adapt``: teach a foundation model structures from a few labelled cases; writes a small adapter file.

Everything is read and checked before the model loads; the adapter is written atomically at the end, so a
cancelled (Ctrl-C) or failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from FMSegCore.cli.prompt_cmd import check_not_input, check_output
from FMSegCore.engines.adaptation.defaults import (
    AUTO_DEFAULTS,
    DEFAULT_PIXEL_MM,
    DEFAULT_RANK,
    DEFAULT_VIEWS,
    ENCODER_METHODS,
    HEAD_WARMUPS,
    METHOD_CHOICES,
    MODES,
    PROMPT_DEFAULTS,
    default_method,
)
from FMSegCore.errors import InputError
from FMSegCore.zoo.registry import DEFAULT_PROMPTABLE


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
    parser.add_argument("--model", default=DEFAULT_PROMPTABLE, help=f"base zoo model (default: {DEFAULT_PROMPTABLE})")
    parser.add_argument("--method", choices=METHOD_CHOICES, default=None,
                        help="adaptation method (default decoder: in auto mode a light decoder on the frozen "
                             "encoder, in prompt mode SAM's mask decoder; both fast on CPU and best measured here)")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="auto: segment with no prompt (default); prompt: a better promptable model")
    parser.add_argument("--train", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labelled case: image and label map (.nii.gz/.nrrd with labels.json, or .seg.nrrd); repeat")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME|VALUE",
                        help="structures to learn (default: every labelled structure)")
    parser.add_argument("--val", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"),
                        help="a validation case (repeat); its Dice is stored in the adapter")
    parser.add_argument("--holdout", type=int, default=0, metavar="N",
                        help="hold out the last N training cases for validation (default 0)")
    parser.add_argument("--steps", type=int, default=None, help=_steps_help())
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"slices per step (default {PROMPT_DEFAULTS[1]}; in auto mode "
                             f"{AUTO_DEFAULTS[ENCODER_METHODS[0]][1]} for the encoder methods)")
    parser.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM,
                        help="auto mode: the pixel size (mm) slices are resampled to; windows are 256 pixels "
                             f"(default {DEFAULT_PIXEL_MM:g}: {256 * DEFAULT_PIXEL_MM:g} mm), larger slices are "
                             "tiled; stored in the adapter")
    parser.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                        help="auto mode: augmented training views, as many per structure, spread over the "
                             f"slices that show it (default {DEFAULT_VIEWS})")
    parser.add_argument("--whole-slice", action="store_true",
                        help="auto mode: the pipeline before physical units (each whole slice as stored, resized "
                             "to the model input, no augmentation); for comparison")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA/ARENA rank (default {DEFAULT_RANK})")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    parser.add_argument("--targets", nargs="+", default=None, metavar="REGEX",
                        help="LoRA/ARENA target layers by name pattern (default: attention qkv projections)")
    parser.add_argument("--arena-lambda", type=float, default=1e-3, help="ARENA's L1 weight (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--axis", choices=("axial", "coronal", "sagittal"), default="axial",
                        help="slicing direction (default: axial)")
    parser.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto", type=lambda t: t if t == "auto" else t.upper())
    parser.add_argument("--window", default="abdomen", help="CT window: abdomen (default), lung or bone")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto (default): mixed precision on CUDA and on CPUs with bf16 units")
    parser.add_argument("--output", required=True, metavar="ADAPTER", help="the adapter file to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def check_adapter_output(path: Path, overwrite: bool) -> Path:
    """An adapter path that may be written: ends in .pt, then the usual output checks (folder, no file in the
    way unless overwrite)."""
    if not path.name.endswith(".pt"):
        raise InputError(path, "adapter files end in .pt (e.g. liver.fmseg-adapter.pt)")
    return check_output(path, overwrite, suffixes=(".pt",))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from FMSegCore.device import resolve_device, tune_cpu_runtime
    from FMSegCore.engines.adaptation.adapter_file import save_adapter
    from FMSegCore.engines.adaptation.cases import load_case, resolve_structures
    from FMSegCore.engines.adaptation.engine import adapt, split_validation, train_settings
    from FMSegCore.engines.adaptation.geometry import SliceGeometry
    from FMSegCore.engines.adaptation.methods import MethodSettings
    from FMSegCore.preprocessing.intensity import ct_window
    from FMSegCore.zoo.registry import get_card

    began = time.perf_counter()
    output = check_adapter_output(Path(args.output), args.overwrite)
    inputs = [path for pair in args.train + args.val for path in pair]
    check_not_input(output, inputs)
    get_card(args.model)
    ct_window(args.window)
    if any(value is not None and value < 1 for value in (args.steps, args.batch_size, args.views)):
        raise InputError(None, "--steps, --batch-size and --views must be at least 1")
    if not args.pixel_mm > 0:
        raise InputError(None, "--pixel-mm must be positive")
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
    show = sys.stderr.isatty() and not args.no_progress
    bar = tqdm(total=training.total_steps, unit="step", desc=f"Adapting ({args.method})", disable=not show, file=sys.stderr)

    def progress(update) -> None:
        bar.n = update.step
        bar.set_postfix(loss=f"{update.loss:.3f}")

    try:
        result = adapt(args.model, args.mode, cases, structures, method, training, device, val_cases,
                       modality=cases[0].modality, window=args.window, axis=args.axis, progress=progress,
                       geometry=geometry, views=args.views)
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
