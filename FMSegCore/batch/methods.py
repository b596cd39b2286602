"""How a cohort is segmented: the method (an automatic adapter, a 3-D task file, a support set, or prompts per
case), checked once before any worker starts, and the segmenter each worker builds once and applies to every
scan it is given.

:class:`MethodSpec` is plain data (it travels to worker processes and Ray actors); :func:`plan_method` reads and
checks its files in the calling process and gives the structures and the task's sha256 (what a rerun compares);
:func:`build_segmenter` loads the model on a worker's device.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from FMSegCore.batch.cases import Case
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.io.volume import Volume

ADAPTER, TASK, SUPPORT, PROMPTS = "adapter", "task", "support", "prompts"
KINDS = (ADAPTER, TASK, SUPPORT, PROMPTS)


@dataclass(frozen=True)
class MethodSpec:
    """What segments the cohort: ``kind`` and its files (the adapter, the task file, or the support pairs as
    image, labels, image, labels ...), the structures asked for (``labels``; default: all), the model (support
    and prompts; None: the default), the CSV column of per-case prompts files, and the inference settings."""

    kind: str
    files: tuple[str, ...] = ()
    labels: Optional[tuple[str, ...]] = None
    model: Optional[str] = None
    prompts_column: Optional[str] = None
    precision: str = "auto"
    modality: str = "auto"
    window: str = "abdomen"

    def support_pairs(self) -> list[tuple[str, str]]:
        return [(self.files[i], self.files[i + 1]) for i in range(0, len(self.files), 2)]


@dataclass
class MethodPlan:
    """A checked method: what it is (one line), its structures (None: named by each case's prompts), whether it
    gives an uncertainty map, and the sha256 of its files and settings."""

    description: str
    structures: Optional[list[SegmentInfo]]
    uncertainty: bool
    task_sha256: str
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseSegmentation:
    """A segmenter's answer for one scan: the label map (KJI, the scan's grid), its segments, and the
    uncertainty map (same grid, in [0, 1]) where the method gives one."""

    labels: np.ndarray
    segments: list[SegmentInfo]
    uncertainty: Optional[np.ndarray] = None


class Segmenter(Protocol):
    def segment(self, image: Volume, case: Case) -> CaseSegmentation: ...


def method_sha256(spec: MethodSpec) -> str:
    """The task's sha256 a run of ``spec`` records: its files' sha256 and its settings, read as plain files (no
    torch), so that ``fmseg batch`` and a script applying the same method elsewhere (the Slicer cohort example)
    share one results folder."""
    from FMSegCore.batch.results import file_sha256

    digest = hashlib.sha256(json.dumps({k: v for k, v in asdict(spec).items() if k != "files"},
                                       sort_keys=True).encode())
    for path in spec.files:
        digest.update(file_sha256(Path(path)).encode())
    return digest.hexdigest()


def plan_method(spec: MethodSpec) -> MethodPlan:
    """Read and check the method's files and settings (one line naming the file on any problem); no model is
    loaded."""
    from FMSegCore.zoo.families import INCONTEXT, PROMPTABLE, model_dims, require_kind
    from FMSegCore.zoo.registry import DEFAULT_INCONTEXT, DEFAULT_PROMPTABLE, get_card

    if spec.kind not in KINDS:
        raise InputError(None, f"unknown method {spec.kind!r} (use {', '.join(KINDS)})")
    for path in spec.files:
        if not Path(path).exists():
            raise InputError(path, "no such file")
    if spec.kind == ADAPTER:
        from FMSegCore.engines.adaptation.adapter_file import load_adapter

        adapter = load_adapter(spec.files[0])
        if adapter.mode != "auto":
            raise InputError(spec.files[0], "this adapter adapts a promptable model (--mode prompt): a cohort "
                                            "needs an automatic adapter ('fmseg adapt --mode auto')")
        structures = [SegmentInfo(int(s["value"]), str(s["name"]), tuple(float(c) for c in s["color"]))
                      for s in adapter.metadata["structures"]]
        description = f"adapter {Path(spec.files[0]).name} ({adapter.base_model})"
        uncertainty = False
    elif spec.kind == TASK:
        from FMSegCore.engines.incontext.task_file import load_task

        _, metadata = load_task(spec.files[0], classes=list(spec.labels) if spec.labels else None)
        structures, uncertainty = list(metadata.classes), True
        description = f"task {Path(spec.files[0]).name} ({metadata.model})"
    elif spec.kind == SUPPORT:
        from FMSegCore.engines.incontext.support import SupportSet, read_support_scan

        model = spec.model or DEFAULT_INCONTEXT
        require_kind(model, INCONTEXT)
        scans = [read_support_scan(image, labels) for image, labels in spec.support_pairs()]
        structures = SupportSet([scan.example(spec.modality, spec.window) for scan in scans]).resolve(
            list(spec.labels) if spec.labels else None)
        uncertainty = model_dims(get_card(model)) == 3
        description = f"{len(scans)} support scan{'s' * (len(scans) != 1)} ({model})"
    else:
        model = spec.model or DEFAULT_PROMPTABLE
        require_kind(model, PROMPTABLE)
        structures, uncertainty = None, False
        description = f"prompts from column '{spec.prompts_column}' ({model})"
    return MethodPlan(description, structures, uncertainty, method_sha256(spec))


def build_segmenter(spec: MethodSpec, device_name: str = "auto", threads: Optional[int] = None) -> Segmenter:
    """The method's segmenter with its model loaded on ``device_name`` (once per worker); ``threads``: CPU
    threads of this process."""
    from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime

    device = resolve_device(device_name)
    if device.type == "cpu":
        tune_cpu_runtime(threads)
    dtype = inference_dtype(device, spec.precision)
    builders = {ADAPTER: _AdapterSegmenter, TASK: _TaskSegmenter, SUPPORT: _support_segmenter,
                PROMPTS: _PromptSegmenter}
    return builders[spec.kind](spec, device, dtype)


class _AdapterSegmenter:
    def __init__(self, spec: MethodSpec, device: Any, dtype: Any) -> None:
        from FMSegCore.engines.adaptation.adapter_file import load_adapter
        from FMSegCore.engines.adaptation.engine import build_adapted

        self.spec, self.device, self.dtype = spec, device, dtype
        self.adapter = load_adapter(spec.files[0])
        self.model = build_adapted(self.adapter, device)
        self.segments = plan_method(spec).structures or []

    def segment(self, image: Volume, case: Case) -> CaseSegmentation:
        from FMSegCore.engines.adaptation.auto_segment import scan_modality, segment_with_adapter

        modality = scan_modality(image, case.image, self.adapter.metadata, self.spec.modality)
        labels = segment_with_adapter(self.model, self.adapter.metadata, image, self.device, self.dtype,
                                      modality=modality)
        return CaseSegmentation(labels, self.segments)


class _TaskSegmenter:
    """A 3-D in-context task applied to each scan (from a task file, or built once from support scans)."""

    def __init__(self, spec: MethodSpec, device: Any, dtype: Any, built: Any = None) -> None:
        from FMSegCore.models.factory import load_model

        self.spec, self.dtype = spec, dtype
        if built is None:
            from FMSegCore.engines.incontext.task_file import load_task

            self.task, metadata = load_task(spec.files[0], classes=list(spec.labels) if spec.labels else None)
            self.model = load_model(metadata.model, device)
            self.classes, self.modalities = list(metadata.classes), metadata.modality.split("+")
            self.window: Any = metadata.window
        else:
            self.model, self.task, self.classes, self.modalities, self.window = built

    def segment(self, image: Volume, case: Case) -> CaseSegmentation:
        from FMSegCore.engines.incontext.volume3d import apply_task, check_query_modality

        check_query_modality(self.modalities, image, self.spec.modality)
        applied = apply_task(self.model, self.task, image, self.classes, self.spec.modality, self.window,
                             uncertainty=True, autocast_dtype=self.dtype)
        return CaseSegmentation(applied.labels, self.classes, applied.uncertainty)


class _AnatomicalSegmenter:
    """A 2-D in-context model with the support scans aligned to each scan."""

    def __init__(self, spec: MethodSpec, device: Any, dtype: Any, model: Any, scans: Sequence[Any]) -> None:
        from FMSegCore.engines.incontext.anatomical import AnatomicalInContext

        self.engine = AnatomicalInContext(model, scans, list(spec.labels) if spec.labels else None,
                                          device=device, autocast_dtype=dtype, modality=spec.modality,
                                          window=spec.window)

    def segment(self, image: Volume, case: Case) -> CaseSegmentation:
        result, _ = self.engine.segment(image)
        return CaseSegmentation(result.labels.astype(np.uint16), list(result.segments), result.uncertainty)


def _support_segmenter(spec: MethodSpec, device: Any, dtype: Any) -> Segmenter:
    from FMSegCore.engines.incontext.support import read_support_scan
    from FMSegCore.models.factory import load_model
    from FMSegCore.zoo.families import model_dims
    from FMSegCore.zoo.registry import DEFAULT_INCONTEXT, get_card

    name = spec.model or DEFAULT_INCONTEXT
    model = load_model(name, device)
    scans = [read_support_scan(image, labels) for image, labels in spec.support_pairs()]
    if model_dims(get_card(name)) != 3:
        return _AnatomicalSegmenter(spec, device, dtype, model, scans)
    from FMSegCore.engines.incontext.support import SupportSet
    from FMSegCore.engines.incontext.volume3d import build_task, modality_of

    classes = SupportSet([scan.example(spec.modality, spec.window) for scan in scans]).resolve(
        list(spec.labels) if spec.labels else None)
    built = build_task(model, scans, classes, spec.modality, spec.window)
    modalities = [modality_of(scan.volume, spec.modality) for scan in scans]
    return _TaskSegmenter(spec, device, dtype, (model, built.task, list(classes), modalities, spec.window))


class _PromptSegmenter:
    """A promptable model run on each scan's own prompts (the markups files of its CSV column)."""

    def __init__(self, spec: MethodSpec, device: Any, dtype: Any) -> None:
        from FMSegCore.models.factory import load_model
        from FMSegCore.zoo.registry import DEFAULT_PROMPTABLE

        self.spec, self.device, self.dtype = spec, device, dtype
        self.model = load_model(spec.model or DEFAULT_PROMPTABLE, device)

    def segment(self, image: Volume, case: Case) -> CaseSegmentation:
        from FMSegCore.engines.prompting.sessions import open_prompt_session
        from FMSegCore.io.colors import distinct_colors
        from FMSegCore.io.markups import load_prompts
        from FMSegCore.io.orientation import anatomical_axes
        from FMSegCore.options import AXIS_INDEX

        paths = case.column_paths(str(self.spec.prompts_column))
        if not paths:
            raise InputError(case.image, f"no prompts file in column '{self.spec.prompts_column}'")
        prompts = load_prompts(paths, image)
        axis = anatomical_axes(image.direction)[AXIS_INDEX["axial"]]
        session = open_prompt_session(image, self.model, self.device, axis=axis, modality=self.spec.modality,
                                      autocast_dtype=self.dtype)
        labels, _ = session.run(prompts)
        names = [p.name for p in prompts]
        segments = [SegmentInfo(value, name, color)
                    for value, (name, color) in enumerate(zip(names, distinct_colors(names)), start=1)]
        return CaseSegmentation(np.asarray(labels, dtype=np.uint16), segments)
