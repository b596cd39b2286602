"""The settings of prompting, in-context segmentation, adaptation and automatic segmentation: each option's name,
type, default, choices and range, defined once.

Each option set is a dataclass whose field defaults are the defaults (``InContext.support_size`` is 8) and whose
annotations carry the choices (``Literal``) and ranges (:class:`Range`). The worker's request bodies are pydantic
models built from them (:func:`FMSegCore.server.fields.options_model`, whose strict rules validate them), ``fmseg``
builds its options from them and validates the parsed values with those models (:mod:`FMSegCore.cli.option_args`),
and the Slicer module takes its parameter node's defaults and ranges from them.

Plain Python: neither torch nor pydantic is imported, so Slicer's Python reads this module before the worker's
packages are installed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from FMSegCore.zoo.registry import DEFAULT_INCONTEXT, DEFAULT_INCONTEXT_3D, DEFAULT_PROMPTABLE

#: Adaptation: the methods as a user is offered them (the recommended one first), and the modes. The engines'
#: own rules about them (which methods adapt the encoder, each one's steps) are in
#: :mod:`FMSegCore.engines.adaptation.defaults`.
METHOD_CHOICES = ("decoder", "spatial-adapter", "linear-probe", "lora", "arena", "bitfit", "affine", "adaptformer",
                  "full")
MODES = ("auto", "prompt")
DEFAULT_RANK = 4
#: The largest rank of low-rank methods (LoRA, ARENA) anyone is offered: the CLI, the worker and the panel.
MAX_RANK = 64
#: Auto mode: the pixel size (mm) slices are resampled to, and the augmented training views encoded.
DEFAULT_PIXEL_MM = 1.5
DEFAULT_VIEWS = 48


@dataclass(frozen=True)
class Range:
    """The inclusive range of a numeric option."""

    low: float
    high: float


@dataclass(frozen=True)
class DeviceName:
    """A device option: auto, cpu, cuda, cuda:N or mps (any case); ``empty``, when given, says what an empty
    name means (the worker's own device) and allows it."""

    empty: Optional[str] = None

    def problem(self, name: str) -> Optional[str]:
        """What is wrong with ``name`` (``must be ...``), or None."""
        if (name == "" and self.empty) or re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name.lower()):
            return None
        return "must be auto, cpu, cuda, cuda:N or mps" + (f" (empty: {self.empty})" if self.empty else "")


