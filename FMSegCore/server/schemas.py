"""The worker's JSON bodies as pydantic models: what each request may hold (the only definition of those rules;
the service reads the validated models) and what each answer holds (for ``/openapi.json`` and ``/docs``).

The settings of sessions and jobs (model, axis, support size, rank...) are the option sets of
:mod:`FMSegCore.options`, which ``fmseg`` and the Slicer module use too: each request body inherits its set's
model (:func:`~FMSegCore.server.fields.options_model`) and adds what only the worker needs (uploaded ids; an empty
device means the worker's own). Rules that need the worker's state (an id that exists, a point inside its volume,
a model of the right kind) are the service's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from FMSegCore.options import Adaptation, AutoSegmentation, DeviceName, InContext, Prompting, TaskCreation
from FMSegCore.server.fields import RequestModel, Vector3, device_type, options_model, vector
from FMSegCore.server.jobs import STATES

VOLUME_KINDS = ("image", "labels")


def _rotation(values: tuple[float, ...]) -> tuple[float, ...]:
    if abs(abs(np.linalg.det(np.reshape(values, (3, 3)))) - 1.0) > 1e-3:
        raise PydanticCustomError("fmseg", "must be a 3x3 rotation (row-major)")
    return values


Spacing = vector(3, positive=True)
Direction = Annotated[vector(9), AfterValidator(_rotation),
                      Field(description="3x3, row-major; its columns are the I, J, K axes in LPS")]
#: A session's or job's device: empty (the default) is the worker's own, the one it was started on.
WorkerDevice = device_type(DeviceName(empty="the worker's device"))


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


class SessionRequest(options_model(Prompting)):  # type: ignore[misc]
    """A prompt session on an uploaded volume (the prompting options)."""

    where = "session"
    volume: str
    adapter: Optional[str] = None
    device: WorkerDevice = ""


class Box(RequestModel):
    """A box by two opposite IJK corners; an oriented ROI also gives its 8 IJK corners."""

    lo: Vector3
    hi: Vector3
    corners: Optional[Annotated[list[Vector3], Field(min_length=8, max_length=8)]] = None


class Point(RequestModel):
    ijk: Vector3
    include: bool = True


class Curve(RequestModel):
    """A scribble (open curve) or, ``closed``, a lasso through IJK control points in drawing order."""

    points: Annotated[list[Vector3], Field(max_length=4096)]
    include: bool = True
    closed: bool = False


class PromptRequest(RequestModel):
    """One structure's prompts, in continuous IJK voxel indices of the session's volume."""

    where = "prompt"
    name: str
    boxes: Annotated[list[Box], Field(max_length=256)] = []
    points: Annotated[list[Point], Field(max_length=1024)] = []
    curves: Annotated[list[Curve], Field(max_length=256)] = []


class Pair(RequestModel):
    """An uploaded image and its uploaded label map."""

    image: str
    labels: str


Supports = Annotated[list[Pair], Field(min_length=1, max_length=256)]


class IncontextRequest(options_model(InContext)):  # type: ignore[misc]
    """In-context segmentation of an uploaded volume (the in-context options), like uploaded ``supports`` show, or
    with an uploaded ``task`` (3-D in-context models; applied with the task's own model: a ``model`` given must be
    that one). With a 3-D ``model`` the supports are encoded into a task first; the 2-D options (support size,
    ensemble, axis, match...) then do not apply. The job's arrays: ``labels``, ``uncertainty`` when asked for, and
    with ``candidates`` K (stochastic models) one label map per candidate, named in the result's ``candidates``
    (``candidate1`` ... ``candidateK``)."""

    where = "incontext"
    volume: str
    supports: Optional[Supports] = Field(None, description="labelled examples; exactly one of supports and task")
    task: Optional[str] = Field(None, description="an uploaded or created task's id (POST tasks, jobs/task)")
    classes: Labels = []
    device: WorkerDevice = ""


class TaskRequest(options_model(TaskCreation)):  # type: ignore[misc]
    """A task of a 3-D in-context model from uploaded labelled references (the task options); the job's result
    names the new task, kept like an uploaded one (``GET tasks/<id>`` downloads its file)."""

    where = "task"
    supports: Supports
    classes: Labels = []
    device: WorkerDevice = ""


class AdaptRequest(options_model(Adaptation)):  # type: ignore[misc]
    """Adaptation to uploaded labelled cases (the adaptation options)."""

    where = "adapt"
    cases: Annotated[list[Pair], Field(min_length=1, max_length=256)]
    labels: Labels = []
    device: WorkerDevice = ""


class SegmentRequest(options_model(AutoSegmentation)):  # type: ignore[misc]
    """Automatic segmentation of an uploaded volume with an uploaded adapter (the automatic options)."""

    where = "segment"
    volume: str
    adapter: str
    device: WorkerDevice = ""


# ---------------------------------------------------------------------------------------------- answers


class Answer(BaseModel):
    """An answer's documented fields (a worker may add more)."""

    model_config = ConfigDict(extra="allow")


