"""What the worker does, independent of HTTP: volumes, adapters, tasks (of 3-D in-context models), prompt
sessions (with their embedding caches) and long jobs, addressed by ids. Requests arrive validated
(:mod:`~FMSegCore.server.schemas`); :mod:`FMSegCore.server.routes` maps HTTP requests onto it."""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from FMSegCore import __version__
from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
from FMSegCore.engines.prompting.embedding_cache import SharedBudget
from FMSegCore.engines.prompting.session import PromptSession
from FMSegCore.engines.prompting.sessions import AnySession, open_prompt_session, session_dims
from FMSegCore.errors import FMSegError, InputError
from FMSegCore.io.labelmap import SegmentInfo, default_segment
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.volume import Volume
from FMSegCore.models.factory import forget_model, load_model
from FMSegCore.preprocessing.slicing import AXIS_NAMES
from FMSegCore.progress import Progress, ProgressClock
from FMSegCore.prompts import BoxPrompt, CurvePrompt, PointPrompt, SegmentPrompts, curve_problem
from FMSegCore.server.defaults import EMBEDDING_BUDGET, SESSION_IDLE_S
from FMSegCore.server.fields import RequestError, parse
from FMSegCore.server.jobs import Job, JobRunner
from FMSegCore.server.schemas import (
    AdaptRequest,
    DownloadRequest,
    IncontextRequest,
    PromptRequest,
    SegmentMeta,
    SegmentRequest,
    SessionRequest,
    TaskRequest,
    VolumeMeta,
)
from FMSegCore.server.wire import encode_array
from FMSegCore.zoo.families import INCONTEXT, PROMPTABLE, is_stochastic, model_dims, model_kind, require_kind
from FMSegCore.zoo.registry import get_card, list_cards


def volume_from_frame(array: np.ndarray, meta: VolumeMeta) -> Volume:
    """A :class:`Volume` from an uploaded KJI array and its validated geometry (LPS)."""
    return Volume(array, meta.spacing, meta.origin, np.asarray(meta.direction).reshape(3, 3), meta.name or None)


def segments_from_meta(segments: Sequence[SegmentMeta], labels: np.ndarray) -> list[SegmentInfo]:
    """The label map's segments named in its meta, plus default ones for values it does not name."""
    named: dict[int, SegmentInfo] = {}
    for segment in segments:
        info = default_segment(segment.value, segment.name)
        named[segment.value] = info if segment.color is None else SegmentInfo(segment.value, info.name,
                                                                              segment.color)
    present = [int(v) for v in np.unique(labels) if v != 0]
    return list(named.values()) + [default_segment(v) for v in present if v not in named]


@dataclass
class StoredTask:
    """A task file the worker holds (uploaded, or made by a task job): its path, its task and metadata as
    :func:`~FMSegCore.engines.incontext.task_file.load_task` read them, the file's sha256 and size."""

    path: Path
    task: torch.Tensor
    metadata: Any  # TaskMetadata
    sha256: str
    size: int

    def summary(self, task_id: str) -> dict[str, Any]:
        """The task's TaskInfo answer."""
        meta = self.metadata.to_dict()
        for key in ("format", "version"):
            meta.pop(key, None)
        return {"task": task_id, **meta, "sha256": self.sha256, "bytes": self.size}


@dataclass
class SessionEntry:
    """A prompt session, the lock that serialises its prompts, and when it was last used."""

    session: AnySession
    volume_id: str
    lock: threading.Lock
    used: float


