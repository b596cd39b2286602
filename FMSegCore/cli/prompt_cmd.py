"""``fmseg prompt``: segment the structures that Slicer markups (ROIs, point lists, curves) prompt, into one label
map.

Every input is read and checked before the model is loaded, so bad input fails fast with one line naming the
file; the result is written atomically (a half-written file never appears) and never replaces an existing
file unless ``--overwrite`` is given, nor ever an input file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from FMSegCore.cli import option_args
from FMSegCore.cli.option_args import add_option, modality_name
from FMSegCore.errors import InputError
from FMSegCore.io.colors import distinct_colors
from FMSegCore.io.labelmap import (
    LABELMAP_SUFFIXES,
    SEGMENTATION_SUFFIX,
    SegmentInfo,
    labels_json_path,
    write_labelmap,
)
from FMSegCore.io.markups import load_prompts
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.volume import PathLike, Volume, read_volume
from FMSegCore.options import AXIS_INDEX, Prompting
from FMSegCore.prompts import SegmentPrompts, off_slice_problem, slicing_axis
from FMSegCore.zoo.families import PROMPTABLE, model_dims, require_kind

if TYPE_CHECKING:
    import torch

# torch and MONAI are imported only when a command runs, so that `fmseg --help` and `fmseg models` start fast.

#: Slicing directions, as indices into :func:`anatomical_axes` (L-R, A-P, S-I): slices perpendicular to it.
AXES = AXIS_INDEX


@dataclass
class SegmentOptions:
    """How to segment: model, device and the prompt session's settings (defaults: :class:`Prompting`'s)."""

    model: str = Prompting.model
    device: str = Prompting.device
    axis: str = Prompting.axis
    context: str = Prompting.context
    modality: str = Prompting.modality
    window: Optional[str] = Prompting.window  # CT window preset; None: the session's default (auto per segment)
    three_planes: bool = Prompting.three_planes
    precision: str = Prompting.precision  # auto: bf16/fp16 on CUDA, fp32 elsewhere; bf16: also on CPUs with bf16 units
    progress: Optional[bool] = None  # None: a progress bar when stderr is a terminal
    adapter: Optional[str] = None  # an adapter file from `fmseg adapt --mode prompt`


@dataclass
class PromptResult:
    """What ``fmseg prompt`` produced: the label map (KJI, on the image grid) and its segments."""

    image: Volume
    labels: np.ndarray
    segments: list[SegmentInfo]
    output: Path
    seconds: float


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prompt`` to the ``fmseg`` parser."""
    parser = subparsers.add_parser(
        "prompt", help="segment structures prompted by Slicer markups (ROIs, points)",
        description="Segment one structure per markup (named by the markup's 'name' key, else by its file "
                    "name) and write them as one label map: values 1..N in the order the structures first "
                    f"appear. The output's ending picks the format: {SEGMENTATION_SUFFIX} (Slicer "
                    "segmentation with names), .nii.gz, .nii or .nrrd (label map plus <name>.labels.json).")
    parser.add_argument("--image", required=True, metavar="IMAGE", help="the volume (NIfTI, NRRD, MetaImage or DICOM folder)")
    parser.add_argument("--prompts", required=True, nargs="+", metavar="MARKUPS",
                        help="Slicer markups files (.mrk.json): ROIs, point lists, curves (scribbles) and closed "
                             "curves (lassos); a control point described 'exclude' makes its point or curve exclude")
    parser.add_argument("--output", required=True, metavar="OUTPUT", help=f"the result ({SEGMENTATION_SUFFIX}, .nii.gz, .nii or .nrrd)")
    add_segment_options(parser)
    parser.set_defaults(func=run)


def add_segment_options(parser: argparse.ArgumentParser, full: bool = True) -> None:
    """The options shared by ``prompt`` and ``demo``: device, overwriting and progress (and, with ``full``,
    the model and session settings)."""
    add_option(parser, Prompting, "device", "auto: CUDA, then Apple MPS, then CPU; or cpu, cuda, cuda:N, mps",
               metavar="DEVICE")
    if full:
        add_option(parser, Prompting, "model", "zoo model")
        add_option(parser, Prompting, "axis", "slicing direction")
        add_option(parser, Prompting, "context",
                   "what the model sees: a crop around the prompt, the whole slice, or auto (crops on slices much "
                   "larger than the model input, whole slices otherwise)")
        add_option(parser, Prompting, "precision",
                   "auto: bf16/fp16 on CUDA, fp32 (equal to the reference model) on CPU; bf16 on a CPU with bf16 "
                   "units (AMX) encodes about twice as fast")
        add_option(parser, Prompting, "modality", "intensity normalisation (auto: guessed from the image)",
                   type=modality_name)
        parser.add_argument("--adapter", default=None, metavar="ADAPTER",
                            help="an adapter file from 'fmseg adapt --mode prompt' for this model")
        add_option(parser, Prompting, "window", "CT intensity window: auto (the default: abdomen, or lung where "
                   "the prompt holds much air and the model is surer with it), abdomen, lung or bone", metavar="WINDOW")
        add_option(parser, Prompting, "three_planes", "2-D models, experimental: also propagate along the two "
                   "other axes and keep what two of the three planes find (see the README's benchmark: it helps "
                   "leaking structures, hurts vessels; about three times the encoding)")
        from FMSegCore.cli.preview import add_preview_option

        add_preview_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> SegmentOptions:
    """The :class:`SegmentOptions` of parsed arguments (defaults for options the command lacks)."""
    defaults = SegmentOptions()
    names = ("model", "device", "axis", "context", "modality", "window", "three_planes", "precision", "adapter")
    values = {name: getattr(args, name, getattr(defaults, name)) for name in names}
    return SegmentOptions(**values, progress=False if args.no_progress else None)


