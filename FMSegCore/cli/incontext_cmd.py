"""``fmseg incontext``: segment a query scan like labelled examples (a support set), with no training.

Every input is read and checked before the model is loaded; the result (and the optional uncertainty map) is
written atomically, never over an existing file without ``--overwrite``, and never over an input.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from FMSegCore.cli.prompt_cmd import AXES, PromptResult, check_not_input, check_output, report
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SEGMENTATION_SUFFIX
from FMSegCore.io.volume import VOLUME_SUFFIXES, PathLike, read_volume, write_volume
from FMSegCore.zoo.registry import DEFAULT_INCONTEXT, get_card

#: --axis accepts x/y/z as well as the anatomical names.
AXIS_ALIASES = {"x": "sagittal", "y": "coronal", "z": "axial", **{name: name for name in AXES}}


@dataclass
class InContextOptions:
    """Model, device and the session's settings."""

    model: str = DEFAULT_INCONTEXT
    device: str = "auto"
    axis: str = "axial"
    support_size: int = 8
    ensemble: int = 1
    tolerance: float = 0.05
    modality: str = "auto"
    window: str = "abdomen"
    precision: str = "auto"
    seed: int = 0
    progress: Optional[bool] = None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "incontext", help="segment a scan like a few labelled examples (support set), no training",
        description="Segment the structures labelled in the support examples (all of them, or those named by "
                    "--labels) in the query image. Each class is predicted slice by slice with supports from "
                    "the same relative position along --axis; the output keeps the support's label values and "
                    f"names ({SEGMENTATION_SUFFIX}, or a label map plus <name>.labels.json).")
    parser.add_argument("--image", required=True, help="the query volume (NIfTI, NRRD, MetaImage or DICOM folder)")
    parser.add_argument("--support", required=True, nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                        help="a labelled example: image and label map (.seg.nrrd, or NIfTI/NRRD with a "
                             "labels.json beside it); repeat for more examples")
    parser.add_argument("--output", required=True, help=f"the result ({SEGMENTATION_SUFFIX}, .nii.gz, .nii or .nrrd)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME|VALUE",
                        help="structures to segment, by name or label value (default: every support label)")
    parser.add_argument("--model", default=DEFAULT_INCONTEXT, help=f"zoo model (default: {DEFAULT_INCONTEXT})")
    parser.add_argument("--support-size", type=int, default=8, help="support slices per query slice (default 8)")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="average this many predictions from different support subsets (default 1)")
    parser.add_argument("--uncertainty", default=None, metavar="VOLUME",
                        help="also write the per-voxel uncertainty (spread of the ensemble; needs --ensemble >= 2)")
    parser.add_argument("--axis", default="z", choices=tuple(AXIS_ALIASES), help="slicing direction (default: z, axial)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="how far (fraction of the axis) a support slice may lie from the query slice's "
                             "relative position (default 0.05)")
    parser.add_argument("--modality", default="auto", help="CT, MR or auto (default)")
    parser.add_argument("--window", default="abdomen", help="CT window: abdomen (default), lung or bone")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ensemble's support subsets")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = InContextOptions(
        model=args.model, device=args.device, axis=AXIS_ALIASES[args.axis], support_size=args.support_size,
        ensemble=args.ensemble, tolerance=args.tolerance, modality=args.modality, window=args.window,
        precision=args.precision, seed=args.seed, progress=False if args.no_progress else None)
    incontext_to_file(args.image, [tuple(pair) for pair in args.support], args.output, labels=args.labels,
                      uncertainty=args.uncertainty, options=options, overwrite=args.overwrite)
    return 0


def _check_options(options: InContextOptions, uncertainty: Optional[PathLike]) -> None:
    from FMSegCore.preprocessing.intensity import ct_window

    get_card(options.model)
    ct_window(options.window)
    if options.support_size < 1:
        raise InputError(None, f"--support-size must be at least 1, got {options.support_size}")
    if options.ensemble < 1:
        raise InputError(None, f"--ensemble must be at least 1, got {options.ensemble}")
    if uncertainty is not None and options.ensemble < 2:
        raise InputError(uncertainty, "an uncertainty map needs --ensemble 2 or more")
    if not 0 < options.tolerance <= 1:
        raise InputError(None, f"--tolerance must be in (0, 1], got {options.tolerance}")
    if options.modality.upper() not in ("AUTO", "CT", "MR"):
        raise InputError(None, f"unknown modality {options.modality!r} (use CT, MR or auto)")


def incontext_to_file(image_path: PathLike, supports: Sequence[tuple[PathLike, PathLike]], output: PathLike,
                      labels: Optional[Sequence[Union[str, int]]] = None, uncertainty: Optional[PathLike] = None,
                      options: Optional[InContextOptions] = None, overwrite: bool = False) -> PromptResult:
    """What ``fmseg incontext`` does: check everything, segment, write atomically, print a report."""
    from tqdm import tqdm

    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
    from FMSegCore.engines.incontext.support import load_support_set
    from FMSegCore.io.labelmap import write_labelmap
    from FMSegCore.io.overlay import anatomical_axes
    from FMSegCore.models.factory import load_model

    began = time.perf_counter()
    options = options or InContextOptions()
    output = check_output(output, overwrite)
    inputs = [image_path, *(path for pair in supports for path in pair)]
    check_not_input(output, inputs)
    if uncertainty is not None:
        uncertainty = check_output(uncertainty, overwrite, VOLUME_SUFFIXES)
        check_not_input(uncertainty, inputs)
        if Path(uncertainty).resolve() == Path(output).resolve():
            raise InputError(uncertainty, "the uncertainty map and the result need different file names")
    _check_options(options, uncertainty)
    device = resolve_device(options.device)
    image = read_volume(image_path)
    support = load_support_set(supports, options.modality, options.window)
    classes = support.resolve(labels)
    show = sys.stderr.isatty() if options.progress is None else options.progress
    if device.type == "cpu":
        tune_cpu_runtime()
    if show:
        print(f"Loading {options.model} on {device}...", file=sys.stderr, flush=True)
    model = load_model(options.model, device)
    settings = InContextSettings(support_size=options.support_size, ensemble=options.ensemble,
                                 match_tolerance=options.tolerance, seed=options.seed)
    axis = anatomical_axes(image.direction)[AXES[options.axis]]
    session = InContextSession(model, support, [c.value for c in classes], axis=axis, settings=settings,
                               device=device, autocast_dtype=inference_dtype(device, options.precision),
                               modality=options.modality, window=options.window)
    bar = tqdm(total=None, unit="block", desc="Segmenting", disable=not show, file=sys.stderr)

    def progress(name: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_description(name)
        bar.update(done - bar.n)

    try:
        result = session.segment_volume(image.array, uncertainty=uncertainty is not None, progress=progress)
    finally:
        bar.close()
    write_labelmap(result.labels.astype("uint16"), image, output, result.segments, overwrite=overwrite)
    if uncertainty is not None and result.uncertainty is not None:
        write_volume(image.with_array(result.uncertainty), uncertainty)
    done = PromptResult(image, result.labels, result.segments, output, time.perf_counter() - began)
    report(done)
    if uncertainty is not None:
        print(f"Wrote {uncertainty} (uncertainty: spread of {options.ensemble} ensemble members)")
    return done
