"""``fmseg incontext``: segment a query scan like labelled examples (a support set), with no training.

Supports from other scans are aligned to the query in physical space first (``--match anatomy``, what ``auto``
picks for them); supports on the query's own grid (labelled slices of the same scan) and 2-D examples keep
matching by relative slice position (``index``). ``--method registration`` gives the registration baseline:
the supports' labels warped onto the query. Every input is read and checked before the model is loaded; the
result (and the optional uncertainty map and preview) is written atomically, never over an existing file
without ``--overwrite``, and never over an input.

A 3-D in-context model (``--model iris-fmseg``) or a task file (``--task``, from ``fmseg task create``) takes the
3-D path instead (:mod:`FMSegCore.cli.incontext3d`): one task per run, applied to the whole volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from FMSegCore.cli import option_args
from FMSegCore.cli.option_args import add_option, modality_name
from FMSegCore.cli.preview import add_preview_option, write_preview
from FMSegCore.cli.prompt_cmd import AXES, PromptResult, report
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SEGMENTATION_SUFFIX, SegmentInfo, write_labelmap
from FMSegCore.io.volume import PathLike, Volume, read_volume, write_volume
from FMSegCore.options import InContext
from FMSegCore.zoo.families import INCONTEXT, require_kind

if TYPE_CHECKING:
    from FMSegCore.engines.incontext.anatomical import AlignedQuery
    from FMSegCore.engines.incontext.session import InContextResult
    from FMSegCore.engines.incontext.support import SupportScan
    from FMSegCore.prompts import SegmentPrompts

METHODS = ("model", "registration")


@dataclass
class InContextOptions:
    """Model, device and the session's settings (defaults: :class:`FMSegCore.options.InContext`'s), and the
    command's own: the method, the B-spline refinement and the progress bar."""

    model: Optional[str] = InContext.model  # None: the default (with a task file: the task's own model)
    device: str = InContext.device
    axis: str = InContext.axis
    support_size: int = InContext.support_size
    ensemble: int = InContext.ensemble
    candidates: int = InContext.candidates
    tolerance: float = InContext.tolerance
    modality: str = InContext.modality
    window: str = InContext.window
    precision: str = InContext.precision
    seed: int = InContext.seed
    progress: Optional[bool] = None
    match: str = InContext.match
    method: str = "model"
    prior_margin_mm: Optional[float] = InContext.prior_margin_mm  # None: no spatial prior
    deformable: bool = False
    cross_modality: bool = InContext.cross_modality
    registration_weight: float = InContext.registration_weight