class Service:
    """The worker's state and operations; request threads and the job thread share it (``_lock`` guards its
    dictionaries)."""

    def __init__(self, device: str = "auto", max_sessions: int = 8, session_idle_s: float = SESSION_IDLE_S,
                 embedding_budget_bytes: int = EMBEDDING_BUDGET) -> None:
        self.device = resolve_device(device)
        self.embeddings = SharedBudget(embedding_budget_bytes)
        if self.device.type == "cpu":
            tune_cpu_runtime()
        self.volumes: dict[str, Volume] = {}
        self.segments: dict[str, list[SegmentInfo]] = {}  # the label maps' segments (images have none)
        self.adapters: dict[str, Any] = {}
        self.tasks: dict[str, StoredTask] = {}
        self.sessions: dict[str, SessionEntry] = {}
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.jobs = JobRunner()
        self._lock = threading.RLock()
        self._workdir = tempfile.TemporaryDirectory(prefix="fmseg-worker-")
        self._models: dict[tuple[str, str], torch.nn.Module] = {}  # adapted models by (adapter, device)
        self._models_lock = threading.Lock()

    # ------------------------------------------------------------------ state
    def info(self) -> dict[str, Any]:
        with self._lock:
            self._expire_sessions()
            counts = {"volumes": len(self.volumes), "sessions": len(self.sessions), "adapters": len(self.adapters),
                      "tasks": len(self.tasks), "embedding_bytes": self.embeddings.bytes,
                      "embedding_budget_bytes": self.embeddings.max_bytes}
        return {"version": __version__, "device": str(self.device), "torch": torch.__version__,
                "cuda": torch.cuda.is_available(), **counts, "models": self.models()}

    def models(self) -> list[dict[str, Any]]:
        """The zoo's cards: id, kind, title, size, whether the file is here already, and whether the model draws
        candidate segmentations."""
        from FMSegCore.zoo.cache import is_cached

        return [{"id": card.name, "kind": model_kind(card), "dims": model_dims(card), "task": card.task,
                 "title": card.title, "size_bytes": card.size_bytes, "stochastic": is_stochastic(card),
                 "available": is_cached(card), "licence": card.licence} for card in list_cards()]

    def import_weights(self, name: str, data: bytes, replace: bool = False) -> dict[str, Any]:
        """Install uploaded checkpoint bytes as zoo model ``name``'s weights (``fmseg models import``: checked
        against the card and the family's layout, copied atomically into the cache); a copy of the model loaded
        before is dropped, so the next job runs the new weights."""
        from FMSegCore.zoo.import_weights import import_weights

        try:
            card = get_card(name)
        except FMSegError as error:
            raise RequestError(400, str(error)) from None
        upload = Path(self._workdir.name) / f"{uuid.uuid4().hex[:16]}-{card.filename}"
        upload.write_bytes(data)
        try:
            installed = import_weights(card, upload, replace)
        except FMSegError as error:
            message = str(error).replace(str(upload), "the uploaded file")
            raise RequestError(400, f"weights: {message}") from None
        finally:
            upload.unlink(missing_ok=True)
        with self._models_lock:
            forget_model(name)
        return {"model": name, "path": str(installed), "verified": card.verifiable}

    def start_download(self, request: DownloadRequest) -> Job:
        """Fetch a zoo model into the cache; progress is the partial file's size (the download resumes if
        cancelled and started again)."""
        from FMSegCore.zoo.cache import cached_path, fetch
        from FMSegCore.zoo.download import partial_path

        name = request.model
        try:
            card = get_card(name)
        except FMSegError as error:
            raise RequestError(400, str(error)) from None
        partial = partial_path(cached_path(card))

        def work(job: Job) -> dict[str, Any]:
            outcome: dict[str, Any] = {}
            thread = threading.Thread(target=_capture, args=(outcome, fetch, card), kwargs={"progress": False},
                                      daemon=True)
            thread.start()
            size = partial.stat().st_size if partial.exists() else 0
            clock = ProgressClock(job.progress, card.size_bytes or 0, f"downloading {name}", start=size)
            while thread.is_alive():
                clock(partial.stat().st_size if partial.exists() else 0)
                thread.join(0.2)
            if "error" in outcome:
                raise outcome["error"]
            return {"model": name, "path": str(outcome["value"])}

        return self.jobs.submit("download", work)

    def add_volume(self, array: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        """Keep an uploaded array: an image, or a label map when its meta says so (``kind`` or ``segments``)."""
        if array.ndim != 3 or min(array.shape) < 1:
            raise RequestError(400, f"volume: expected a 3D array, got shape {list(array.shape)}")
        fields = parse(VolumeMeta, meta)
        volume = volume_from_frame(array, fields)
        segments = None
        if fields.is_labels:
            if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
                raise RequestError(400, f"volume: a label map holds integers, not {array.dtype}")
            segments = segments_from_meta(fields.segments or [], array)
        volume_id = uuid.uuid4().hex[:16]
        with self._lock:
            self.volumes[volume_id] = volume
            if segments is not None:
                self.segments[volume_id] = segments
        return {"volume": volume_id, "shape": list(array.shape), "kind": "image" if segments is None else "labels"}

    def volume(self, volume_id: Any, where: str = "volume") -> Volume:
        volume = self.volumes.get(volume_id) if isinstance(volume_id, str) else None
        if volume is None:
            raise RequestError(404, f"{where}: no volume {volume_id!r} on this worker (upload it first)")
        return volume

    def label_map(self, volume_id: str, where: str) -> tuple[Volume, list[SegmentInfo]]:
        """An uploaded label map and its segments (an image is refused)."""
        volume = self.volume(volume_id, where)
        segments = self.segments.get(volume_id)
        if segments is None:
            raise RequestError(400, f"{where}: volume {volume_id!r} was uploaded as an image; upload label maps "
                                    "with kind 'labels' (or their segments) in the meta")
        return volume, segments

    def remove_volume(self, volume_id: str) -> None:
        with self._lock:
            self.volume(volume_id)
            del self.volumes[volume_id]
            self.segments.pop(volume_id, None)
            for session_id in [s for s, e in self.sessions.items() if e.volume_id == volume_id]:
                del self.sessions[session_id]

    def add_adapter(self, data: bytes) -> dict[str, Any]:
        from FMSegCore.engines.adaptation.adapter_file import load_adapter

        adapter_id = uuid.uuid4().hex[:16]
        path = Path(self._workdir.name) / f"{adapter_id}.pt"
        path.write_bytes(data)
        try:
            adapter = load_adapter(path)
        except FMSegError as error:
            path.unlink(missing_ok=True)
            raise RequestError(400, f"adapter: {getattr(error, 'problem', error)}") from None
        with self._lock:
            self.adapters[adapter_id] = adapter
        return {"adapter": adapter_id, **_adapter_summary(adapter)}

    def adapter(self, adapter_id: Any, where: str = "adapter") -> Any:
        adapter = self.adapters.get(adapter_id) if isinstance(adapter_id, str) else None
        if adapter is None:
            raise RequestError(404, f"{where}: no adapter {adapter_id!r} on this worker")
        return adapter

    def adapter_bytes(self, adapter_id: str) -> bytes:
        return Path(self.adapter(adapter_id).path).read_bytes()

    def add_task(self, data: bytes) -> dict[str, Any]:
        """Keep an uploaded task file (checked as ``fmseg incontext --task`` checks it: a task file, undamaged,
        made for a 3-D in-context model of the zoo and for its weights); its TaskInfo."""
        from FMSegCore.engines.incontext.task_file import TASK_SUFFIX

        task_id = uuid.uuid4().hex[:16]
        path = Path(self._workdir.name) / f"{task_id}{TASK_SUFFIX}"
        path.write_bytes(data)
        try:
            stored = self._read_task(path)
        except FMSegError as error:
            path.unlink(missing_ok=True)
            raise RequestError(400, f"task: {getattr(error, 'problem', error)}") from None
        with self._lock:
            self.tasks[task_id] = stored
        return stored.summary(task_id)

    @staticmethod
    def _read_task(path: Path) -> StoredTask:
        from FMSegCore.engines.incontext.task_file import load_task

        task, metadata = load_task(path)
        require_kind(metadata.model, INCONTEXT, dims=3)
        data = path.read_bytes()
        return StoredTask(path, task, metadata, hashlib.sha256(data).hexdigest(), len(data))

    def task(self, task_id: Any, where: str = "task") -> StoredTask:
        stored = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if stored is None:
            raise RequestError(404, f"{where}: no task {task_id!r} on this worker (upload it first)")
        return stored

    def task_bytes(self, task_id: str) -> bytes:
        return self.task(task_id).path.read_bytes()

    # ------------------------------------------------------------------ models
    def _device(self, name: str) -> torch.device:
        return self.device if not name else resolve_device(name)

    def model(self, name: str, device: torch.device, adapter_id: Optional[str] = None) -> torch.nn.Module:
        """A zoo model (kept by the factory), or one adapted by an uploaded adapter, built once and kept here."""
        with self._models_lock:  # request threads and the job thread may ask at once: load once
            if not adapter_id:
                return load_model(name, device)
            key = (adapter_id, str(device))
            if key not in self._models:
                from FMSegCore.engines.adaptation.engine import build_adapted

                self._models[key] = build_adapted(self.adapter(adapter_id), device, model_name=name)
            return self._models[key]

    # ------------------------------------------------------------------ prompting
    def open_session(self, request: SessionRequest) -> dict[str, Any]:
        volume = self.volume(request.volume, "session.volume")
        if request.adapter is not None and self.adapter(request.adapter, "session.adapter").mode != "prompt":
            raise RequestError(400, "session: this adapter is an automatic segmenter, not a promptable model")
        device = self._device(request.device)
        options = {"context": request.context, "modality": request.modality, "three_planes": request.three_planes}
        if request.window is not None:
            options["window"] = request.window
        _check_card(request.model, PROMPTABLE)
        model = self.model(request.model, device, request.adapter)
        axis = anatomical_axes(volume.direction)[AXIS_NAMES[request.axis]]
        session = open_prompt_session(volume, model, device, axis=axis, budget=self.embeddings,
                                      autocast_dtype=inference_dtype(device, request.precision), **options)
        session_id = uuid.uuid4().hex[:16]
        with self._lock:
            self._expire_sessions()
            self.sessions[session_id] = SessionEntry(session, request.volume, threading.Lock(), time.time())
            while len(self.sessions) > self.max_sessions:  # the least recently used goes first
                del self.sessions[min(self.sessions, key=lambda s: self.sessions[s].used)]
        return {"session": session_id, "model": request.model, "device": str(device), "axis": axis,
                "dims": session_dims(model)}

    def _expire_sessions(self) -> None:
        """Drop sessions idle longer than ``session_idle_s`` (never one that is answering a prompt)."""
        oldest = time.time() - self.session_idle_s
        for session_id in [s for s, e in self.sessions.items() if e.used < oldest and not e.lock.locked()]:
            del self.sessions[session_id]

    def close_session(self, session_id: str) -> None:
        with self._lock:
            if self.sessions.pop(session_id, None) is None:
                raise RequestError(404, f"no session {session_id!r} on this worker")

    def prompt(self, session_id: str, request: PromptRequest) -> tuple[np.ndarray, dict[str, Any]]:
        """Segment one named structure from its prompts: (KJI boolean mask, timings)."""
        with self._lock:
            self._expire_sessions()
            entry = self.sessions.get(session_id)
            if entry is not None:
                entry.used = time.time()  # not expired while it waits for its lock
        if entry is None:
            raise RequestError(404, f"no session {session_id!r} on this worker (it was closed, or expired after "
                                    f"{self.session_idle_s / 60:g} min unused)")
        prompts = _segment_prompts(request, entry.session.volume.shape_ijk)
        with entry.lock:
            timings = entry.session.timings
            before = (timings.encoded, timings.decoded)
            began = time.perf_counter()
            mask = entry.session.segment(prompts)
            if isinstance(entry.session, PromptSession):  # overlaps with earlier segments: the more confident wins
                mask = entry.session.without_contested(prompts.name)
            seconds = time.perf_counter() - began
            entry.used = time.time()
        return mask, {"name": prompts.name, "voxels": int(mask.sum()), "seconds": round(seconds, 4),
                      "encoded": timings.encoded - before[0], "decoded": timings.decoded - before[1]}

    # ------------------------------------------------------------------ jobs
    def start_incontext(self, request: IncontextRequest) -> Job:
        from FMSegCore.engines.incontext.anatomical import (
            AnatomicalInContext,
            AnatomicalSettings,
            choose_match,
        )
        from FMSegCore.engines.incontext.session import InContextSession, settings_from_options
        from FMSegCore.engines.incontext.support import SupportScan, SupportSet, example_from_arrays

        query = self.volume(request.volume, "incontext.volume")
        if (request.task is None) == (not request.supports):
            both = ", not both" if request.supports else ""
            raise RequestError(400, "incontext: give either 'supports' (labelled examples) or 'task' (an uploaded "
                                    f"or created task's id){both}")
        if request.candidates and request.task is not None:
            raise RequestError(400, "incontext.candidates: a task draws no candidates (a stochastic 2-D model such "
                                    "as tyche does, from supports)")
        if request.task is not None:
            return self._start_incontext_task(request, query)
        card = _check_card(request.model, INCONTEXT)
        if request.candidates and not is_stochastic(card):
            raise RequestError(400, f"incontext.candidates: model '{request.model}' draws no candidates (a "
                                    "stochastic model such as tyche does)")
        if model_dims(card) == 3:
            return self._start_incontext_3d(request, query)
        modality, window = request.modality, request.window
        examples, support_volumes = [], []
        for number, pair in enumerate(request.supports):
            where = f"incontext.supports[{number}]"
            image = self.volume(pair.image, f"{where}.image")
            labels, segments = self.label_map(pair.labels, f"{where}.labels")
            support_volumes.append(image)
            examples.append(example_from_arrays(image.array, labels.array, segments, f"support {number + 1}",
                                                modality, window))
        support = SupportSet(examples)
        classes = support.resolve(request.classes or None)
        settings = settings_from_options(request)
        name = request.model
        _check_card(name, INCONTEXT, dims=2)
        uncertainty = request.uncertainty
        axis_name = request.axis
        axis = anatomical_axes(query.direction)[AXIS_NAMES[axis_name]]
        device = self._device(request.device)
        match = choose_match(request.match, query, support_volumes)
        anatomical = AnatomicalSettings(prior_margin_mm=request.prior_margin_mm or None,
                                        allow_cross_modality=request.cross_modality,
                                        registration_weight=request.registration_weight)

        def work(job: Job) -> dict[str, Any]:
            job.progress(Progress(0, 1, f"loading {name}"))
            model = self.model(name, device)
            autocast = inference_dtype(device, request.precision)
            report = job.progress
            alignments = []
            if match == "anatomy":
                scans = [SupportScan(volume, example.labels, example.segments, example.source)
                         for volume, example in zip(support_volumes, examples)]
                engine = AnatomicalInContext(model, scans, [c.value for c in classes], axis_name, settings,
                                             anatomical, device, autocast, modality, window)
                job.progress(Progress(0, 1, "aligning supports to the query"))
                result, aligned = engine.segment(query, uncertainty=uncertainty, progress=report)
                alignments = [{"support": scan.source, "body_dice": round(a.body_dice, 3),
                               "overlap": round(a.overlap, 3), "stages": list(a.stages)}
                              for scan, a in zip(scans, aligned.alignments)]
            else:
                session = InContextSession(model, support, [c.value for c in classes], axis=axis,
                                           settings=settings, device=device, autocast_dtype=autocast,
                                           modality=modality, window=window)
                result = session.segment_volume(query.array, uncertainty=uncertainty, progress=report)
            job.frames["labels"] = encode_array(result.labels.astype(np.uint16), compress=True)
            if result.uncertainty is not None:
                job.frames["uncertainty"] = encode_array(result.uncertainty.astype(np.float32), compress=True)
            drawn = [f"candidate{number}" for number in range(1, len(result.candidates) + 1)]
            for frame, labels in zip(drawn, result.candidates):  # label maps like "labels", one per candidate
                job.frames[frame] = encode_array(labels.astype(np.uint16), compress=True)
            return {"segments": [_segment_json(s) for s in result.segments], "seconds": round(result.seconds, 2),
                    "model_passes": result.model_passes, "match": match, "alignments": alignments,
                    "candidates": drawn}

        return self.jobs.submit("incontext", work)

    # ------------------------------------------------------------------ tasks of 3-D in-context models
    def _support_scans(self, pairs: Sequence[Any], requested: Sequence[Any], modality: str, window: str,
                       where: str) -> tuple[list[Any], list[SegmentInfo]]:
        """The uploaded supports as scans (image, label map on its grid, segments) and the classes asked for (by
        name or value; none: every label of the supports), as ``fmseg task create`` reads its files."""
        from FMSegCore.engines.incontext.support import SupportScan, SupportSet

        scans = []
        for number, pair in enumerate(pairs):
            place = f"{where}[{number}]"
            image = self.volume(pair.image, f"{place}.image")
            labels, segments = self.label_map(pair.labels, f"{place}.labels")
            if labels.array.shape != image.array.shape:
                raise RequestError(400, f"{place}: label map shape {list(labels.array.shape)} differs from its "
                                        f"image's {list(image.array.shape)}")
            if not labels.array.any():
                raise RequestError(400, f"{place}.labels: the label map is empty (no labelled voxel)")
            scans.append(SupportScan(image, labels.array.astype(np.int32), segments, f"support {number + 1}"))
        try:
            classes = SupportSet([scan.example(modality, window) for scan in scans]).resolve(requested or None)
        except InputError as error:
            raise RequestError(400, f"{where}: {error.problem}") from None
        return scans, classes

    def _store_task(self, name: str, model: torch.nn.Module, built: Any, modality: str, window: str) -> str:
        """Write a built task as a task file in the worker's folder (as ``fmseg task create`` writes it) and keep
        it; its id."""
        from FMSegCore.engines.incontext.task_file import TASK_SUFFIX, save_task, task_metadata

        task_id = uuid.uuid4().hex[:16]
        path = Path(self._workdir.name) / f"{task_id}{TASK_SUFFIX}"
        save_task(path, built.task, task_metadata(name, model, built, modality, window))
        stored = self._read_task(path)
        with self._lock:
            self.tasks[task_id] = stored
        return task_id

    def start_task(self, request: TaskRequest) -> Job:
        """Encode uploaded labelled references into a task of a 3-D in-context model; the result names the task,
        kept like an uploaded one."""
        from FMSegCore.engines.incontext.volume3d import build_task

        name, modality, window = request.model, request.modality, request.window
        _check_card(name, INCONTEXT, dims=3)
        _check_window(window, "task")
        scans, classes = self._support_scans(request.supports, request.classes, modality, window, "task.supports")
        device = self._device(request.device)

        def work(job: Job) -> dict[str, Any]:
            job.progress(Progress(0, 2, f"loading {name}"))
            model = self.model(name, device)
            job.progress(Progress(1, 2, f"encoding {len(classes)} class{'es' * (len(classes) != 1)} from "
                                        f"{len(scans)} reference{'s' * (len(scans) != 1)}"))
            built = build_task(model, scans, classes, modality, window)
            job.check()
            task_id = self._store_task(name, model, built, modality, window)
            job.progress(Progress(2, 2, "task ready"))
            return self.tasks[task_id].summary(task_id)

        return self.jobs.submit("task", work)

    def _start_incontext_3d(self, request: IncontextRequest, query: Volume) -> Job:
        """A 3-D in-context model with supports: the task is encoded from them, then applied to the query."""
        from FMSegCore.engines.incontext.volume3d import build_task, modality_of

        name, modality, window = request.model, request.modality, request.window
        _check_window(window, "incontext")
        scans, classes = self._support_scans(request.supports or [], request.classes, modality, window,
                                             "incontext.supports")
        _check_query_modality([modality_of(scan.volume, modality) for scan in scans], query, request)
        device = self._device(request.device)

        def work(job: Job) -> dict[str, Any]:
            job.progress(Progress(0, 1, f"loading {name}"))
            model = self.model(name, device)
            job.progress(Progress(0, 1, f"encoding {len(classes)} class{'es' * (len(classes) != 1)}"))
            task = build_task(model, scans, classes, modality, window).task
            job.check()
            return self._apply_task(job, name, model, task, query, classes, request, device)

        return self.jobs.submit("incontext", work)

    def _start_incontext_task(self, request: IncontextRequest, query: Volume) -> Job:
        """An uploaded or created task applied to the query with the task's own model (``fmseg incontext
        --task``)."""
        from FMSegCore.engines.incontext.task_file import select_classes

        stored = self.task(request.task, "incontext.task")
        name = stored.metadata.model
        if "model" in request.model_fields_set and request.model != name:
            raise RequestError(400, f"incontext: task {request.task!r} was made for model {name!r}, not "
                                    f"{request.model!r} (leave 'model' out to apply it with its own)")
        _check_window(request.window, "incontext")
        try:
            task, metadata = select_classes(stored.task, stored.metadata, request.classes or None)
        except InputError as error:
            raise RequestError(400, f"incontext.classes: {error.problem}") from None
        _check_query_modality(metadata.modality.split("+"), query, request)
        device = self._device(request.device)

        def work(job: Job) -> dict[str, Any]:
            job.progress(Progress(0, 1, f"loading {name}"))
            model = self.model(name, device)
            if tuple(task.shape[1:]) != tuple(model.task_shape):
                raise InputError(None, f"task {request.task!r} holds embeddings of shape {tuple(task.shape[1:])}, "
                                       f"{name} uses {tuple(model.task_shape)}")
            return self._apply_task(job, name, model, task, query, metadata.classes, request, device, request.task)

        return self.jobs.submit("incontext", work)

    def _apply_task(self, job: Job, name: str, model: torch.nn.Module, task: torch.Tensor, query: Volume,
                    classes: Sequence[SegmentInfo], request: IncontextRequest, device: torch.device,
                    task_id: Optional[str] = None) -> dict[str, Any]:
        """Apply a task as ``fmseg incontext`` does (labels on the query's grid; the uncertainty map is the
        normalised entropy of the class probabilities); the job's frames and result."""
        from FMSegCore.engines.incontext.volume3d import apply_task

        began = time.perf_counter()
        result = apply_task(model, task, query, classes, request.modality, request.window, progress=job.progress,
                            uncertainty=request.uncertainty,
                            autocast_dtype=inference_dtype(device, request.precision))
        job.frames["labels"] = encode_array(result.labels.astype(np.uint16), compress=True)
        if result.uncertainty is not None:
            job.frames["uncertainty"] = encode_array(result.uncertainty.astype(np.float32), compress=True)
        return {"segments": [_segment_json(s) for s in classes], "seconds": round(time.perf_counter() - began, 2),
                "model": name, "dims": 3, "task": task_id}

    def start_adaptation(self, request: AdaptRequest) -> Job:
        from FMSegCore.engines.adaptation.adapter_file import load_adapter, save_adapter
        from FMSegCore.engines.adaptation.cases import case_from_arrays, resolve_structures
        from FMSegCore.engines.adaptation.defaults import default_method
        from FMSegCore.engines.adaptation.engine import adapt, split_validation, train_settings
        from FMSegCore.engines.adaptation.geometry import SliceGeometry
        from FMSegCore.engines.adaptation.methods import MethodSettings

        modality, window, axis_name = request.modality, request.window, request.axis
        cases = []
        for number, pair in enumerate(request.cases):
            where = f"adapt.cases[{number}]"
            image = self.volume(pair.image, f"{where}.image")
            labels, segments = self.label_map(pair.labels, f"{where}.labels")
            axis = anatomical_axes(image.direction)[AXIS_NAMES[axis_name]]
            cases.append(case_from_arrays(image.array, labels.array, segments, f"case {number + 1}", image.spacing,
                                          axis, modality, window, direction=image.direction))
        cases, held_out = split_validation(cases, request.holdout)
        structures = resolve_structures(cases, request.labels or None)
        mode = request.mode
        method_name = default_method(mode, request.method)
        method = MethodSettings(method_name, rank=request.rank)
        training = train_settings(mode, method_name, request.steps, request.batch_size, learning_rate=request.lr,
                                  seed=request.seed, precision=request.precision)
        geometry = None if request.whole_slice else SliceGeometry(pixel_mm=request.pixel_mm)
        views, name = request.views, request.model
        device = self._device(request.device)

        def work(job: Job) -> dict[str, Any]:
            job.progress(Progress(0, training.total_steps, f"loading {name}"))
            result = adapt(name, mode, cases, structures, method, training, device, held_out,
                           modality=cases[0].modality if cases else modality, window=window, axis=axis_name,
                           progress=job.progress,
                           cancel=lambda: job.cancelled, geometry=geometry, views=views)
            adapter_id = uuid.uuid4().hex[:16]
            path = Path(self._workdir.name) / f"{adapter_id}.pt"
            save_adapter(path, result.metadata, result.state)
            adapter = load_adapter(path)
            with self._lock:
                self.adapters[adapter_id] = adapter
            return {"adapter": adapter_id, **_adapter_summary(adapter)}

        return self.jobs.submit("adapt", work)

    def start_auto_segmentation(self, request: SegmentRequest) -> Job:
        from FMSegCore.engines.adaptation.auto_segment import scan_modality, segment_with_adapter

        volume = self.volume(request.volume, "segment.volume")
        adapter = self.adapter(request.adapter, "segment.adapter")
        if adapter.mode != "auto":
            raise RequestError(400, "segment: this adapter adapts a promptable model; use it in a prompt session")
        device = self._device(request.device)
        try:
            modality = scan_modality(volume, f"segment.volume {request.volume!r}", adapter.metadata,
                                     request.modality, override="'modality':")
        except InputError as error:
            raise RequestError(400, str(error)) from None

        def work(job: Job) -> dict[str, Any]:
            job.progress(Progress(0, 1, f"loading {adapter.base_model}"))
            model = self.model(adapter.base_model, device, request.adapter)
            labels = segment_with_adapter(model, adapter.metadata, volume, device,
                                          inference_dtype(device, request.precision),
                                          progress=job.progress,
                                          modality=modality)
            job.frames["labels"] = encode_array(labels.astype(np.uint16), compress=True)
            return {"segments": adapter.metadata["structures"]}

        return self.jobs.submit("segment", work)

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id!r} on this worker")
        return job

    def shutdown(self) -> None:
        self.jobs.shutdown()
        self._workdir.cleanup()