def run(args: argparse.Namespace) -> int:
    prompt_to_file(args.image, args.prompts, args.output, options_from_args(args), overwrite=args.overwrite,
                   preview=getattr(args, "preview", None))
    return 0


# ------------------------------------------------------------------------------------------------ checks


def check_output(path: PathLike, overwrite: bool, suffixes: Sequence[str] = LABELMAP_SUFFIXES) -> Path:
    """An output path that may be written: known ending, existing folder, and no file in the way unless
    ``overwrite`` (for a label map, its ``.labels.json`` too)."""
    path = Path(path)
    name = path.name.lower()
    labelmap = tuple(suffixes) == LABELMAP_SUFFIXES
    if not any(name.endswith(suffix) for suffix in suffixes):
        endings = (SEGMENTATION_SUFFIX, *suffixes) if labelmap else tuple(suffixes)
        raise InputError(path, f"unknown output format (use a file name ending in {', '.join(endings)})")
    if path.is_dir():
        raise InputError(path, "output is a folder (give a file name)")
    if not path.parent.is_dir():
        raise InputError(path, f"output folder {path.parent} does not exist")
    companions = [labels_json_path(path)] if labelmap and not name.endswith(SEGMENTATION_SUFFIX) else []
    for existing in [path, *companions]:
        if existing.exists() and not overwrite:
            raise InputError(existing, "exists already (pass --overwrite to replace it, or choose another name)")
    return path


def check_not_input(output: Path, inputs: Sequence[PathLike]) -> None:
    """Refuse to write over an input file, even with --overwrite."""
    for source in inputs:
        source = Path(source)
        if output.exists() and source.exists() and os.path.samefile(output, source):
            raise InputError(output, f"output would replace the input file {source}")


# ------------------------------------------------------------------------------------------------ running