class _ModelGiven(argparse.Action):
    """Stores --model and notes that it was given (with --task, only a --model given is checked against the
    task's own model)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        setattr(namespace, self.dest, values)
        namespace.model_given = True


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "incontext", help="segment a scan like a few labelled examples (support set), no training",
        description="Segment the structures labelled in the support examples (all of them, or those named by "
                    "--labels) in the query image. Supports from other scans are first aligned to the query "
                    "(registration in world coordinates), then each class is predicted slice by slice with "
                    "the support slices at the same anatomical position, near where the aligned labels put "
                    "it. The output keeps the support's label values and names "
                    f"({SEGMENTATION_SUFFIX}, or a label map plus <name>.labels.json).")
    parser.add_argument("--image", required=True, help="the query volume (NIfTI, NRRD, MetaImage or DICOM folder)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                       help="a labelled example: image and label map (.seg.nrrd, or NIfTI/NRRD with a "
                            "labels.json beside it); repeat for more examples")
    given.add_argument("--task", default=None, metavar="FILE",
                       help="a task file (fmseg task create) instead of --support: applied with the 3-D "
                            "in-context model it was made for")
    parser.add_argument("--output", required=True, help=f"the result ({SEGMENTATION_SUFFIX}, .nii.gz, .nii or .nrrd)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME|VALUE",
                        help="structures to segment, by name or label value (default: every support label)")
    add_option(parser, InContext, "model",
               "zoo model: a 2-D one segments slice by slice; a 3-D one (iris-fmseg) builds one task from the "
               "supports and segments the whole volume; with --task, the task's own model", action=_ModelGiven)
    add_option(parser, InContext, "support_size", "support slices per query slice")
    add_option(parser, InContext, "ensemble", "average this many predictions from different support subsets")
    parser.add_argument("--corrections", nargs="+", default=None, metavar="MARKUPS",
                        help="interactive models (multiverseg): Slicer markups (.mrk.json) of clicks, scribbles, "
                             "lassos or 2-D boxes named after the classes they correct (exclude: description "
                             "'exclude'); each slice holding some is predicted again with them (--match index)")
    add_option(parser, InContext, "candidates",
               "stochastic models (tyche): draw K plausible segmentations, each written beside the output as "
               "NAME.candidateK (their spread is the uncertainty map); 0: none")
    parser.add_argument("--uncertainty", default=None, metavar="VOLUME",
                        help="also write the per-voxel uncertainty (2-D models: spread of the ensemble, needs "
                             "--ensemble >= 2; 3-D models: normalised entropy of the class probabilities)")
    add_option(parser, InContext, "axis", "slicing direction")
    parser.add_argument("--method", default="model", choices=METHODS,
                        help="model: the in-context model (default); registration: the supports' labels warped "
                             "onto the query by the alignment (multi-atlas baseline, no model)")
    add_option(parser, InContext, "match",
               "how support slices are matched to query slices: anatomy (align each support to the query, then "
               "match by position in mm), index (by relative slice position: right only for supports covering the "
               "query's field of view), auto (index for 2-D examples and supports on the query's own grid, else "
               "anatomy)")
    add_option(parser, InContext, "prior_margin_mm",
               "with anatomy matching, keep a structure only within this distance of where the aligned supports "
               "put it (0: no spatial prior)", metavar="MM")
    add_option(parser, InContext, "registration_weight",
               "with anatomy matching, mix the aligned supports' labels into the model's probabilities: "
               "(1 - W) model + W labels (0: the model alone)", metavar="W")
    parser.add_argument("--deformable", action="store_true",
                        help="refine each alignment with a coarse B-spline (kept only when it improves the fit)")
    add_option(parser, InContext, "cross_modality",
               "run the model although a support's modality (CT/MR) differs from the query's (refused by "
               "default: the model is weak there; --method registration is not)")
    add_option(parser, InContext, "tolerance",
               "index matching: how far (fraction of the axis) a support slice may lie from the query slice's "
               "relative position")
    add_preview_option(parser)
    add_option(parser, InContext, "modality", "intensity normalisation (auto: guessed from each image)",
               type=modality_name)
    add_option(parser, InContext, "window", "CT window: abdomen, lung or bone")
    add_option(parser, InContext, "precision", "auto: bf16/fp16 on CUDA, fp32 on CPU")
    add_option(parser, InContext, "device", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    add_option(parser, InContext, "seed", "seed of the ensemble's support subsets")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = args.model if getattr(args, "model_given", False) or not args.task else None
    options = InContextOptions(
        model=model, device=args.device, axis=args.axis, support_size=args.support_size,
        ensemble=args.ensemble, candidates=args.candidates, tolerance=args.tolerance, modality=args.modality, window=args.window,
        precision=args.precision, seed=args.seed, progress=False if args.no_progress else None,
        match=args.match, method=args.method, prior_margin_mm=args.prior_margin_mm or None,
        deformable=args.deformable, cross_modality=args.cross_modality,
        registration_weight=args.registration_weight)
    incontext_to_file(args.image, [tuple(pair) for pair in args.support or ()], args.output, labels=args.labels,
                      uncertainty=args.uncertainty, options=options, overwrite=args.overwrite,
                      corrections=args.corrections,
                      preview=args.preview, task=args.task)
    return 0


def _check_options(options: InContextOptions, uncertainty: Optional[PathLike]) -> None:
    from FMSegCore.preprocessing.intensity import ct_window

    option_args.check_options(InContext, {**vars(options), "uncertainty": uncertainty is not None,
                                          "prior_margin_mm": options.prior_margin_mm or 0.0})
    require_kind(options.model, INCONTEXT, dims=2)
    ct_window(options.window)
    if uncertainty is not None and options.ensemble < 2 and not options.candidates:
        raise InputError(uncertainty, "an uncertainty map needs --ensemble 2 or more, or --candidates K")
    if options.method not in METHODS:
        raise InputError(None, f"unknown method {options.method!r} (use {', '.join(METHODS)})")


def incontext_to_file(image_path: PathLike, supports: Sequence[tuple[PathLike, PathLike]], output: PathLike,
                      labels: Optional[Sequence[Union[str, int]]] = None, uncertainty: Optional[PathLike] = None,
                      options: Optional[InContextOptions] = None, overwrite: bool = False,
                      preview: Optional[PathLike] = None, task: Optional[PathLike] = None,
                      corrections: Optional[Sequence[PathLike]] = None) -> PromptResult:
    """What ``fmseg incontext`` does: check everything, align, segment, write atomically, print a report.
    ``corrections``: markups files of prompts (named by class) that an interactive model applies afterwards.

    Exactly one of ``supports`` and ``task`` (a task file). A task file, or a 3-D in-context ``options.model``,
    goes the 3-D way (:func:`FMSegCore.cli.incontext3d.incontext3d_to_file`); with a task file
    ``options.model`` must be None (the default when ``options`` is not given) or the task's model."""
    from FMSegCore.cli.incontext3d import check_result_paths, incontext3d_to_file, is_3d_model
    from FMSegCore.engines.incontext.support import SupportSet, read_support_scan

    began = time.perf_counter()
    if (task is None) == (not supports):
        raise InputError(None, "give either --support IMAGE LABELS (one or more) or --task FILE, not both")
    options = options or InContextOptions(model=None if task is not None else InContext.model)
    if task is not None or is_3d_model(options.model):
        return incontext3d_to_file(image_path, supports, task, output, options, labels=labels,
                                   uncertainty=uncertainty, overwrite=overwrite, preview=preview)
    if options.model is None:
        options = replace(options, model=InContext.model)
    inputs = [image_path, *(path for pair in supports for path in pair)]
    output, uncertainty, preview = check_result_paths(output, uncertainty, preview, inputs, overwrite)
    candidate_paths = candidate_outputs(output, options.candidates, [*inputs, uncertainty, preview], overwrite)
    _check_options(options, uncertainty)
    image = read_volume(image_path)
    scans = [read_support_scan(image_file, labels_file) for image_file, labels_file in supports]
    classes = SupportSet([scan.example(options.modality, options.window) for scan in scans]).resolve(labels)
    from FMSegCore.engines.incontext.anatomical import choose_match

    match = choose_match(options.match, image, [scan.volume for scan in scans])
    if options.method == "registration" and match != "anatomy":
        raise InputError(None, "--method registration needs supports from other scans (--match anatomy)")
    prompts = _corrections(corrections, image, options, match, classes)
    result = (_segment_by_index(image, scans, classes, options, uncertainty is not None, prompts) if match == "index"
              else _segment_by_anatomy(image, scans, classes, options, uncertainty is not None))
    write_labelmap(result.labels.astype("uint16"), image, output, result.segments, overwrite=overwrite)
    for path, drawn in zip(candidate_paths, result.candidates):
        write_labelmap(drawn.astype("uint16"), image, path, result.segments, overwrite=overwrite)
    if uncertainty is not None and result.uncertainty is not None:
        write_volume(image.with_array(result.uncertainty.astype("float32")), uncertainty)
    done = PromptResult(image, result.labels, result.segments, output, time.perf_counter() - began)
    report(done)
    if candidate_paths:
        print(f"Wrote {len(candidate_paths)} candidate segmentations: {candidate_paths[0]} ... {candidate_paths[-1]}")
    if uncertainty is not None:
        drawn = f" x {options.candidates} candidates" if options.candidates else ""
        print(f"Wrote {uncertainty} (uncertainty: spread of {options.ensemble} ensemble member(s){drawn})")
    write_preview(image, result.labels, result.segments, preview, overwrite)
    return done