# ---------------------------------------------------------------------------------------------- helpers


def _capture(outcome: dict[str, Any], function: Any, *args: Any, **kwargs: Any) -> None:
    try:
        outcome["value"] = function(*args, **kwargs)
    except Exception as error:  # handed to the waiting job
        outcome["error"] = error


def _check_card(name: str, kind: str, dims: Optional[int] = None) -> Any:
    """The card of ``name``; refuse (400) a model that is not of ``kind`` (or, given ``dims``, works in other
    dimensions)."""
    try:
        return require_kind(name, kind, dims)
    except FMSegError as error:
        raise RequestError(400, str(error)) from None


def _check_query_modality(references: Sequence[str], query: Volume, request: IncontextRequest) -> None:
    """The 3-D path's modality rule (:func:`~FMSegCore.engines.incontext.volume3d.check_query_modality`) as a
    request error."""
    from FMSegCore.engines.incontext.volume3d import check_query_modality

    try:
        check_query_modality(references, query, request.modality, request.cross_modality)
    except InputError as error:
        raise RequestError(400, f"incontext.volume: {error.problem}") from None


def _check_window(window: str, where: str) -> None:
    """Refuse (400) a CT window that is not a preset (abdomen, lung, bone), before a job starts."""
    from FMSegCore.preprocessing.intensity import ct_window

    try:
        ct_window(window)
    except (FMSegError, ValueError) as error:
        raise RequestError(400, f"{where}: field 'window': {getattr(error, 'problem', error)}") from None


