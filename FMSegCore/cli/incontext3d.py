"""The 3-D in-context path of ``fmseg incontext`` and what ``fmseg task create`` does.

A 3-D in-context model (``iris-fmseg``) turns labelled reference volumes into a *task* (one embedding per class,
:mod:`FMSegCore.engines.incontext.volume3d`) that segments every class of a new volume in one pass. The task is
built from ``--support`` pairs on the fly, or read from a task file (``--task``, made by ``fmseg task create``,
:mod:`FMSegCore.engines.incontext.task_file`), which applies with the model it was made for.

Every input is read and checked before the model is loaded; results are written atomically, never over an
existing file without ``overwrite`` and never over an input. Heavy modules (torch, SimpleITK) are imported inside
the functions, so ``fmseg --help`` stays fast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from FMSegCore.cli import option_args
from FMSegCore.cli.preview import check_preview, write_preview
from FMSegCore.cli.prompt_cmd import PromptResult, check_not_input, check_output, report
from FMSegCore.engines.incontext.task_file import TASK_SUFFIX
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo, write_labelmap
from FMSegCore.io.volume import VOLUME_SUFFIXES, PathLike, Volume, read_volume, write_volume
from FMSegCore.options import InContext
from FMSegCore.zoo.families import INCONTEXT, model_dims, require_kind
from FMSegCore.zoo.registry import DEFAULT_INCONTEXT_3D

if TYPE_CHECKING:
    from FMSegCore.cli.incontext_cmd import InContextOptions
    from FMSegCore.engines.incontext.support import SupportScan
    from FMSegCore.engines.incontext.task_file import TaskMetadata
    from FMSegCore.engines.incontext.volume3d import BuiltTask


def check_result_paths(output: PathLike, uncertainty: Optional[PathLike], preview: Optional[PathLike],
                       inputs: Sequence[PathLike], overwrite: bool) -> tuple[Path, Optional[Path], Optional[Path]]:
    """What ``fmseg incontext`` writes (the result, the optional uncertainty map and preview), checked before any
    work: known endings, no existing file without ``overwrite``, never an input, two different names."""
    output = check_output(output, overwrite)
    check_not_input(output, inputs)
    if uncertainty is not None:
        uncertainty = check_output(uncertainty, overwrite, VOLUME_SUFFIXES)
        check_not_input(uncertainty, inputs)
        if Path(uncertainty).resolve() == Path(output).resolve():
            raise InputError(uncertainty, "the uncertainty map and the result need different file names")
    return output, uncertainty, check_preview(preview, inputs, overwrite, [output, uncertainty])


def is_3d_model(name: Optional[str]) -> bool:
    """Whether the zoo model ``name`` is a 3-D model (an unknown name is a one-line ModelError)."""
    if name is None:
        return False
    from FMSegCore.zoo.registry import get_card

    return model_dims(get_card(name)) == 3


def _check_settings(modality: str, window: Any, device: str, precision: str = "auto") -> None:
    from FMSegCore.preprocessing.intensity import ct_window

    option_args.check_options(InContext, {"modality": modality, "window": window, "device": device,
                                          "precision": precision})
    ct_window(window)


def _show(progress: Optional[bool]) -> bool:
    from FMSegCore.progress import show_progress

    return show_progress(progress)


def _load(name: str, device_name: str, precision: str, show: bool):
    """The model on its device, and the autocast dtype of ``precision``."""
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.models.factory import load_model

    device = resolve_device(device_name)
    if device.type == "cpu":
        tune_cpu_runtime()
    if show:
        print(f"Loading {name} on {device}...", file=sys.stderr, flush=True)
    return load_model(name, device), inference_dtype(device, precision)


def read_supports(supports: Sequence[tuple[PathLike, PathLike]], labels: Optional[Sequence[Union[str, int]]],
                  modality: str, window: Any) -> tuple[list[SupportScan], list[SegmentInfo]]:
    """The support scans (each label map checked against its image's grid) and the classes asked for (by name
    or value; default: every label of the supports)."""
    from FMSegCore.engines.incontext.support import SupportSet, read_support_scan

    if not supports:
        raise InputError(None, "no support examples: give at least one --support IMAGE LABELS pair")
    scans = [read_support_scan(image, label_map) for image, label_map in supports]
    classes = SupportSet([scan.example(modality, window) for scan in scans]).resolve(labels)
    return scans, classes


def build_task(model: Any, scans: Sequence[SupportScan], classes: Sequence[SegmentInfo], modality: str,
               window: Any) -> BuiltTask:
    """The task of ``classes`` from the support scans (:func:`~FMSegCore.engines.incontext.volume3d.build_task`)."""
    from FMSegCore.engines.incontext.volume3d import build_task as build

    return build(model, scans, classes, modality, window)


def task_metadata(model_name: str, model: Any, built: BuiltTask, modality: str, window: Any) -> TaskMetadata:
    """The metadata a task file keeps about ``built`` (:func:`~FMSegCore.engines.incontext.task_file.task_metadata`)."""
    from FMSegCore.engines.incontext.task_file import task_metadata as metadata

    return metadata(model_name, model, built, modality, window)


def task_to_file(supports: Sequence[tuple[PathLike, PathLike]], output: PathLike,
                 labels: Optional[Sequence[Union[str, int]]] = None, model: str = DEFAULT_INCONTEXT_3D,
                 modality: str = InContext.modality, window: Any = InContext.window, device: str = "auto",
                 overwrite: bool = False, progress: Optional[bool] = None) -> Path:
    """What ``fmseg task create`` does: check everything, encode the supports' classes, write the task file
    atomically, print what it holds."""
    from FMSegCore.engines.incontext.task_file import save_task

    began = time.perf_counter()
    output = check_output(output, overwrite, (TASK_SUFFIX,))
    check_not_input(output, [path for pair in supports for path in pair])
    _check_settings(modality, window, device)
    require_kind(model, INCONTEXT, dims=3)
    scans, classes = read_supports(supports, labels, modality, window)
    show = _show(progress)
    network, _ = _load(model, device, "fp32", show)
    if show:
        print(f"Encoding {len(classes)} class{'es' * (len(classes) != 1)} from {len(scans)} "
              f"reference{'s' * (len(scans) != 1)}...", file=sys.stderr, flush=True)
    built = build_task(network, scans, classes, modality, window)
    save_task(output, built.task, task_metadata(model, network, built, modality, window), overwrite=overwrite)
    for segment, voxels in zip(built.classes, built.class_weights):
        print(f"{segment.value:>3}  {segment.name}  ({int(voxels):,} reference voxels at the model's spacing)")
    print(f"Wrote {output} (task for {model}: {len(built.classes)} class{'es' * (len(built.classes) != 1)}, "
          f"{len(scans)} reference{'s' * (len(scans) != 1)}) in {time.perf_counter() - began:.1f} s")
    return output


def incontext3d_to_file(image_path: PathLike, supports: Sequence[tuple[PathLike, PathLike]],
                        task_path: Optional[PathLike], output: PathLike, options: InContextOptions,
                        labels: Optional[Sequence[Union[str, int]]] = None, uncertainty: Optional[PathLike] = None,
                        overwrite: bool = False, preview: Optional[PathLike] = None) -> PromptResult:
    """``fmseg incontext`` with a 3-D in-context model: the task from ``task_path`` (with its own model; a
    different ``options.model`` is refused) or built from ``supports`` with ``options.model``; applied to the
    image; the labels (and the uncertainty map, the softmax's normalised entropy) written on the image's grid."""
    from FMSegCore.engines.incontext.task_file import load_task
    from FMSegCore.engines.incontext.volume3d import apply_task, check_query_modality, modality_of

    began = time.perf_counter()
    if (task_path is None) == (not supports):
        raise InputError(None, "give either --support IMAGE LABELS (one or more) or --task FILE, not both")
    inputs = [image_path, *(path for pair in supports for path in pair), *([task_path] if task_path else [])]
    output, uncertainty, preview = check_result_paths(output, uncertainty, preview, inputs, overwrite)
    if options.method != "model":
        raise InputError(None, f"--method {options.method} works with 2-D in-context models only")
    _check_settings(options.modality, options.window, options.device, options.precision)
    if task_path is not None:
        task, metadata = load_task(task_path, model=options.model, classes=labels)
        model_name, classes = metadata.model, metadata.classes
        require_kind(model_name, INCONTEXT, dims=3)
        scans: list[SupportScan] = []
    else:
        model_name = options.model or DEFAULT_INCONTEXT_3D
        require_kind(model_name, INCONTEXT, dims=3)
        scans, classes = read_supports(supports, labels, options.modality, options.window)
    image = read_volume(image_path)
    references = ([modality_of(scan.volume, options.modality) for scan in scans] if scans
                  else metadata.modality.split("+"))
    check_query_modality(references, image, options.modality, options.cross_modality)
    show = _show(options.progress)
    model, dtype = _load(model_name, options.device, options.precision, show)
    if scans:
        if show:
            print(f"Encoding {len(classes)} class{'es' * (len(classes) != 1)} from {len(scans)} "
                  f"reference{'s' * (len(scans) != 1)}...", file=sys.stderr, flush=True)
        task = build_task(model, scans, classes, options.modality, options.window).task
    result = _apply(model, task, image, classes, options, show, uncertainty is not None, dtype, apply_task)
    write_labelmap(result.labels, image, output, classes, overwrite=overwrite)
    if uncertainty is not None and result.uncertainty is not None:
        write_volume(image.with_array(result.uncertainty), uncertainty)
    done = PromptResult(image, result.labels, list(classes), Path(output), time.perf_counter() - began)
    report(done)
    if uncertainty is not None:
        print(f"Wrote {uncertainty} (uncertainty: normalised entropy of the model's class probabilities)")
    write_preview(image, result.labels, classes, preview, overwrite)
    return done


def _apply(model: Any, task: Any, image: Volume, classes: Sequence[SegmentInfo], options: InContextOptions,
           show: bool, uncertainty: bool, dtype: Any, apply_task: Any) -> Any:
    from FMSegCore.progress import bar_callback, progress_bar

    bar = progress_bar(show, unit="window", desc="Segmenting")
    try:
        return apply_task(model, task, image, classes, options.modality, options.window,
                          progress=bar_callback(bar), uncertainty=uncertainty, autocast_dtype=dtype)
    finally:
        bar.close()
