"""Task files (``.fmseg-task``): the task embeddings of a 3-D in-context model, saved once and applied to any
number of scans later.

A task file is ``torch.save`` of one plain dict (tensors and plain types only, read back with
``torch.load(..., weights_only=True)``): the task ``(K, T, D)`` float32 and its metadata (:class:`TaskMetadata`):
the format's name and version, the model's zoo name and its weights' sha256 (from the zoo card: a task made for
other weights is refused), the classes (label values, names, colours), the model's spacing and patch shape, the
number of references, a sha256 over the reference arrays, the modality and window and the creation time.

Files are written atomically (a partial file beside it, then ``os.replace``), never over an existing one unless
asked, and stay under :data:`MAX_TASK_BYTES`. Reading refuses, in one line naming the file, anything that is not
a task file, a damaged or truncated one, one made for another model, and classes the task lacks.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from FMSegCore.errors import FMSegError, InputError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.io.labelmap import SegmentInfo

if TYPE_CHECKING:  # torch loads when a task is read or written: the CLI takes TASK_SUFFIX from here
    import torch

    from FMSegCore.engines.incontext.volume3d import BuiltTask

PathLike = Union[str, Path]

TASK_FORMAT = "fmseg-task"
TASK_VERSION = 1
TASK_SUFFIX = ".fmseg-task"
#: The largest task file written or read.
MAX_TASK_BYTES = 5 * 1024 * 1024
#: How every task file begins (torch.save's zip container).
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class TaskMetadata:
    """Everything a task file says besides its tensor."""

    model: str
    model_sha256: Optional[str]
    classes: list[SegmentInfo]
    spacing_mm: tuple[float, float, float]
    patch_shape: tuple[int, int, int]
    references: int
    references_sha256: str
    modality: str = "auto"
    window: Union[str, tuple[float, float]] = "abdomen"
    #: foreground voxels (on the model grid) each class was encoded from, over all references
    class_voxels: list[float] = field(default_factory=list)
    created: str = ""
    format: str = TASK_FORMAT
    version: int = TASK_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The plain dict saved beside the tensor."""
        window = self.window if isinstance(self.window, str) else [float(w) for w in self.window]
        return {"format": self.format, "version": int(self.version), "model": self.model,
                "model_sha256": self.model_sha256,
                "classes": [{"value": int(c.value), "name": str(c.name), "color": [float(x) for x in c.color]}
                            for c in self.classes],
                "spacing_mm": [float(s) for s in self.spacing_mm],
                "patch_shape": [int(p) for p in self.patch_shape], "references": int(self.references),
                "references_sha256": self.references_sha256, "modality": self.modality, "window": window,
                "class_voxels": [float(v) for v in self.class_voxels], "created": self.created}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskMetadata:
        """The metadata of a loaded dict; a missing or ill-typed field is a ``ValueError`` naming it."""

        def get(name: str, kind: Any) -> Any:
            if name not in data:
                raise ValueError(f"no {name!r}")
            if not isinstance(data[name], kind):
                raise ValueError(f"bad {name!r}")
            return data[name]

        classes = []
        for entry in get("classes", list):
            if not isinstance(entry, dict):
                raise ValueError("bad 'classes'")
            color = entry.get("color")
            if (not isinstance(entry.get("value"), int) or not isinstance(entry.get("name"), str)
                    or not isinstance(color, list) or len(color) != 3):
                raise ValueError("bad 'classes'")
            classes.append(SegmentInfo(entry["value"], entry["name"], tuple(float(c) for c in color)))
        sha = data.get("model_sha256")
        window = get("window", (str, list))
        return cls(
            model=get("model", str), model_sha256=sha if isinstance(sha, str) else None, classes=classes,
            spacing_mm=tuple(float(s) for s in get("spacing_mm", list)),
            patch_shape=tuple(int(p) for p in get("patch_shape", list)), references=get("references", int),
            references_sha256=get("references_sha256", str), modality=get("modality", str),
            window=window if isinstance(window, str) else tuple(float(w) for w in window),
            class_voxels=[float(v) for v in get("class_voxels", list)], created=get("created", str),
            format=get("format", str), version=get("version", int))


def now() -> str:
    """The creation time written into task files: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_sha256(name: str) -> Optional[str]:
    """The sha256 of the zoo model's weights, from its card (None when the card publishes none)."""
    from FMSegCore.zoo.registry import get_card

    return get_card(name).sha256


def task_metadata(model_name: str, model: Any, built: BuiltTask, modality: str, window: Any) -> TaskMetadata:
    """The metadata a task file keeps about ``built`` (:func:`~FMSegCore.engines.incontext.volume3d.create_task`'s
    result) made with ``model`` (the zoo model ``model_name``): what ``fmseg task create`` and the worker's task
    jobs write."""
    modalities = sorted(set(built.modalities))
    return TaskMetadata(
        model=model_name, model_sha256=model_sha256(model_name), classes=list(built.classes),
        spacing_mm=tuple(float(s) for s in model.patch_spacing_mm),
        patch_shape=tuple(int(p) for p in model.patch_shape), references=len(built.patches),
        references_sha256=built.references_sha256,
        modality="+".join(modalities) if modalities else modality, window=window,
        class_voxels=[float(v) for v in built.class_weights], created=now())


def _clean(task: torch.Tensor) -> torch.Tensor:
    """The task as a compact float32 CPU tensor of its own (a view would save its whole storage)."""
    import torch

    return task.detach().to("cpu", torch.float32).contiguous().clone()


