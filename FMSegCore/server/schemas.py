"""The worker's JSON bodies as pydantic models: what each request may hold (the only definition of those rules;
the service reads the validated models) and what each answer holds (for ``/openapi.json`` and ``/docs``).

Rules that need the worker's state (an id that exists, a point inside its volume, a model of the right kind)
are the service's.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from FMSegCore.engines.adaptation.defaults import (
    DEFAULT_PIXEL_MM,
    DEFAULT_RANK,
    DEFAULT_VIEWS,
    MAX_RANK,
    METHOD_CHOICES,
    MODES,
)
from FMSegCore.engines.incontext.anatomical import MATCHES, PRIOR_MARGIN_MM, REGISTRATION_WEIGHT
from FMSegCore.preprocessing.slicing import AXIS_NAMES
from FMSegCore.server.fields import RequestModel, Vector3, vector
from FMSegCore.server.jobs import STATES
from FMSegCore.zoo.registry import DEFAULT_INCONTEXT, DEFAULT_PROMPTABLE

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
VOLUME_KINDS = ("image", "labels")

Axis = Literal[tuple(AXIS_NAMES)]  # type: ignore[valid-type]
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
Modality = Literal["auto", "CT", "MR"]


def _rotation(values: tuple[float, ...]) -> tuple[float, ...]:
    if abs(abs(np.linalg.det(np.reshape(values, (3, 3)))) - 1.0) > 1e-3:
        raise PydanticCustomError("fmseg", "must be a 3x3 rotation (row-major)")
    return values


Spacing = vector(3, positive=True)
Direction = Annotated[vector(9), AfterValidator(_rotation),
                      Field(description="3x3, row-major; its columns are the I, J, K axes in LPS")]
Seed = Annotated[int, Field(ge=0, le=2 ** 32 - 1)]


def _device(name: str) -> str:
    if not re.fullmatch(r"(auto|cpu|cuda(:\d+)?|mps)?", name.lower()):
        raise PydanticCustomError("fmseg", "must be auto, cpu, cuda, cuda:N or mps (empty: the worker's device)")
    return name


Device = Annotated[str, AfterValidator(_device), Field(description="auto, cpu, cuda, cuda:N or mps; empty: the "
                                                                   "worker's own device")]


def _label(value: Any) -> Union[int, str]:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError("fmseg", "must be a structure's name or label value")
    return value


Label = Annotated[Union[int, str], PlainValidator(_label),
                  WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]})]
Labels = Annotated[list[Label], Field(max_length=10_000, description="names or values; empty: all")]


# ---------------------------------------------------------------------------------------------- uploads


class SegmentMeta(RequestModel):
    """A label value's name and colour (RGB, 0..1)."""

    value: Annotated[int, Field(ge=1, le=65535)]
    name: str
    color: Optional[Vector3] = None


class VolumeMeta(RequestModel):
    """The meta of an uploaded array frame: its grid (ITK's LPS) and whether it is an image or a label map."""

    where = "volume"
    spacing: Spacing
    origin: Vector3
    direction: Direction
    name: Optional[str] = None
    kind: Optional[Literal[VOLUME_KINDS]] = Field(  # type: ignore[valid-type]
        None, description="image or labels; default: labels when 'segments' is given, else image")
    segments: Optional[Annotated[list[SegmentMeta], Field(max_length=10_000)]] = None

    @property
    def is_labels(self) -> bool:
        return self.kind == "labels" if self.kind else self.segments is not None


# ---------------------------------------------------------------------------------------------- requests


class DownloadRequest(RequestModel):
    where = "download"
    model: str


class SessionRequest(RequestModel):
    """A prompt session on an uploaded volume."""

    where = "session"
    volume: str
    model: str = DEFAULT_PROMPTABLE
    adapter: Optional[str] = None
    axis: Axis = "axial"
    context: Literal["auto", "crop", "full"] = "auto"
    modality: Modality = "auto"
    window: Optional[str] = None
    precision: Precision = "auto"
    device: Device = ""


class Box(RequestModel):
    """A box by two opposite IJK corners; an oriented ROI also gives its 8 IJK corners."""

    lo: Vector3
    hi: Vector3
    corners: Optional[Annotated[list[Vector3], Field(min_length=8, max_length=8)]] = None


class Point(RequestModel):
    ijk: Vector3
    include: bool = True


class PromptRequest(RequestModel):
    """One structure's prompts, in continuous IJK voxel indices of the session's volume."""

    where = "prompt"
    name: str
    boxes: Annotated[list[Box], Field(max_length=256)] = []
    points: Annotated[list[Point], Field(max_length=1024)] = []


