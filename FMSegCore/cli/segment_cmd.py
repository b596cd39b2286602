"""``fmseg segment``: segment a scan automatically, without prompts: with an adapter trained by ``fmseg adapt --mode
auto`` (``--adapter``), or with a zoo model that segments its own classes (``--model vista3d``, ``--classes``).

Every input is checked before the model is loaded (options, output, model, classes, weights), so bad input fails
fast with one line; the result is written atomically, never over an existing file without ``--overwrite``, nor
ever over an input file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from FMSegCore.cli import option_args
from FMSegCore.cli.option_args import add_option, modality_name
from FMSegCore.cli.preview import add_preview_option, check_preview, write_preview
from FMSegCore.cli.prompt_cmd import PromptResult, check_not_input, check_output, report
from FMSegCore.errors import InputError, ModelError
from FMSegCore.io.colors import Color, segment_color
from FMSegCore.io.labelmap import SEGMENTATION_SUFFIX, SegmentInfo, write_labelmap
from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.names import closest_names, name_key, split_names
from FMSegCore.options import AutoSegmentation

# torch and MONAI are imported only when a command runs, so that `fmseg --help` starts fast.


@dataclass(frozen=True)
class AutomaticModel:
    """What ``fmseg segment --model`` needs of a model family that segments its own classes: the class names by
    id, the default set, the classes a prompt expands to (as the model's own inference does), the modality it was
    trained on, and ``segment(model, volume, class_ids)``, a KJI label map of class ids on the volume's grid."""

    classes: dict[int, str]
    default: tuple[int, ...]
    subclasses: dict[int, tuple[int, ...]]
    modality: Optional[str]
    segment: Callable[[Any, Volume, Sequence[int]], Any]


def _vista3d() -> AutomaticModel:
    from FMSegCore.models.vista3d import EVERYTHING_CLASSES, SUBCLASSES, VISTA3D_CLASSES, segment_volume

    def segment(model: Any, volume: Volume, class_ids: Sequence[int]) -> Any:
        return segment_volume(model, volume.array, volume.spacing, class_ids, direction=volume.direction)

    return AutomaticModel(VISTA3D_CLASSES, EVERYTHING_CLASSES, SUBCLASSES, "CT", segment)


#: Model families whose models segment their classes automatically (``fmseg segment --model``), by family name:
#: how to get their :class:`AutomaticModel` (imported when used).
AUTOMATIC_FAMILIES: dict[str, Callable[[], AutomaticModel]] = {"vista3d": _vista3d}
#: How many close matches an unknown class name is answered with.


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` to the ``fmseg`` parser."""
    parser = subparsers.add_parser(
        "segment", help="segment a scan automatically (no prompt): with an adapter, or a model's own classes",
        description="Segment a scan without prompts, with exactly one of: --adapter, the structures an automatic "
                    "adapter ('fmseg adapt --mode auto') learned, slice by slice; or --model, the classes of a "
                    f"zoo model that segments automatically ({', '.join(AUTOMATIC_FAMILIES)}; --classes picks "
                    f"them). The output's ending picks the format: {SEGMENTATION_SUFFIX} (names and colours), "
                    ".nii.gz, .nii or .nrrd (label map plus <name>.labels.json).")
    parser.add_argument("--image", required=True, help="the volume (NIfTI, NRRD, MetaImage or DICOM folder)")
    parser.add_argument("--adapter", default=None, help="an adapter file from 'fmseg adapt --mode auto'")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="a zoo model that segments its own classes: vista3d (CT; weights: 'fmseg models fetch "
                             "vista3d --trust-unverified' or 'fmseg models import vista3d FILE')")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="with --model: the classes to segment, by name (any case; quote names with spaces or "
                             "write them with underscores: right_kidney) or id, space- or comma-separated; the "
                             "label values are the model's class ids (default: the model's 'everything' set, "
                             "117 classes for vista3d)")
    parser.add_argument("--output", required=True, help=f"the result ({SEGMENTATION_SUFFIX}, .nii.gz, .nii or .nrrd)")
    add_option(parser, AutoSegmentation, "modality",
               "how to normalise the scan (auto: as the adapter was trained, and a scan that looks like another "
               "modality is refused; --model: the model's modality, CT for vista3d)", type=modality_name)
    add_option(parser, AutoSegmentation, "device", "auto, cpu, cuda, cuda:N or mps")
    add_option(parser, AutoSegmentation, "precision", "auto: bf16/fp16 on CUDA, fp32 on CPU")
    add_preview_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.adapter) == bool(args.model):
        raise InputError(None, "give exactly one of --adapter (an automatic adapter file) and --model (a model that "
                               f"segments its own classes: {', '.join(AUTOMATIC_FAMILIES)})")
    if args.adapter:
        if args.classes:
            raise InputError(None, "--classes goes with --model: an adapter segments the structures it learned")
        segment_to_file(args.image, args.adapter, args.output, args.device, args.precision, args.overwrite,
                        progress=not args.no_progress, modality=args.modality, preview=args.preview)
    else:
        segment_model_to_file(args.image, args.model, args.output, args.classes, args.device, args.precision,
                              args.overwrite, progress=not args.no_progress, modality=args.modality,
                              preview=args.preview)
    return 0


def segment_to_file(image_path: str, adapter_path: str, output: str, device: str = AutoSegmentation.device,
                    precision: str = AutoSegmentation.precision, overwrite: bool = False, progress: bool = True,
                    modality: str = AutoSegmentation.modality, preview: Optional[str] = None) -> PromptResult:
    """What ``fmseg segment --adapter`` does: check, load the adapted model, segment, write atomically, report."""
    option_args.check_options(AutoSegmentation, {"device": device, "precision": precision, "modality": modality})
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.engines.adaptation.adapter_file import load_adapter
    from FMSegCore.engines.adaptation.auto_segment import scan_modality, segment_with_adapter
    from FMSegCore.engines.adaptation.engine import build_adapted
    from FMSegCore.progress import bar_callback, progress_bar

    began = time.perf_counter()
    output_path = check_output(output, overwrite)
    check_not_input(output_path, [image_path, adapter_path])
    preview_path = check_preview(preview, [image_path, adapter_path], overwrite, [output_path])
    adapter = load_adapter(adapter_path)
    if adapter.mode != "auto":
        raise InputError(adapter_path, "this adapter adapts a promptable model: use it with "
                                       "'fmseg prompt --adapter', or train one with --mode auto")
    torch_device = resolve_device(device)
    image = read_volume(image_path)
    modality = scan_modality(image, image_path, adapter.metadata, modality)
    if torch_device.type == "cpu":
        tune_cpu_runtime()
    model = build_adapted(adapter, torch_device)
    structures = adapter.metadata["structures"]
    show = progress
    bar = progress_bar(show, unit="slice", desc="Segmenting")
    try:
        labels = segment_with_adapter(model, adapter.metadata, image, torch_device,
                                      inference_dtype(torch_device, precision),
                                      progress=bar_callback(bar, describe=False), modality=modality)
    finally:
        bar.close()
    infos = [SegmentInfo(int(s["value"]), str(s["name"]), tuple(float(c) for c in s["color"])) for s in structures]
    write_labelmap(labels, image, output_path, infos, overwrite=overwrite)
    result = PromptResult(image, labels, infos, Path(output_path), time.perf_counter() - began)
    report(result)
    write_preview(image, labels, infos, preview_path, overwrite)
    return result


# ------------------------------------------------------------------------------------------------ --model


def automatic_model(name: str) -> AutomaticModel:
    """The :class:`AutomaticModel` of the zoo model ``name``; a model that does not segment automatically (or an
    unknown one) is refused in one line."""
    from FMSegCore.zoo.families import INCONTEXT, PROMPTABLE, family_of, model_kind
    from FMSegCore.zoo.registry import get_card

    card = get_card(name)
    family = family_of(card)
    if family is None or family.name not in AUTOMATIC_FAMILIES:
        kind = model_kind(card)
        use = {PROMPTABLE: f"; prompt it with 'fmseg prompt --model {name}'",
               INCONTEXT: f"; use it with 'fmseg incontext --model {name}'"}.get(kind, "")
        automatic = ", ".join(card.name for card in _automatic_cards())
        raise ModelError(f"model '{name}' is not an automatic-segmentation model (it is {kind}{use}); "
                         f"automatic models: {automatic}")
    return AUTOMATIC_FAMILIES[family.name]()


def _automatic_cards() -> list[Any]:
    from FMSegCore.zoo.families import family_of
    from FMSegCore.zoo.registry import list_cards

    return [card for card in list_cards()
            if (family := family_of(card)) is not None and family.name in AUTOMATIC_FAMILIES]


def resolve_classes(spec: AutomaticModel, requested: Optional[Sequence[str]], model: str = "the model") -> list[int]:
    """Class ids of ``--classes``: names (any case, ``_`` for spaces) or ids, each argument possibly a comma list;
    a merged class (``kidney``) expands to its parts as the model's own inference does; duplicates are dropped,
    the order kept. None or empty: the model's default set. An unknown name is refused in one line with the
    closest names."""
    if not requested:
        return list(spec.default)
    by_name = {name_key(name): value for value, name in spec.classes.items()}
    ids: list[int] = []
    for token in split_names(requested):
        if token.isdigit():
            value = int(token)
            if value not in spec.classes:
                raise InputError(None, f"{model} has no class {value} (its classes are "
                                       f"{min(spec.classes)} to {max(spec.classes)})")
        elif name_key(token) in by_name:
            value = by_name[name_key(token)]
        else:
            raise InputError(None, f"{model} has no class '{token}'; closest: "
                                   f"{', '.join(repr(name) for name in closest_names(token, spec.classes.values()))}")
        for part in spec.subclasses.get(value, (value,)):
            if part not in ids:
                ids.append(part)
    if not ids:
        raise InputError(None, "--classes names no class")
    return ids


def class_segments(spec: AutomaticModel, ids: Sequence[int]) -> list[SegmentInfo]:
    """One segment per class: value = class id, the model's name, a colour (typical anatomy colours, kept apart
    from those of the classes before it)."""
    infos: list[SegmentInfo] = []
    taken: list[Color] = []
    for value in ids:
        name = spec.classes[value]
        color = segment_color(name, value, taken)
        taken.append(color)
        infos.append(SegmentInfo(int(value), name, color))
    return infos


def _check_weights_available(name: str) -> None:
    """A model whose weights FMSeg may not download by itself (no published sha256) and that is not installed is
    refused before anything heavy runs, saying how to install it."""
    from FMSegCore.zoo.cache import cached_path, is_cached
    from FMSegCore.zoo.registry import get_card

    card = get_card(name)
    if card.sha256 is None and not is_cached(card):
        licence = f" (licence: {card.licence})" if card.restricted_licence else ""
        raise ModelError(f"model {name} is not installed ({cached_path(card)}): get it with 'fmseg models fetch "
                         f"{name} --trust-unverified' or 'fmseg models import {name} FILE'{licence}")


def segment_model_to_file(image_path: str, model_name: str, output: str, classes: Optional[Sequence[str]] = None,
                          device: str = AutoSegmentation.device, precision: str = AutoSegmentation.precision,
                          overwrite: bool = False, progress: bool = True,
                          modality: str = AutoSegmentation.modality, preview: Optional[str] = None) -> PromptResult:
    """What ``fmseg segment --model`` does: check everything (options, output, model, classes, weights, the scan's
    modality), load the zoo model, segment its classes, write atomically, report."""
    option_args.check_options(AutoSegmentation, {"device": device, "precision": precision, "modality": modality})
    began = time.perf_counter()
    output_path = check_output(output, overwrite)
    check_not_input(output_path, [image_path])
    preview_path = check_preview(preview, [image_path], overwrite, [output_path])
    spec = automatic_model(model_name)
    if spec.modality and modality not in ("auto", spec.modality):
        raise InputError(None, f"model {model_name} segments {spec.modality} only (--modality {modality})")
    ids = resolve_classes(spec, classes, model_name)
    _check_weights_available(model_name)

    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
    from FMSegCore.models.factory import load_model
    from FMSegCore.preprocessing.intensity import guess_modality

    torch_device = resolve_device(device)
    image = read_volume(image_path)
    if spec.modality and modality == "auto" and guess_modality(image) != spec.modality:
        raise InputError(image_path, f"this scan looks like {guess_modality(image)} but model {model_name} segments "
                                     f"{spec.modality} only; pass --modality {spec.modality} to segment it anyway")
    show = progress  # status lines on a terminal and in logs alike
    if torch_device.type == "cpu":
        tune_cpu_runtime()
    if show:
        print(f"Loading {model_name} on {torch_device}...", file=sys.stderr, flush=True)
    model = load_model(model_name, torch_device)
    if show:
        print(f"Segmenting {len(ids)} class{'es' * (len(ids) != 1)}...", file=sys.stderr, flush=True)
    with _autocast(torch_device, inference_dtype(torch_device, precision)):
        labels = spec.segment(model, image, ids)
    infos = class_segments(spec, ids)
    write_labelmap(labels, image, output_path, infos, overwrite=overwrite)
    result = PromptResult(image, labels, infos, Path(output_path), time.perf_counter() - began)
    report(result)
    write_preview(image, labels, infos, preview_path, overwrite)
    return result


def _autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=dtype)