def _check_task_tensor(task: Any, metadata: TaskMetadata, path: Optional[PathLike]) -> None:
    import torch

    if not isinstance(task, torch.Tensor) or not task.is_floating_point() or task.ndim != 3:
        raise InputError(path, "damaged task file (the task is not a (classes, tokens, features) tensor)")
    if task.shape[0] != len(metadata.classes):
        raise InputError(path, f"damaged task file ({task.shape[0]} task rows for {len(metadata.classes)} classes)")
    if not bool(torch.isfinite(task).all()):
        raise InputError(path, "damaged task file (the task holds NaN or infinite values)")


def save_task(path: PathLike, task: torch.Tensor, metadata: TaskMetadata, overwrite: bool = False) -> Path:
    """Write a task file atomically: refuses another ending than ``.fmseg-task``, an existing file unless
    ``overwrite``, and a result over :data:`MAX_TASK_BYTES`."""
    import torch

    path = Path(path)
    if not path.name.lower().endswith(TASK_SUFFIX):
        raise InputError(path, f"a task file's name must end in {TASK_SUFFIX}")
    task = _clean(task)
    _check_task_tensor(task, metadata, path)
    buffer = io.BytesIO()
    torch.save({**metadata.to_dict(), "task": task}, buffer)
    data = buffer.getvalue()
    if len(data) > MAX_TASK_BYTES:
        raise InputError(path, f"the task would take {len(data) / 2 ** 20:.1f} MB, over the "
                               f"{MAX_TASK_BYTES / 2 ** 20:.0f} MB a task file may hold (fewer classes?)")
    with atomic_output(path, overwrite) as temporary:
        temporary.write_bytes(data)
    return path


def _read_dict(path: Path) -> dict[str, Any]:
    import torch

    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a task file")
    size = path.stat().st_size
    if size > MAX_TASK_BYTES:
        raise InputError(path, f"not an FMSeg task file (too large: {size / 2 ** 20:.1f} MB)")
    data = path.read_bytes()
    if not data.startswith(_ZIP_MAGIC):
        raise InputError(path, f"not an FMSeg task file (create one with fmseg task create --output "
                               f"NAME{TASK_SUFFIX})")
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one message
        raise InputError(path, f"damaged or truncated task file ({type(error).__name__})") from None
    if not isinstance(loaded, dict) or loaded.get("format") != TASK_FORMAT:
        raise InputError(path, "not an FMSeg task file (a torch file of something else)")
    return loaded


def check_model(metadata: TaskMetadata, path: Optional[PathLike], model: Optional[str] = None) -> None:
    """Refuse a task made for another model than ``model`` (None: the task's own), or for other weights of it
    than the zoo's (sha256 on its card)."""
    if model is not None and model != metadata.model:
        raise InputError(path, f"task made for model {metadata.model!r}, not {model!r} (create it again with "
                               f"--model {model}, or leave --model out)")
    try:
        expected = model_sha256(metadata.model)
    except FMSegError:
        raise InputError(path, f"task made for model {metadata.model!r}, which this FMSeg does not know") from None
    if expected is not None and metadata.model_sha256 != expected:
        raise InputError(path, f"task made for other weights of {metadata.model!r} (sha256 "
                               f"{str(metadata.model_sha256)[:12]}..., the zoo's are {expected[:12]}...): create "
                               "it again from its references")


def select_classes(task: torch.Tensor, metadata: TaskMetadata, requested: Optional[Sequence[Union[str, int]]],
                   path: Optional[PathLike] = None) -> tuple[torch.Tensor, TaskMetadata]:
    """The rows of ``task`` and the metadata for the ``requested`` classes (names, any case, or label values; in
    that order; None or empty: all of them); a class the task lacks is an :class:`InputError`."""
    if not requested:
        return task, metadata
    by_value = {c.value: i for i, c in enumerate(metadata.classes)}
    by_name = {c.name.lower(): i for i, c in enumerate(metadata.classes)}
    rows: list[int] = []
    for item in requested:
        text = str(item).strip()
        index = by_value.get(int(text)) if text.lstrip("-").isdigit() else by_name.get(text.lower())
        if index is None:
            known = ", ".join(f"{c.name} ({c.value})" for c in metadata.classes)
            raise InputError(path, f"the task has no class {text!r} (it has: {known})")
        if index not in rows:
            rows.append(index)
    voxels = [metadata.class_voxels[i] for i in rows] if len(metadata.class_voxels) == len(metadata.classes) else []
    chosen = dataclasses.replace(metadata, classes=[metadata.classes[i] for i in rows], class_voxels=voxels)
    return task[rows].contiguous(), chosen


def load_task(path: PathLike, model: Optional[str] = None,
              classes: Optional[Sequence[Union[str, int]]] = None) -> tuple[torch.Tensor, TaskMetadata]:
    """A task file's task ``(K, T, D)`` and metadata; checked against ``model`` (a zoo name; None: the task's own
    model, its weights' sha256 checked all the same) and narrowed to ``classes`` when given
    (:func:`select_classes`). Any problem is one :class:`InputError` naming the file."""
    path = Path(path)
    loaded = _read_dict(path)
    version = loaded.get("version")
    if not isinstance(version, int) or version < 1:
        raise InputError(path, "damaged task file (no format version)")
    if version > TASK_VERSION:
        raise InputError(path, f"task file version {version} was written by a newer FMSeg (this one reads up to "
                               f"version {TASK_VERSION})")
    try:
        metadata = TaskMetadata.from_dict(loaded)
    except (ValueError, TypeError) as error:
        raise InputError(path, f"damaged task file ({error})") from None
    task = loaded.get("task")
    _check_task_tensor(task, metadata, path)
    check_model(metadata, path, model)
    return select_classes(task, metadata, classes, path)