#: Slicing directions, in the order of the anatomical axes (L-R, A-P, S-I): slices perpendicular to the axis.
Axis = Literal["sagittal", "coronal", "axial"]
Context = Literal["auto", "crop", "full"]
Modality = Literal["auto", "CT", "MR"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: How in-context supports are matched to the query's slices (anatomy: aligned first; index: relative position).
Match = Literal["auto", "anatomy", "index"]
Mode = Literal[MODES]  # type: ignore[valid-type]
Method = Literal[METHOD_CHOICES]  # type: ignore[valid-type]
Device = Annotated[str, DeviceName()]
Seed = Annotated[int, Range(0, 2 ** 32 - 1)]

AXES: tuple[str, ...] = get_args(Axis)
#: Slicing directions by name -> the anatomical axis (0 L-R, 1 A-P, 2 S-I) slices are across.
AXIS_INDEX: dict[str, int] = {name: index for index, name in enumerate(AXES)}
MODALITIES: tuple[str, ...] = get_args(Modality)
PRECISIONS: tuple[str, ...] = get_args(Precision)
MATCHES: tuple[str, ...] = get_args(Match)
#: The devices offered by name (the panel's list; cuda:N is accepted too).
DEVICES = ("auto", "cuda", "cpu", "mps")

#: In-context, anatomy matching: the distance (mm) from the aligned support labels beyond which a class is not
#: looked for (0: no spatial prior).
PRIOR_MARGIN_MM = 20.0
#: In-context, anatomy matching: the weight of the warped support labels mixed into the model's probabilities
#: (chosen on the development scenarios, ``fmseg bench incontext --cross --margins``, where 0.5 beat the model
#: alone: ``Resources/Benchmarks/incontext_cross_dev_cpu.json``).
REGISTRATION_WEIGHT = 0.5


@dataclass
class Prompting:
    """A prompt session: ``fmseg prompt``, the worker's sessions, the panel's prompts."""

    model: str = DEFAULT_PROMPTABLE
    axis: Axis = "axial"
    context: Context = "auto"
    modality: Modality = "auto"
    window: Optional[str] = None  # CT window preset; None: the session's choice per segment
    three_planes: bool = False  # 2-D models: also propagate along the two other axes and vote (experimental)
    precision: Precision = "auto"
    device: Device = "auto"


@dataclass
class InContext:
    """In-context segmentation from a support set: ``fmseg incontext``, the worker's incontext jobs, the panel."""

    model: str = DEFAULT_INCONTEXT
    support_size: Annotated[int, Range(1, 64)] = 8
    ensemble: Annotated[int, Range(1, 16)] = 1
    candidates: Annotated[int, Range(0, 32)] = 0  # stochastic models (tyche): candidate segmentations drawn
    tolerance: Annotated[float, Range(1e-3, 1.0)] = 0.05
    seed: Seed = 0
    uncertainty: bool = False
    axis: Axis = "axial"
    modality: Modality = "auto"
    window: str = "abdomen"
    match: Match = "auto"
    prior_margin_mm: Annotated[float, Range(0.0, 500.0)] = PRIOR_MARGIN_MM
    cross_modality: bool = False
    registration_weight: Annotated[float, Range(0.0, 1.0)] = REGISTRATION_WEIGHT
    precision: Precision = "auto"
    device: Device = "auto"


@dataclass
class TaskCreation:
    """A task of a 3-D in-context model (one embedding per structure) from labelled references: ``fmseg task
    create``, the worker's task jobs, the panel's "Save task"."""

    model: str = DEFAULT_INCONTEXT_3D
    modality: Modality = "auto"
    window: str = "abdomen"
    device: Device = "auto"


@dataclass
class Adaptation:
    """Adaptation to labelled cases: ``fmseg adapt``, the worker's adapt jobs, the panel. None: the mode's and
    method's default (``FMSegCore.engines.adaptation.defaults``)."""

    model: str = DEFAULT_PROMPTABLE
    mode: Mode = "auto"
    method: Optional[Method] = None
    rank: Annotated[int, Range(1, MAX_RANK)] = DEFAULT_RANK
    steps: Annotated[Optional[int], Range(1, 100_000)] = None
    batch_size: Annotated[Optional[int], Range(1, 256)] = None
    lr: Annotated[Optional[float], Range(0.0, 10.0)] = None
    seed: Seed = 0
    holdout: Annotated[int, Range(0, 255)] = 0
    whole_slice: bool = False
    pixel_mm: Annotated[float, Range(0.05, 20.0)] = DEFAULT_PIXEL_MM
    views: Annotated[int, Range(1, 10_000)] = DEFAULT_VIEWS
    axis: Axis = "axial"
    modality: Modality = "auto"
    window: str = "abdomen"
    precision: Precision = "auto"
    device: Device = "auto"


@dataclass
class AutoSegmentation:
    """Automatic segmentation with an adapter: ``fmseg segment``, the worker's segment jobs."""

    modality: Modality = "auto"
    precision: Precision = "auto"
    device: Device = "auto"


@dataclass
class Batch:
    """A cohort run: ``fmseg batch`` (the engine, its workers and the results' format; the method's own settings
    are the sets above)."""

    engine: Literal["local", "ray"] = "local"
    workers: Optional[Annotated[int, Range(1, 1024)]] = None  # None: one per GPU, else one
    gpus_per_worker: Annotated[float, Range(0.0, 16.0)] = 1.0
    format: Literal[".seg.nrrd", ".nii.gz"] = ".seg.nrrd"
    modality: Modality = "auto"
    precision: Precision = "auto"
    device: Device = "auto"


OPTION_SETS = (Prompting, InContext, TaskCreation, Adaptation, AutoSegmentation, Batch)


@dataclass(frozen=True)
class OptionInfo:
    """One option as its users need it: value type, default, choices, range, and whether None is allowed."""

    name: str
    kind: type
    default: Any
    choices: Optional[tuple[Any, ...]] = None
    range: Optional[Range] = None
    device: Optional[DeviceName] = None
    optional: bool = False


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


@cache
def options_of(options: type) -> dict[str, OptionInfo]:
    """The options of an option set, by name, in their order."""
    hints = typing.get_type_hints(options, include_extras=True)
    found: dict[str, OptionInfo] = {}
    for field in dataclasses.fields(options):
        hint, extras = hints[field.name], ()
        if get_origin(hint) is Annotated:
            hint, *extras = get_args(hint)
        hint, optional = _strip_optional(hint)
        if get_origin(hint) is Annotated:  # Optional[Annotated[...]]
            hint, *more = get_args(hint)
            extras = (*extras, *more)
        choices = get_args(hint) if get_origin(hint) is Literal else None
        kind = type(choices[0]) if choices else hint
        found[field.name] = OptionInfo(
            field.name, kind, field.default, choices,
            next((e for e in extras if isinstance(e, Range)), None),
            next((e for e in extras if isinstance(e, DeviceName)), None), optional)
    return found


def option(options: type, name: str) -> OptionInfo:
    """One option of an option set."""
    return options_of(options)[name]


def bounds(options: type, name: str) -> tuple[Any, Any]:
    """(lowest, highest) allowed value of a numeric option, as its type (ints for integer options)."""
    info = option(options, name)
    if info.range is None:
        raise KeyError(f"{options.__name__}.{name} has no range")
    return info.kind(info.range.low), info.kind(info.range.high)


def choices(options: type, name: str) -> tuple[Any, ...]:
    """The values an option may take, in the order users are offered them."""
    info = option(options, name)
    if info.choices is None:
        raise KeyError(f"{options.__name__}.{name} has no choices")
    return info.choices