class ErrorAnswer(Answer):
    error: str = Field(description="one line saying why")


class ModelCard(Answer):
    id: str
    kind: str = Field(description="promptable, incontext, or 'weights only' (no family of FMSeg runs it yet)")
    dims: Optional[int] = Field(None, description="2 or 3: the model works on slices or in 3-D")
    task: Optional[str] = Field(None, description="the checkpoint's task, e.g. promptable-3d")
    title: str
    size_bytes: Optional[int] = None
    stochastic: bool = Field(False, description="it draws candidate segmentations (in-context option candidates; "
                                                "a stochastic model such as tyche)")
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
    tasks: int = 0
    models: list[ModelCard]


class VolumeAdded(Answer):
    volume: str
    shape: list[int]
    kind: Literal[VOLUME_KINDS]  # type: ignore[valid-type]


class Removed(Answer):
    removed: str


class WeightsImported(Answer):
    """Uploaded weights installed into the worker's model cache (``verified``: against a published sha256)."""

    model: str
    path: str
    verified: bool


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


class TaskClass(Answer):
    value: int
    name: str
    color: list[float] = Field(description="RGB, 0..1")


class TaskInfo(Answer):
    """What a task file holds (its metadata), its id on the worker, and the file's sha256 and size."""

    task: str
    model: str
    model_sha256: Optional[str] = Field(None, description="the weights the task was made for")
    classes: list[TaskClass]
    spacing_mm: list[float] = Field(description="the model's voxel spacing the references were resampled to")
    patch_shape: list[int]
    references: int = Field(description="the labelled reference volumes the task was encoded from")
    references_sha256: str
    modality: str
    window: Union[str, list[float]]
    class_voxels: list[float] = Field(description="reference voxels per class, at the model's spacing")
    created: str
    sha256: str = Field(description="the task file's sha256")
    bytes: int


class SessionOpened(Answer):
    session: str
    model: str
    device: str
    axis: int = Field(description="the IJK axis the session slices along (2-D models)")
    dims: int = Field(description="2: the model segments slices and propagates; 3: it segments 3-D crops")


class JobStatus(Answer):
    id: str
    kind: str
    state: Literal[STATES]  # type: ignore[valid-type]
    done: float
    total: float
    message: str
    loss: Optional[float] = Field(None, description="the training loss at the last step (adaptation)")
    elapsed: float = Field(0.0, description="seconds since the job started running")
    remaining: Optional[float] = Field(None, description="estimated seconds left (null: unknown)")
    error: str
    result: dict[str, Any] = Field(description="the job's answer once done (kind-specific)")
    arrays: list[str] = Field(description="names of the array frames at jobs/<id>/arrays/<name>")


class Stopping(Answer):
    stopping: bool