def candidate_outputs(output: Path, count: int, others: Sequence[Optional[PathLike]], overwrite: bool) -> list[Path]:
    """``NAME.candidate1.<ending>`` ... beside the output, checked like it (:func:`check_output`: no file in
    the way, its ``.labels.json`` included, unless ``overwrite``), and none of ``others`` (inputs and results)."""
    from FMSegCore.cli.prompt_cmd import check_not_input, check_output
    from FMSegCore.io.atomic import file_ending

    output = Path(output)
    ending = file_ending(output)
    stem = output.name[:len(output.name) - len(ending)]
    paths = [check_output(output.with_name(f"{stem}.candidate{k}{ending}"), overwrite) for k in range(1, count + 1)]
    for path in paths:
        check_not_input(path, [p for p in others if p is not None])
    return paths


def _progress_bar(show: bool):
    """A tqdm bar and the callback that shows the segmentation's progress on it (the segment's name as its
    description)."""
    from FMSegCore.progress import bar_callback, progress_bar

    bar = progress_bar(show, unit="block", desc="Segmenting")
    return bar, bar_callback(bar)


def _model(options: InContextOptions, show: bool):
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.models.factory import load_model

    device = resolve_device(options.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    if show:
        print(f"Loading {options.model} on {device}...", file=sys.stderr, flush=True)
    return load_model(options.model, device), device, inference_dtype(device, options.precision)


def _settings(options: InContextOptions):
    from FMSegCore.engines.incontext.session import settings_from_options

    return settings_from_options(options)


def _show(options: InContextOptions) -> bool:
    from FMSegCore.progress import show_progress

    return show_progress(options.progress)


def _corrections(paths: Optional[Sequence[PathLike]], image: Volume, options: InContextOptions,
                 match: str, classes: Sequence[SegmentInfo]) -> list[SegmentPrompts]:
    """The correction prompts, checked before any work (against the query, the classes and the slicing axis),
    or none; they need an interactive model and the query's own slices (index matching)."""
    if not paths:
        return []
    from FMSegCore.io.markups import load_prompts
    from FMSegCore.zoo.families import family_of
    from FMSegCore.zoo.registry import get_card

    family = family_of(get_card(str(options.model)))
    if family is None or "InteractiveInContextModel2D" not in family.implements:
        raise InputError(paths[0], f"corrections need an interactive in-context model (multiverseg), not "
                                   f"{options.model}")
    if match != "index" or options.method != "model":
        raise InputError(paths[0], "corrections are applied on the query's own slices: use --match index")
    from FMSegCore.engines.incontext.corrections import check_corrections
    from FMSegCore.io.orientation import anatomical_axes

    prompts = load_prompts(paths, image)
    check_corrections(prompts, classes, anatomical_axes(image.direction)[AXES[options.axis]], image.array.shape)
    return prompts


def _segment_by_index(image: Volume, scans: Sequence[SupportScan], classes: Sequence[SegmentInfo],
                      options: InContextOptions, uncertainty: bool,
                      corrections: Sequence[SegmentPrompts] = ()) -> InContextResult:
    """The query sliced as it is, supports matched by relative slice position; then the corrections."""
    from FMSegCore.engines.incontext.session import InContextSession
    from FMSegCore.engines.incontext.support import SupportSet
    from FMSegCore.io.orientation import anatomical_axes

    show = _show(options)
    model, device, dtype = _model(options, show)
    support = SupportSet([scan.example(options.modality, options.window) for scan in scans])
    axis = anatomical_axes(image.direction)[AXES[options.axis]]
    session = InContextSession(model, support, [c.value for c in classes], axis=axis, settings=_settings(options),
                               device=device, autocast_dtype=dtype, modality=options.modality,
                               window=options.window)
    bar, progress = _progress_bar(show)
    try:
        result = session.segment_volume(image.array, uncertainty=uncertainty, progress=progress,
                                        keep_probabilities=bool(corrections))
    finally:
        bar.close()
    if corrections:
        from FMSegCore.engines.incontext.corrections import correct_result

        count = correct_result(session, session.normalise(image.array), result, corrections)
        print(f"Corrected {count} slice(s) with the prompts of {', '.join(p.name for p in corrections)}")
    return result


def _segment_by_anatomy(image: Volume, scans: Sequence[SupportScan], classes: Sequence[SegmentInfo],
                        options: InContextOptions, uncertainty: bool) -> InContextResult:
    """Supports aligned to the query first: the model on the common work grid, or the registration baseline."""
    from FMSegCore.engines.incontext.anatomical import AnatomicalSettings, align_supports, registration_labels
    from FMSegCore.engines.incontext.session import InContextResult

    show = _show(options)
    anatomical = AnatomicalSettings(prior_margin_mm=options.prior_margin_mm, deformable=options.deformable,
                                    allow_cross_modality=options.cross_modality,
                                    registration_weight=options.registration_weight)
    if options.method == "registration":
        if uncertainty:
            raise InputError(None, "--method registration gives no uncertainty map (use the model with --ensemble)")
        began = time.perf_counter()
        aligned = align_supports(image, scans, 128, options.axis, options.modality, options.window, anatomical)
        _report_alignments(scans, aligned)
        labels = registration_labels(image, scans, aligned, classes)
        return InContextResult(labels, list(classes), seconds=time.perf_counter() - began)
    from FMSegCore.engines.incontext.anatomical import AnatomicalInContext

    model, device, dtype = _model(options, show)
    engine = AnatomicalInContext(model, scans, [c.value for c in classes], options.axis, _settings(options),
                                 anatomical, device, dtype, options.modality, options.window)
    if show:
        print(f"Aligning {len(scans)} support{'s' * (len(scans) != 1)} to the query...", file=sys.stderr,
              flush=True)
    aligned = engine.align(image)
    _report_alignments(scans, aligned, model=True)
    bar, progress = _progress_bar(show)
    try:
        result, _ = engine.segment(image, uncertainty=uncertainty, progress=progress, aligned=aligned)
    finally:
        bar.close()
    return result


def _report_alignments(scans: Sequence[SupportScan], aligned: AlignedQuery, model: bool = False) -> None:
    query_modality = aligned.notes["query_modality"]
    for scan, alignment, modality in zip(scans, aligned.alignments, aligned.notes["support_modalities"]):
        print(f"Aligned {scan.source}: {alignment.describe()} ({'+'.join(alignment.stages)}, "
              f"{alignment.seconds:.1f} s)")
        if model and modality != query_modality:
            print(f"Note: {scan.source} is {modality} and the query {query_modality}: the model compares "
                  "appearances across modalities and is weaker there (compare with --method registration)")