def _status(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _slices_expected(segments: Sequence[SegmentPrompts], axis: int, count: int) -> Optional[int]:
    """How many slices the session will decode when every prompt is a 3D ROI (it covers exactly their
    slices), else None (propagation decides)."""
    total = 0
    for segment in segments:
        if segment.points or segment.curves or any(box.slice_axis() is not None for box in segment.boxes):
            return None
        covered = set()
        for box in segment.boxes:
            first, last = box.voxel_range(axis)
            covered.update(range(max(first, 0), min(last, count - 1) + 1))
        total += len(covered)
    return total


def check_curves_on_slices(segments: Sequence[SegmentPrompts], image: Volume, options: SegmentOptions) -> None:
    """For a 2-D model: every curve lies on one slice of the axis its segment is sliced along (InputError naming
    its file and the axis otherwise), checked before the model loads, as the session checks it."""
    if model_dims(require_kind(options.model, PROMPTABLE)) == 3:
        return
    default = anatomical_axes(image.direction)[AXES[options.axis]]
    for segment in segments:
        axis = slicing_axis(segment, default)
        for curve in segment.curves:
            problem = off_slice_problem(curve, axis)
            if problem:
                raise InputError(curve.source, f"segment '{segment.name}': {problem}")


def check_options(options: SegmentOptions) -> torch.device:
    """Refuse unknown settings and an absent device before any file is read; the device to use."""
    from FMSegCore.device import resolve_device
    from FMSegCore.preprocessing.intensity import ct_window

    option_args.check_options(Prompting, vars(options))
    require_kind(options.model, PROMPTABLE)
    if options.window not in (None, "auto"):
        ct_window(options.window)
    return resolve_device(options.device)


def load_prompt_adapter(path: str):
    """An adapter file for prompting, read and checked (its mode) before anything heavy runs."""
    from FMSegCore.engines.adaptation.adapter_file import load_adapter

    adapter = load_adapter(path)
    if adapter.mode != "prompt":
        raise InputError(path, "this adapter is an automatic segmenter: use it with 'fmseg segment --adapter'")
    return adapter


def segment_volume(image: Volume, segments: Sequence[SegmentPrompts], options: SegmentOptions,
                   device: Optional[torch.device] = None) -> np.ndarray:
    """Run the promptable model on the image: a KJI uint16 label map with values 1..N in segment order."""
    from FMSegCore.device import inference_dtype, tune_cpu_runtime
    from FMSegCore.engines.prompting.session3d import PromptSession3D
    from FMSegCore.engines.prompting.sessions import open_prompt_session
    from FMSegCore.models.factory import load_model
    from FMSegCore.progress import progress_bar, show_progress

    device = device or check_options(options)
    axis = anatomical_axes(image.direction)[AXES[options.axis]]
    show = show_progress(options.progress)  # a bar on a terminal, a line every few seconds elsewhere
    if device.type == "cpu":
        tune_cpu_runtime()
    _status(f"Loading {options.model} on {device}...", show)
    if options.adapter:
        from FMSegCore.engines.adaptation.engine import build_adapted

        model = build_adapted(load_prompt_adapter(options.adapter), device, model_name=options.model)
    else:
        model = load_model(options.model, device)
    window = {} if options.window is None else {"window": options.window}
    session = open_prompt_session(image, model, device, axis=axis, context=options.context,
                                  modality=options.modality, autocast_dtype=inference_dtype(device, options.precision),
                                  three_planes=options.three_planes, **window)
    if isinstance(session, PromptSession3D):  # one decoder call per segment: a bar over segments
        with progress_bar(show, total=len(segments), unit="segment", desc="Segmenting") as bar:
            labels, _ = session.run(list(segments), progress=lambda update: bar.set_description(update.message))
            bar.update(len(segments))
        return labels
    total = _slices_expected(segments, axis, image.shape_ijk[axis])
    bar = progress_bar(show, total=total, unit="slice", desc="Segmenting", leave=True)
    decode = session.decode_slice

    def counted(*args, **kwargs):
        result = decode(*args, **kwargs)
        if bar.total is not None and bar.n >= bar.total:  # a structure longer than expected: the total grows
            bar.total = bar.n + 1
        bar.update(1)
        return result

    session.decode_slice = counted  # type: ignore[method-assign]
    try:
        labels, _ = session.run(list(segments), progress=lambda update: bar.set_description(update.message))
        bar.total = bar.n  # propagation may stop early
        bar.set_description("Segmented")
    finally:
        bar.close()
    return labels


def report(result: PromptResult) -> None:
    """One line per segment (value, name, voxels, mL), then where the result went and how long it took."""
    voxel_ml = float(np.prod(result.image.spacing)) / 1000.0
    counts = np.bincount(result.labels.ravel(), minlength=max((s.value for s in result.segments), default=0) + 1)
    width = max((len(s.name) for s in result.segments), default=4)
    for segment in result.segments:
        voxels = int(counts[segment.value])
        note = "  (empty: nothing was found)" if voxels == 0 else ""
        print(f"{segment.value:>3}  {segment.name:<{width}}  {voxels:>9,} voxels  {voxels * voxel_ml:>9.1f} mL{note}")
    print(f"Wrote {result.output} ({len(result.segments)} segment{'s' * (len(result.segments) != 1)}) "
          f"in {result.seconds:.1f} s")


def prompt_to_file(image_path: PathLike, prompt_paths: Sequence[PathLike], output: PathLike,
                   options: Optional[SegmentOptions] = None, overwrite: bool = False,
                   preview: Optional[PathLike] = None) -> PromptResult:
    """What ``fmseg prompt`` does: check everything, segment, write the result atomically, print a report (and
    write the ``preview`` PNG when asked)."""
    from FMSegCore.cli.preview import check_preview, write_preview

    began = time.perf_counter()
    options = options or SegmentOptions()
    output = check_output(output, overwrite)
    check_not_input(output, [image_path, *prompt_paths])
    preview_path = check_preview(preview, [image_path, *prompt_paths], overwrite, [output])
    device = check_options(options)
    if options.adapter:
        check_not_input(output, [options.adapter])
        load_prompt_adapter(options.adapter)
    image = read_volume(image_path)
    segments = load_prompts(prompt_paths, image)
    check_curves_on_slices(segments, image, options)
    labels = segment_volume(image, segments, options, device)
    infos = [SegmentInfo(value, s.name, color)
             for value, (s, color) in enumerate(zip(segments, distinct_colors([s.name for s in segments])), start=1)]
    write_labelmap(labels, image, output, infos, overwrite=overwrite)
    result = PromptResult(image, labels, infos, output, time.perf_counter() - began)
    report(result)
    write_preview(image, labels, infos, preview_path, overwrite)
    return result
