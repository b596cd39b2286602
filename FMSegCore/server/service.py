"""What the worker does, independent of HTTP: volumes, adapters, prompt sessions (with their embedding caches)
and long jobs, addressed by ids. :mod:`FMSegCore.server.app` maps HTTP requests onto it."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from FMSegCore import __version__
from FMSegCore.device import inference_dtype, resolve_device, tune_cpu_runtime
from FMSegCore.engines.prompting.prompts import BoxPrompt, PointPrompt, SegmentPrompts
from FMSegCore.engines.prompting.session import PromptSession
from FMSegCore.errors import FMSegError, InputError
from FMSegCore.io.labelmap import SegmentInfo, default_segment
from FMSegCore.io.overlay import anatomical_axes
from FMSegCore.io.volume import Volume
from FMSegCore.models.factory import load_model
from FMSegCore.preprocessing.slicing import AXIS_NAMES
from FMSegCore.server.fields import Fields, RequestError
from FMSegCore.server.jobs import Job, JobRunner
from FMSegCore.server.wire import encode_array
from FMSegCore.zoo.registry import DEFAULT_INCONTEXT, DEFAULT_PROMPTABLE, get_card, list_cards

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: What each architecture does, for clients choosing a model.
KINDS = {"litemedsam": "promptable", "universeg": "incontext", "swinunetr": "volume"}


def model_kind(card: Any) -> str:
    """promptable, incontext, volume, or 'reference' for cards FMSeg cannot run yet."""
    return KINDS.get(card.architecture or "", "reference")


def volume_from_frame(array: np.ndarray, meta: dict[str, Any]) -> Volume:
    """A :class:`Volume` from an uploaded KJI array and its geometry (spacing, origin, 3x3 direction; LPS)."""
    fields = Fields(meta, "volume")
    if array.ndim != 3 or min(array.shape) < 1:
        raise RequestError(400, f"volume: expected a 3D array, got shape {list(array.shape)}")
    spacing = fields.vector("spacing")
    if min(spacing) <= 0:
        raise RequestError(400, "volume: spacing must be positive")
    direction = np.asarray(fields.vector("direction", 9)).reshape(3, 3)
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise RequestError(400, "volume: direction must be a 3x3 rotation (row-major)")
    name = meta.get("name")
    return Volume(array, spacing, fields.vector("origin"), direction, str(name) if name else None)


def segments_from_meta(meta: dict[str, Any], labels: np.ndarray) -> list[SegmentInfo]:
    """The label map's segments named in its meta, plus default ones for values it does not name."""
    named: dict[int, SegmentInfo] = {}
    for number, entry in enumerate(Fields(meta, "labels").items("segments", [])):
        item = Fields(entry, f"labels.segments[{number}]")
        value = item.number("value", integer=True, low=1, high=65535)
        color = item.body.get("color")
        info = default_segment(value, item.text("name"))
        if isinstance(color, list) and len(color) == 3:
            info = SegmentInfo(value, info.name, tuple(float(c) for c in color))
        named[value] = info
    present = [int(v) for v in np.unique(labels) if v != 0]
    return list(named.values()) + [default_segment(v) for v in present if v not in named]


@dataclass
class SessionEntry:
    """A prompt session, the lock that serialises its prompts, and when it was last used."""

    session: PromptSession
    volume_id: str
    lock: threading.Lock
    used: float