class Pair(RequestModel):
    """An uploaded image and its uploaded label map."""

    image: str
    labels: str


class IncontextRequest(RequestModel):
    where = "incontext"
    volume: str
    supports: Annotated[list[Pair], Field(max_length=256)]
    classes: Labels = []
    model: str = DEFAULT_INCONTEXT
    support_size: Annotated[int, Field(ge=1, le=64)] = 8
    ensemble: Annotated[int, Field(ge=1, le=16)] = 1
    tolerance: Annotated[float, Field(ge=1e-3, le=1.0)] = 0.05
    seed: Seed = 0
    uncertainty: bool = False
    axis: Axis = "axial"
    modality: Modality = "auto"
    window: str = "abdomen"
    match: Literal[MATCHES] = "auto"  # type: ignore[valid-type]
    prior_margin_mm: Annotated[float, Field(ge=0.0, le=500.0)] = PRIOR_MARGIN_MM
    cross_modality: bool = False
    registration_weight: Annotated[float, Field(ge=0.0, le=1.0)] = REGISTRATION_WEIGHT
    precision: Precision = "auto"
    device: Device = ""


class AdaptRequest(RequestModel):
    where = "adapt"
    cases: Annotated[list[Pair], Field(max_length=256)]
    labels: Labels = []
    model: str = DEFAULT_PROMPTABLE
    mode: Literal[MODES] = "auto"  # type: ignore[valid-type]
    method: Optional[Literal[METHOD_CHOICES]] = None  # type: ignore[valid-type]
    rank: Annotated[int, Field(ge=1, le=MAX_RANK)] = DEFAULT_RANK
    steps: Optional[Annotated[int, Field(ge=1, le=100_000)]] = None
    batch_size: Optional[Annotated[int, Field(ge=1, le=256)]] = None
    lr: Optional[Annotated[float, Field(ge=0.0, le=10.0)]] = None
    seed: Seed = 0
    holdout: Annotated[int, Field(ge=0, le=255)] = 0
    whole_slice: bool = False
    pixel_mm: Annotated[float, Field(ge=0.05, le=20.0)] = DEFAULT_PIXEL_MM
    views: Annotated[int, Field(ge=1, le=10_000)] = DEFAULT_VIEWS
    axis: Axis = "axial"
    modality: Modality = "auto"
    window: str = "abdomen"
    precision: Precision = "auto"
    device: Device = ""


class SegmentRequest(RequestModel):
    where = "segment"
    volume: str
    adapter: str
    modality: Modality = "auto"
    precision: Precision = "auto"
    device: Device = ""


# ---------------------------------------------------------------------------------------------- answers


class Answer(BaseModel):
    """An answer's documented fields (a worker may add more)."""

    model_config = ConfigDict(extra="allow")


class ErrorAnswer(Answer):
    error: str = Field(description="one line saying why")


class ModelCard(Answer):
    id: str
    kind: str = Field(description="promptable, incontext, volume, or reference")
    title: str
    size_bytes: Optional[int] = None
    available: bool
    licence: Optional[str] = None


class ModelList(Answer):
    models: list[ModelCard]


class Info(Answer):
    version: str
    device: str
    torch: str
    cuda: bool
    volumes: int
    sessions: int
    adapters: int
    models: list[ModelCard]


class VolumeAdded(Answer):
    volume: str
    shape: list[int]
    kind: Literal[VOLUME_KINDS]  # type: ignore[valid-type]


class Removed(Answer):
    removed: str


class Closed(Answer):
    closed: str


class AdapterInfo(Answer):
    adapter: str
    base_model: str
    mode: str
    method: str
    structures: list[dict[str, Any]]
    validation_dice: Optional[dict[str, float]] = Field(None, description="Dice per structure on held-out cases")
    fit: Optional[dict[str, Any]] = None
    trainable_parameters: Optional[int] = None
    geometry: Optional[dict[str, Any]] = None
    views: Optional[int] = None
    bytes: Optional[int] = None


class SessionOpened(Answer):
    session: str
    model: str
    device: str
    axis: int = Field(description="the IJK axis the session slices along")


class JobStatus(Answer):
    id: str
    kind: str
    state: Literal[STATES]  # type: ignore[valid-type]
    done: float
    total: float
    message: str
    error: str
    result: dict[str, Any] = Field(description="the job's answer once done (kind-specific)")
    arrays: list[str] = Field(description="names of the array frames at jobs/<id>/arrays/<name>")


class Stopping(Answer):
    stopping: bool