def _segment_json(segment: SegmentInfo) -> dict[str, Any]:
    return {"value": segment.value, "name": segment.name, "color": list(segment.color)}


def _adapter_summary(adapter: Any) -> dict[str, Any]:
    meta = adapter.metadata
    return {"base_model": adapter.base_model, "mode": adapter.mode, "method": meta["method"]["method"],
            "structures": meta["structures"], "validation_dice": meta.get("validation_dice"),
            "fit": meta.get("fit"), "trainable_parameters": meta.get("trainable_parameters"),
            "geometry": meta.get("geometry"), "views": meta.get("views"),
            "bytes": Path(adapter.path).stat().st_size if adapter.path else None}


def _segment_prompts(request: PromptRequest, shape_ijk: tuple[int, int, int]) -> SegmentPrompts:
    """Prompts of one segment (continuous IJK voxel indices), checked against the volume."""
    low, high = np.full(3, -0.5), np.asarray(shape_ijk, dtype=float) - 0.5
    boxes = []
    for number, box in enumerate(request.boxes):
        lo, hi = np.asarray(box.lo), np.asarray(box.hi)
        if np.any(np.maximum(lo, hi) < low) or np.any(np.minimum(lo, hi) > high):
            raise RequestError(400, f"prompt.boxes[{number}]: the box lies outside the volume")
        boxes.append(BoxPrompt(box.lo, box.hi, None if box.corners is None else tuple(box.corners)))
    points = []
    for number, point in enumerate(request.points):
        ijk = np.asarray(point.ijk)
        if np.any(ijk < low) or np.any(ijk > high):
            raise RequestError(400, f"prompt.points[{number}]: the point lies outside the volume")
        points.append(PointPrompt(point.ijk, point.include))
    curves = []
    for number, curve in enumerate(request.curves):
        problem = curve_problem(curve.points, curve.closed)
        if problem or np.any(np.asarray(curve.points) < low) or np.any(np.asarray(curve.points) > high):
            raise RequestError(400, f"prompt.curves[{number}]: {problem or 'a point lies outside the volume'}")
        curves.append(CurvePrompt(tuple(curve.points), curve.include, curve.closed, source=f"prompt.curves[{number}]"))
    prompts = SegmentPrompts(request.name, boxes, points, curves=curves)
    if prompts.is_empty():
        raise RequestError(400, f"prompt: segment '{request.name}' has no box and no include point to start from")
    return prompts


__all__ = ["Service", "volume_from_frame"]