class Service:
    """The worker's state and operations."""

    def __init__(self, device: str = "auto", max_sessions: int = 8) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            tune_cpu_runtime()
        self.volumes: dict[str, Volume] = {}
        self.segments: dict[str, list[SegmentInfo]] = {}
        self.adapters: dict[str, Any] = {}
        self.sessions: dict[str, SessionEntry] = {}
        self.max_sessions = max_sessions
        self.jobs = JobRunner()
        self._workdir = tempfile.TemporaryDirectory(prefix="fmseg-worker-")
        self._models: dict[tuple[str, str], torch.nn.Module] = {}  # adapted models by (adapter, device)
        self._models_lock = threading.Lock()

    # ------------------------------------------------------------------ state
    def info(self) -> dict[str, Any]:
        return {"version": __version__, "device": str(self.device), "torch": torch.__version__,
                "cuda": torch.cuda.is_available(), "volumes": len(self.volumes), "sessions": len(self.sessions),
                "adapters": len(self.adapters),
                "models": self.models()}

    def models(self) -> list[dict[str, Any]]:
        """The zoo's cards: id, kind, title, size, and whether the file is here already."""
        from FMSegCore.zoo.cache import is_cached

        return [{"id": card.name, "kind": model_kind(card), "title": card.title, "size_bytes": card.size_bytes,
                 "available": is_cached(card), "licence": card.licence} for card in list_cards()]

    def start_download(self, body: Any) -> Job:
        """Fetch a zoo model into the cache; progress is the partial file's size (the download resumes if
        cancelled and started again)."""
        from FMSegCore.zoo.cache import cached_path, fetch
        from FMSegCore.zoo.download import partial_path

        name = Fields(body, "download").text("model")
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
            while thread.is_alive():
                size = partial.stat().st_size if partial.exists() else 0
                job.progress(size, card.size_bytes or 0, f"downloading {name}")
                thread.join(0.2)
            if "error" in outcome:
                raise outcome["error"]
            return {"model": name, "path": str(outcome["value"])}

        return self.jobs.submit("download", work)

    def add_volume(self, array: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        volume = volume_from_frame(array, meta)
        volume_id = uuid.uuid4().hex[:16]
        self.volumes[volume_id] = volume
        if np.issubdtype(array.dtype, np.integer):
            self.segments[volume_id] = segments_from_meta(meta, array)
        return {"volume": volume_id, "shape": list(array.shape)}

    def volume(self, volume_id: Any, where: str = "volume") -> Volume:
        if not isinstance(volume_id, str) or volume_id not in self.volumes:
            raise RequestError(404, f"{where}: no volume {volume_id!r} on this worker (upload it first)")
        return self.volumes[volume_id]

    def remove_volume(self, volume_id: str) -> None:
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
        self.adapters[adapter_id] = adapter
        return {"adapter": adapter_id, **_adapter_summary(adapter)}

    def adapter(self, adapter_id: Any) -> Any:
        if not isinstance(adapter_id, str) or adapter_id not in self.adapters:
            raise RequestError(404, f"no adapter {adapter_id!r} on this worker")
        return self.adapters[adapter_id]

    def adapter_bytes(self, adapter_id: str) -> bytes:
        return Path(self.adapter(adapter_id).path).read_bytes()

    # ------------------------------------------------------------------ models
    def _device(self, fields: Fields) -> torch.device:
        name = fields.text("device", "")
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
    def open_session(self, body: Any) -> dict[str, Any]:
        fields = Fields(body, "session")
        volume_id = fields.text("volume")
        volume = self.volume(volume_id)
        name = fields.text("model", DEFAULT_PROMPTABLE)
        adapter_id = fields.text("adapter", None)
        if adapter_id is not None and self.adapter(adapter_id).mode != "prompt":
            raise RequestError(400, "session: this adapter is an automatic segmenter, not a promptable model")
        axis_name = fields.text("axis", "axial", choices=tuple(AXIS_NAMES))
        precision = fields.text("precision", "auto", choices=PRECISIONS)
        device = self._device(fields)
        options = {"context": fields.text("context", "auto", choices=("auto", "crop", "full")),
                   "modality": fields.text("modality", "auto", choices=("auto", "CT", "MR"))}
        window = fields.text("window", None)
        if window is not None:
            options["window"] = window
        _check_card(name, "promptable")
        model = self.model(name, device, adapter_id)
        axis = anatomical_axes(volume.direction)[AXIS_NAMES[axis_name]]
        session = PromptSession(volume, model, device, axis=axis, autocast_dtype=inference_dtype(device, precision),
                                **options)
        session_id = uuid.uuid4().hex[:16]
        self.sessions[session_id] = SessionEntry(session, volume_id, threading.Lock(), time.time())
        self._forget_sessions()
        return {"session": session_id, "model": name, "device": str(device), "axis": axis}

    def _forget_sessions(self) -> None:
        while len(self.sessions) > self.max_sessions:
            oldest = min(self.sessions, key=lambda s: self.sessions[s].used)
            del self.sessions[oldest]

    def close_session(self, session_id: str) -> None:
        if session_id not in self.sessions:
            raise RequestError(404, f"no session {session_id!r} on this worker")
        del self.sessions[session_id]

    def prompt(self, session_id: str, body: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Segment one named structure from its prompts: (KJI boolean mask, timings)."""
        entry = self.sessions.get(session_id)
        if entry is None:
            raise RequestError(404, f"no session {session_id!r} on this worker (it may have been closed)")
        prompts = _segment_prompts(Fields(body, "prompt"), entry.session.volume.shape_ijk)
        with entry.lock:
            entry.used = time.time()
            timings = entry.session.timings
            before = (timings.encoded, timings.decoded)
            began = time.perf_counter()
            mask = entry.session.segment(prompts)
            seconds = time.perf_counter() - began
        return mask, {"name": prompts.name, "voxels": int(mask.sum()), "seconds": round(seconds, 4),
                      "encoded": timings.encoded - before[0], "decoded": timings.decoded - before[1]}

    # ------------------------------------------------------------------ jobs
    def start_incontext(self, body: Any) -> Job:
        from FMSegCore.engines.incontext.anatomical import (
            MATCHES,
            PRIOR_MARGIN_MM,
            REGISTRATION_WEIGHT,
            AnatomicalInContext,
            AnatomicalSettings,
            choose_match,
        )
        from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
        from FMSegCore.engines.incontext.support import SupportScan, SupportSet, example_from_arrays

        fields = Fields(body, "incontext")
        query = self.volume(fields.text("volume"))
        modality = fields.text("modality", "auto", choices=("auto", "CT", "MR"))
        window = fields.text("window", "abdomen")
        examples, support_volumes = [], []
        for number, entry in enumerate(fields.items("supports", max_items=256)):
            item = Fields(entry, f"incontext.supports[{number}]")
            image = self.volume(item.text("image"), f"{item.where}.image")
            support_volumes.append(image)
            labels = self.volume(item.text("labels"), f"{item.where}.labels")
            segments = self.segments.get(item.body["labels"], [])
            examples.append(example_from_arrays(image.array, labels.array, segments, f"support {number + 1}",
                                                modality, window))
        support = SupportSet(examples)
        classes = support.resolve(fields.items("classes", []) or None)
        settings = InContextSettings(support_size=fields.number("support_size", 8, 1, 64, integer=True),
                                     ensemble=fields.number("ensemble", 1, 1, 16, integer=True),
                                     match_tolerance=fields.number("tolerance", 0.05, 1e-3, 1.0),
                                     seed=fields.number("seed", 0, integer=True))
        name = fields.text("model", DEFAULT_INCONTEXT)
        _check_card(name, "incontext")
        uncertainty = fields.flag("uncertainty", False)
        axis_name = fields.text("axis", "axial", choices=tuple(AXIS_NAMES))
        axis = anatomical_axes(query.direction)[AXIS_NAMES[axis_name]]
        device = self._device(fields)
        precision = fields.text("precision", "auto", choices=PRECISIONS)

        match = choose_match(fields.text("match", "auto", choices=MATCHES), query, support_volumes)
        margin = fields.number("prior_margin_mm", PRIOR_MARGIN_MM, 0.0, 500.0)
        cross_modality = fields.flag("cross_modality", False)
        weight = fields.number("registration_weight", REGISTRATION_WEIGHT, 0.0, 1.0)

        def work(job: Job) -> dict[str, Any]:
            job.progress(0, 1, f"loading {name}")
            model = self.model(name, device)
            autocast = inference_dtype(device, precision)
            report = lambda message, done, total: job.progress(done, total, message)  # noqa: E731
            alignments = []
            if match == "anatomy":
                scans = [SupportScan(volume, example.labels, example.segments, example.source)
                         for volume, example in zip(support_volumes, examples)]
                engine = AnatomicalInContext(model, scans, [c.value for c in classes], axis_name, settings,
                                             AnatomicalSettings(prior_margin_mm=margin or None,
                                                                allow_cross_modality=cross_modality,
                                                                registration_weight=weight),
                                             device, autocast,
                                             modality, window)
                job.progress(0, 1, "aligning supports to the query")
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
            return {"segments": [_segment_json(s) for s in result.segments], "seconds": round(result.seconds, 2),
                    "model_passes": result.model_passes, "match": match, "alignments": alignments}

        return self.jobs.submit("incontext", work)

    def start_adaptation(self, body: Any) -> Job:
        from FMSegCore.engines.adaptation.adapter_file import load_adapter, save_adapter
        from FMSegCore.engines.adaptation.cases import case_from_arrays, resolve_structures
        from FMSegCore.engines.adaptation.defaults import (
            DEFAULT_PIXEL_MM,
            DEFAULT_RANK,
            DEFAULT_VIEWS,
            MAX_RANK,
            METHOD_CHOICES,
            MODES,
            default_method,
        )
        from FMSegCore.engines.adaptation.engine import adapt, split_validation, train_settings
        from FMSegCore.engines.adaptation.geometry import SliceGeometry
        from FMSegCore.engines.adaptation.methods import MethodSettings

        fields = Fields(body, "adapt")
        modality = fields.text("modality", "auto", choices=("auto", "CT", "MR"))
        window = fields.text("window", "abdomen")
        axis_name = fields.text("axis", "axial", choices=tuple(AXIS_NAMES))
        cases = []
        for number, entry in enumerate(fields.items("cases", max_items=256)):
            item = Fields(entry, f"adapt.cases[{number}]")
            image = self.volume(item.text("image"), f"{item.where}.image")
            labels = self.volume(item.text("labels"), f"{item.where}.labels")
            axis = anatomical_axes(image.direction)[AXIS_NAMES[axis_name]]
            cases.append(case_from_arrays(image.array, labels.array, self.segments.get(item.body["labels"], []),
                                          f"case {number + 1}", image.spacing, axis, modality, window,
                                          direction=image.direction))
        cases, held_out = split_validation(cases, fields.number("holdout", 0, 0, 255, integer=True))
        structures = resolve_structures(cases, fields.items("labels", []) or None)
        mode = fields.text("mode", "auto", choices=MODES)
        method_name = default_method(mode, fields.text("method", None, choices=METHOD_CHOICES))
        method = MethodSettings(method_name, rank=fields.number("rank", DEFAULT_RANK, 1, MAX_RANK, integer=True))
        training = train_settings(mode, method_name, fields.number("steps", None, 1, 100_000, integer=True),
                                  fields.number("batch_size", None, 1, 256, integer=True),
                                  learning_rate=fields.number("lr", None, 0.0, 10.0),
                                  seed=fields.number("seed", 0, integer=True),
                                  precision=fields.text("precision", "auto", choices=PRECISIONS))
        whole_slice = fields.flag("whole_slice", False)
        geometry = None if whole_slice else SliceGeometry(
            pixel_mm=fields.number("pixel_mm", DEFAULT_PIXEL_MM, 0.05, 20.0))
        views = fields.number("views", DEFAULT_VIEWS, 1, 10_000, integer=True)
        name = fields.text("model", DEFAULT_PROMPTABLE)
        device = self._device(fields)

        def work(job: Job) -> dict[str, Any]:
            job.progress(0, training.total_steps, "loading")
            result = adapt(name, mode, cases, structures, method, training, device, held_out,
                           modality=cases[0].modality if cases else modality, window=window, axis=axis_name,
                           progress=lambda p: job.progress(p.step, p.steps, f"loss {p.loss:.3f}"),
                           cancel=lambda: job.cancelled, geometry=geometry, views=views)
            adapter_id = uuid.uuid4().hex[:16]
            path = Path(self._workdir.name) / f"{adapter_id}.pt"
            save_adapter(path, result.metadata, result.state)
            adapter = load_adapter(path)
            self.adapters[adapter_id] = adapter
            return {"adapter": adapter_id, **_adapter_summary(adapter)}

        return self.jobs.submit("adapt", work)

    def start_auto_segmentation(self, body: Any) -> Job:
        from FMSegCore.engines.adaptation.auto_segment import scan_modality, segment_with_adapter

        fields = Fields(body, "segment")
        volume = self.volume(fields.text("volume"))
        adapter = self.adapter(fields.text("adapter"))
        if adapter.mode != "auto":
            raise RequestError(400, "segment: this adapter adapts a promptable model; use it in a prompt session")
        device = self._device(fields)
        precision = fields.text("precision", "auto", choices=PRECISIONS)
        try:
            modality = scan_modality(volume, f"segment.volume {fields.body['volume']!r}", adapter.metadata,
                                     fields.text("modality", "auto", choices=("auto", "CT", "MR")),
                                     override="'modality':")
        except InputError as error:
            raise RequestError(400, str(error)) from None

        def work(job: Job) -> dict[str, Any]:
            job.progress(0, 1, "loading")
            model = self.model(adapter.base_model, device, body["adapter"])
            labels = segment_with_adapter(model, adapter.metadata, volume, device, inference_dtype(device, precision),
                                          progress=lambda done, total: job.progress(done, total, "segmenting"),
                                          modality=modality)
            job.frames["labels"] = encode_array(labels.astype(np.uint16), compress=True)
            return {"segments": adapter.metadata["structures"]}

        return self.jobs.submit("segment", work)

    def job(self, job_id: str) -> Job:
        if job_id not in self.jobs.jobs:
            raise RequestError(404, f"no job {job_id!r} on this worker")
        return self.jobs.jobs[job_id]

    def shutdown(self) -> None:
        self.jobs.shutdown()
        self._workdir.cleanup()


# ---------------------------------------------------------------------------------------------- helpers


def _capture(outcome: dict[str, Any], function: Any, *args: Any, **kwargs: Any) -> None:
    try:
        outcome["value"] = function(*args, **kwargs)
    except Exception as error:  # handed to the waiting job
        outcome["error"] = error


def _check_card(name: str, kind: str) -> None:
    try:
        card = get_card(name)
    except FMSegError as error:
        raise RequestError(400, str(error)) from None
    if model_kind(card) != kind:
        raise RequestError(400, f"model '{name}' is not a {kind} model (it is {model_kind(card)})")


def _segment_json(segment: SegmentInfo) -> dict[str, Any]:
    return {"value": segment.value, "name": segment.name, "color": list(segment.color)}


def _adapter_summary(adapter: Any) -> dict[str, Any]:
    meta = adapter.metadata
    return {"base_model": adapter.base_model, "mode": adapter.mode, "method": meta["method"]["method"],
            "structures": meta["structures"], "validation_dice": meta.get("validation_dice"),
            "fit": meta.get("fit"), "trainable_parameters": meta.get("trainable_parameters"),
            "geometry": meta.get("geometry"), "views": meta.get("views"),
            "bytes": Path(adapter.path).stat().st_size if adapter.path else None}


def _segment_prompts(fields: Fields, shape_ijk: tuple[int, int, int]) -> SegmentPrompts:
    """Prompts of one segment from JSON (continuous IJK voxel indices), checked against the volume."""
    name = fields.text("name")
    low, high = np.full(3, -0.5), np.asarray(shape_ijk, dtype=float) - 0.5
    boxes = []
    for number, entry in enumerate(fields.items("boxes", [], max_items=256)):
        item = Fields(entry, f"prompt.boxes[{number}]")
        lo, hi = np.asarray(item.vector("lo")), np.asarray(item.vector("hi"))
        if np.any(np.maximum(lo, hi) < low) or np.any(np.minimum(lo, hi) > high):
            raise RequestError(400, f"{item.where}: the box lies outside the volume")
        corners = None
        if item.body.get("corners") is not None:  # an oriented ROI: its 8 corners (IJK)
            points = item.items("corners", max_items=8)
            if len(points) != 8:
                raise RequestError(400, f"{item.where}: field 'corners' must hold 8 corners")
            corners = tuple(Fields({"c": c}, f"{item.where}.corners").vector("c") for c in points)
        boxes.append(BoxPrompt(tuple(lo), tuple(hi), corners))
    points = []
    for number, entry in enumerate(fields.items("points", [], max_items=1024)):
        item = Fields(entry, f"prompt.points[{number}]")
        ijk = np.asarray(item.vector("ijk"))
        if np.any(ijk < low) or np.any(ijk > high):
            raise RequestError(400, f"{item.where}: the point lies outside the volume")
        points.append(PointPrompt(tuple(ijk), item.flag("include", True)))
    prompts = SegmentPrompts(name, boxes, points)
    if prompts.is_empty():
        raise RequestError(400, f"prompt: segment '{name}' has no box and no include point to start from")
    return prompts


__all__ = ["Service", "InputError", "volume_from_frame"]
