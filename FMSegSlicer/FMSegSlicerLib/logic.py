"""FMSeg's Slicer Logic: scene in, worker requests, results back into the scene. No Qt in here, so headless
Slicer scripts use it as the panel does.

Every operation has three phases: *prepare* reads the scene (arrays, geometry, prompts) on the calling thread;
*request* talks to the worker (uploads, prompts, jobs) and may run on a background thread; *apply* writes the
result into the scene on the calling thread. ``prompt()``, ``run_incontext()``... run all three and block;
the ``*_async`` variants return a :class:`Pending` whose ``result()``, called on the GUI thread once ``done()``,
applies the result, so the GUI never waits on the network and MRML is only touched on its own thread.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import slicer
import slicer.util

from FMSegCore.engines.adaptation.defaults import default_method
from FMSegCore.io.colors import segment_color
from FMSegCore.options import Adaptation, InContext, Prompting, TaskCreation
from FMSegCore.progress import ProgressCallback
from FMSegCore.server.client import JobCancelledError, WorkerClient, WorkerError, WorkerUnavailable
from FMSegCore.server.launcher import PYTHON_ENV, LocalWorker
from FMSegSlicerLib import scene_segments
from FMSegSlicerLib.scene_geometry import add_volume_like, volume_meta
from FMSegSlicerLib.scene_prompts import collect_prompts

DEFAULT_PROMPT_MODEL = Prompting.model  # the settings' defaults are FMSegCore.options' (the CLI's, the worker's)
DEFAULT_INCONTEXT_MODEL = InContext.model
DEFAULT_TASK_MODEL = TaskCreation.model
#: How task files of 3-D in-context models end (FMSegCore.engines.incontext.task_file.TASK_SUFFIX; that module is
#: not imported here: it is the worker's business to read them).
TASK_SUFFIX = ".fmseg-task"
UNDO_DEPTH = 20

Pair = tuple[Any, Any, Sequence[str]]  # (volume node, segmentation node, segment ids; empty: all)


class Cancelled(Exception):
    """The user cancelled a running job; the scene was not changed."""


class MissingDependencies(Exception):
    """The worker's Python lacks packages (``report``: what is missing and what to do)."""

    def __init__(self, report: Any) -> None:
        super().__init__(report.describe())
        self.report = report


class WorkerCrashed(Exception):
    """The local worker process stopped; it has been restarted, the scene is untouched."""


def default_worker_python() -> str:
    """The Python that runs a local worker: FMSEG_WORKER_PYTHON (an environment of its own, holding torch),
    else Slicer's PythonSlicer when running inside Slicer, else this interpreter."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    home = getattr(getattr(slicer, "app", None), "slicerHome", None)
    if home:  # inside Slicer: its Python launcher (sys.executable there is the application itself)
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        bundled = Path(str(home)) / "bin" / name
        return str(bundled) if bundled.exists() else (shutil.which("PythonSlicer") or sys.executable)
    return sys.executable


class Pending:
    """A request running in the background; ``result()`` (on the GUI thread) applies it to the scene once."""

    def __init__(self, future: Future, apply: Callable[[Any], Any]) -> None:
        self._future = future
        self._apply = apply
        self._applied = False
        self._value: Any = None

    def done(self) -> bool:
        return self._future.done()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return self._future.exception(timeout)

    def result(self, timeout: Optional[float] = None) -> Any:
        value = self._future.result(timeout)
        if not self._applied:
            self._value, self._applied = self._apply(value), True
        return self._value


@dataclass
class Upload:
    """What the worker holds of a node: its id there and the node's modification time when sent."""

    volume_id: str
    mtime: int


@dataclass
class AdapterState:
    """The current adapter: its summary from the worker, its id there, and its bytes (kept for saving and
    for re-sending after a worker restart)."""

    info: dict[str, Any] = field(default_factory=dict)
    adapter_id: str = ""
    data: bytes = b""


@dataclass
class TaskState:
    """The loaded task (of a 3-D in-context model): its summary from the worker, its id there, its bytes (kept
    for re-sending after a worker restart) and the file it came from."""

    info: dict[str, Any] = field(default_factory=dict)
    task_id: str = ""
    data: bytes = b""
    path: str = ""


class FMSegLogic:
    """Scene <-> worker. Uses a local worker process unless connected to a server URL."""

    def __init__(self, scene: Any = None, python: Optional[str] = None, device: str = "auto",
                 check_dependencies: bool = True) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.python = python
        self.device = device
        self.url = ""
        self.token = ""
        self.local: Optional[LocalWorker] = None
        self.client: Optional[WorkerClient] = None
        self.adapter = AdapterState()
        self.task = TaskState()
        self.check_dependencies = check_dependencies
        self._ready_pythons: set[str] = set()
        self._uploads: dict[str, Upload] = {}  # by volume node id
        self._sessions: dict[tuple, str] = {}
        self._undo: dict[str, list[Any]] = {}
        # Two lanes: prompts stay interactive while a long job (adaptation, in-context) runs in the other.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmseg-prompts")
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmseg-jobs")

    # ------------------------------------------------------------------ worker
    def connect(self, url: str = "", token: str = "", device: str = "") -> dict[str, Any]:
        """Start a local worker (no URL) or connect to a running one; the worker's info."""
        self.disconnect()
        self.device = device or self.device
        self.url, self.token = url.strip(), token.strip()
        if self.url:
            self.client = WorkerClient(self.url, self.token)
        else:
            python = self.python or default_worker_python()
            self._require_dependencies(python)
            self.local = LocalWorker(python=python, device=self.device)
            self.client = self.local.start()
        return self.client.info()

    def _require_dependencies(self, python: str) -> None:
        """Check the worker's Python once (in a separate process); raise :class:`MissingDependencies`."""
        if not self.check_dependencies or python in self._ready_pythons:
            return
        from FMSegSlicerLib.dependencies import check

        report = check(python)
        if report.missing or report.conflicts or "version" not in report.torch:
            raise MissingDependencies(report)
        self._ready_pythons.add(python)

    def install_dependencies(self, report: Any) -> str:
        """Install what ``report`` lists as missing (after the user agreed; off the GUI thread), leaving every
        installed package as it is; pip's last line."""
        from FMSegSlicerLib.dependencies import install_missing

        result = install_missing(report)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        if result.returncode != 0:
            raise RuntimeError(f"pip could not install {', '.join(report.missing)}: {lines[-1] if lines else ''}")
        return lines[-1] if lines else "installed"

    def disconnect(self) -> None:
        """Stop the local worker (a remote one keeps running) and forget what it held."""
        if self.local is not None:
            self.local.stop()
        elif self.client is not None:
            self.client.close()
        self.local, self.client = None, None
        self._forget_worker_state()

    def _forget_worker_state(self) -> None:
        self._uploads.clear()
        self._sessions.clear()
        self.adapter.adapter_id = ""
        self.task.task_id = ""

    def _worker(self) -> WorkerClient:
        if self.client is None:
            self.connect(self.url, self.token)
        assert self.client is not None
        return self.client

    def _guarded(self, request: Callable[[], Any]) -> Any:
        """Run a request; a crashed local worker is restarted and reported, 404s of forgotten state retried."""
        try:
            try:
                return request()
            except WorkerError as error:
                if error.status != 404 or isinstance(error, WorkerUnavailable):
                    raise
                self._forget_worker_state()  # the worker forgot a volume or session (restarted, evicted)
                return request()
        except JobCancelledError:
            raise Cancelled("cancelled") from None
        except WorkerUnavailable:
            if self.local is None or self.local.running:
                raise
            code, last = self.local.exit_code, self.local.last_log_line()
            self._forget_worker_state()
            self.client = self.local.start()
            raise WorkerCrashed(f"the FMSeg worker stopped (exit code {code}{': ' + last if last else ''}); it was "
                                "restarted and nothing in the scene changed: run the step again") from None

    def _device_option(self) -> dict[str, str]:
        """The panel's device for a remote worker (a local one was started on it)."""
        return {"device": self.device} if self.url and self.device != "auto" else {}

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``function`` on the Logic's background thread (one at a time)."""
        return self._executor.submit(function, *args, **kwargs)

    def _async(self, prepared: Any, request: Callable[[Any], Any], apply: Callable[[Any], Any],
               long_job: bool = True) -> Pending:
        lane = self._jobs if long_job else self._executor
        return Pending(lane.submit(lambda: self._guarded(lambda: request(prepared))), apply)

    def models(self) -> list[dict[str, Any]]:
        return self._guarded(lambda: self._worker().models())

    def download_model(self, model_id: str, progress: Optional[ProgressCallback] = None,
                       cancel: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        def request() -> dict[str, Any]:
            client = self._worker()
            job = client.start_download(model_id)
            return client.wait(job["id"], progress, cancel)["result"]

        return self._guarded(request)

    def _prepare_import_weights(self, model_id: str, path: str, replace: bool = False) -> dict[str, Any]:
        source = Path(path)
        if not source.is_file():
            raise ValueError(f"{source}: no such file")
        return {"model": model_id, "path": source, "replace": bool(replace)}

    def _request_import_weights(self, job: dict[str, Any]) -> dict[str, Any]:
        """The file read and sent (off the GUI thread: checkpoints are large); the worker checks it and installs it
        (nothing is changed when it refuses); its answer, with the worker's model cards listed again."""
        try:
            data = job["path"].read_bytes()
        except OSError as error:
            raise ValueError(f"{job['path']}: cannot read the weights ({error.strerror})") from None
        client = self._worker()
        info = client.import_weights(job["model"], data, job["replace"])
        self._sessions = {key: session for key, session in self._sessions.items() if key[1] != job["model"]}
        return dict(info, models=client.models())

    def import_weights(self, model_id: str, path: str, replace: bool = False) -> dict[str, Any]:
        """Install a checkpoint file downloaded by hand (licence-gated or offline sites) as ``model_id``'s
        weights on the worker (``fmseg models import``: checked against the card and the family's layout; an
        installed file only with ``replace``). The worker's answer (model, path, verified) and ``models``, its
        cards after the import; a wrong file is a one-line :class:`WorkerError` and changes nothing."""
        job = self._prepare_import_weights(model_id, path, replace)
        return self._guarded(lambda: self._request_import_weights(job))

    def import_weights_async(self, *args: Any, **kwargs: Any) -> Pending:
        # the prompt lane, as downloads: an import does not wait for a long adaptation to end
        job = self._prepare_import_weights(*args, **kwargs)
        return self._async(job, self._request_import_weights, lambda info: info, long_job=False)

    def shutdown(self) -> None:
        self.disconnect()
        for lane in (self._executor, self._jobs):
            lane.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ uploads
    def _volume_id(self, node: Any, array: np.ndarray, meta: dict[str, Any]) -> str:
        """The worker's id for a node's array, uploading it only when new or modified."""
        mtime = _image_mtime(node)
        known = self._uploads.get(node.GetID())
        if known is None or known.mtime != mtime:
            # zlib pays off over a network, not on this machine's loopback
            volume_id = self._worker().upload_volume(array, meta, compress=bool(self.url))
            if known is not None:  # the node changed: the worker no longer needs its old copy
                self._discard([known.volume_id])
            self._uploads[node.GetID()] = known = Upload(volume_id, mtime)
        return known.volume_id

    def _discard(self, volume_ids: Sequence[str]) -> None:
        """Free volumes on the worker (best effort: a restarted worker has forgotten them anyway)."""
        for volume_id in volume_ids:
            try:
                self._worker().remove_volume(volume_id)
            except WorkerError:
                pass

    def release_volume(self, volume_node: Any) -> None:
        """Free the worker's copy of a volume node and its prompt sessions (the worker keeps every volume uploaded
        to it): what a batch script calls before removing a case's nodes, so that a cohort does not pile up in the
        worker's memory. Best effort; a later request on the node uploads it again."""
        known = self._uploads.pop(volume_node.GetID(), None) if volume_node is not None else None
        if known is not None:
            self._sessions = {key: session for key, session in self._sessions.items() if key[0] != known.volume_id}
            self._discard([known.volume_id])

    def _volume_data(self, volume_node: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """A volume's voxels and grid, read on the calling (GUI) thread for the request to send. A volume the
        worker holds already is not copied again on every prompt: its array is then Slicer's own view, read only
        if the worker has lost its copy meanwhile (restarted or evicted)."""
        if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError("choose a scalar volume to segment")
        array = slicer.util.arrayFromVolume(volume_node)
        if array.ndim != 3:
            raise ValueError(f"{volume_node.GetName()}: FMSeg segments single-component 3D volumes")
        known = self._uploads.get(volume_node.GetID())
        sent = known is not None and known.mtime == _image_mtime(volume_node)
        return (array if sent else np.array(array)), volume_meta(volume_node)

    # ------------------------------------------------------------------ results
    def _remember(self, segmentation_node: Any) -> None:
        stack = self._undo.setdefault(segmentation_node.GetID(), [])
        stack.append(scene_segments.snapshot(segmentation_node))
        del stack[:-UNDO_DEPTH]

    def undo(self, segmentation_node: Any) -> bool:
        """Restore the segmentation as it was before FMSeg's last result; False when there is nothing to undo."""
        stack = self._undo.get(segmentation_node.GetID()) if segmentation_node is not None else None
        if not stack:
            return False
        scene_segments.restore(segmentation_node, stack.pop())
        return True

    def _write_labels(self, volume_node: Any, segmentation_node: Any, labels: np.ndarray,
                      segments: Sequence[dict[str, Any]]) -> list[str]:
        """Write each segment of a label map (one undo step for all of them); the segment ids."""
        if segmentation_node is None:
            raise ValueError("choose the segmentation that receives the result")
        if labels.shape != slicer.util.arrayFromVolume(volume_node).shape:
            raise ValueError("the worker's result does not match the volume's grid")
        self._remember(segmentation_node)
        return scene_segments.write_labels(segmentation_node, volume_node, labels, segments)

    # ------------------------------------------------------------------ prompting
    def _prepare_prompt(self, volume_node: Any, segmentation_node: Any, segment_name: str, include_points: Any,
                        exclude_points: Any, rois: Sequence[Any], model: str, use_adapter: bool,
                        include_curves: Sequence[Any] = (), exclude_curves: Sequence[Any] = ()) -> dict[str, Any]:
        if segmentation_node is None:
            raise ValueError("choose the segmentation that receives the result")
        if not segment_name.strip():
            raise ValueError("give the segment a name")
        array, meta = self._volume_data(volume_node)
        boxes, points, curves = collect_prompts(volume_node, include_points, exclude_points, rois, include_curves,
                                                exclude_curves)
        if not boxes and not any(include for _, include in points) and not any(c[1] for c in curves):
            raise ValueError(f"segment '{segment_name}': place a box, a ROI or an include point (or an include "
                             "scribble or lasso) first")
        adapter = use_adapter and bool(self.adapter.data)
        if adapter and self.adapter.info.get("mode") != "prompt":
            raise ValueError("the loaded adapter segments automatically: use 'Segment with adapter'")
        return {"volume_node": volume_node, "segmentation_node": segmentation_node, "name": segment_name.strip(),
                "array": array, "meta": meta, "boxes": boxes, "points": points, "curves": curves,
                "model": self.adapter.info.get("base_model", model) if adapter else model, "adapter": adapter}

    def _request_prompt(self, job: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        client = self._worker()
        volume_id = self._volume_id(job["volume_node"], job["array"], job["meta"])
        adapter_id = self._adapter_id() if job["adapter"] else None
        key = (volume_id, job["model"], adapter_id)
        if key not in self._sessions:
            options = {"model": job["model"], "adapter": adapter_id, **self._device_option()}
            self._sessions[key] = client.open_session(volume_id, **options)
        return client.prompt(self._sessions[key], job["name"], job["boxes"], job["points"], job["curves"])

    def _apply_prompt(self, job: dict[str, Any], answer: tuple[np.ndarray, dict[str, Any]]) -> str:
        mask, _ = answer
        segmentation_node, volume_node, name = job["segmentation_node"], job["volume_node"], job["name"]
        if mask.shape != job["array"].shape:
            raise ValueError("the worker's result does not match the volume's grid")
        self._remember(segmentation_node)
        scene_segments.prepare(segmentation_node, volume_node)
        segmentation = segmentation_node.GetSegmentation()
        color = None
        if not segmentation.GetSegmentIdBySegmentName(name):  # FMSeg's colour rule, as in its files
            taken = [segmentation.GetNthSegment(n).GetColor() for n in range(segmentation.GetNumberOfSegments())]
            color = segment_color(name, segmentation.GetNumberOfSegments() + 1, taken)
        return scene_segments.write_segment(segmentation_node, volume_node, name, mask, color)

    def prompt(self, volume_node: Any, segmentation_node: Any, segment_name: str, include_points: Any = None,
               exclude_points: Any = None, rois: Sequence[Any] = (), model: str = DEFAULT_PROMPT_MODEL,
               use_adapter: bool = False, include_curves: Sequence[Any] = (),
               exclude_curves: Sequence[Any] = ()) -> str:
        """Segment one structure from its prompts into the segment ``segment_name``; the segment id. Curves:
        curve nodes (scribbles) and closed curve nodes (lassos); in ``include_curves``, one whose control point
        is described "exclude" excludes (``fmseg prompt``'s rule for files)."""
        job = self._prepare_prompt(volume_node, segmentation_node, segment_name, include_points, exclude_points,
                                   rois, model, use_adapter, include_curves, exclude_curves)
        return self._apply_prompt(job, self._guarded(lambda: self._request_prompt(job)))

    def prompt_async(self, *args: Any, **kwargs: Any) -> Pending:
        job = self._prepare_prompt(*_prompt_arguments(*args, **kwargs))
        return self._async(job, self._request_prompt, lambda answer: self._apply_prompt(job, answer), long_job=False)

    # ------------------------------------------------------------------ labelled pairs (supports, cases)
    def _prepare_pairs(self, pairs: Sequence[Pair], what: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Arrays of (volume, segmentation, segments) pairs; one label value per segment name across pairs."""
        if not pairs:
            raise ValueError(f"add at least one {what} (a volume and its segmentation)")
        values: dict[str, int] = {}
        prepared = []
        for volume_node, segmentation_node, segment_ids in pairs:
            array, meta = self._volume_data(volume_node)
            names = scene_segments.segment_names(segmentation_node, segment_ids)
            if not names:
                raise ValueError(f"{segmentation_node.GetName()}: this {what} has no segment")
            for name in names:
                values.setdefault(name, len(values) + 1)
            chosen = {name: values[name] for name in names}
            labels = scene_segments.label_map(segmentation_node, volume_node, chosen)
            if not labels.any():
                raise ValueError(f"{segmentation_node.GetName()}: the chosen segments are empty on "
                                 f"{volume_node.GetName()}'s grid")
            segments = [{"value": value, "name": name, "color": scene_segments.segment_color(segmentation_node, name)}
                        for name, value in chosen.items()]
            prepared.append({"volume_node": volume_node, "segmentation_node": segmentation_node, "array": array,
                             "meta": meta, "labels": labels, "segments": segments})
        return prepared, values

    def _upload_pairs(self, pairs: list[dict[str, Any]]) -> list[dict[str, str]]:
        uploaded = []
        for pair in pairs:
            image_id = self._volume_id(pair["volume_node"], pair["array"], pair["meta"])
            labels_id = self._worker().upload_volume(pair["labels"], {**pair["meta"], "segments": pair["segments"]},
                                                     compress=True)
            uploaded.append({"image": image_id, "labels": labels_id})
        return uploaded

    # ------------------------------------------------------------------ in-context
    def _prepare_incontext(self, volume_node: Any, segmentation_node: Any, supports: Sequence[Pair],
                           support_size: int = InContext.support_size, ensemble: int = InContext.ensemble,
                           uncertainty: bool = InContext.uncertainty, model: str = DEFAULT_INCONTEXT_MODEL,
                           progress: Optional[ProgressCallback] = None, cancel: Optional[Callable[[], bool]] = None,
                           match: str = InContext.match, candidates: int = InContext.candidates) -> dict[str, Any]:
        """``match``: ``anatomy`` aligns each support to the query first, ``index`` matches slices by relative
        position (supports on the query's own grid), ``auto`` picks (the worker decides). ``candidates``: K > 1
        segmentations drawn by a stochastic model (tyche), each into a segmentation node of its own."""
        if segmentation_node is None:
            raise ValueError("choose the segmentation that receives the result")
        array, meta = self._volume_data(volume_node)
        pairs, _ = self._prepare_pairs(supports, "support example")
        return {"volume_node": volume_node, "segmentation_node": segmentation_node, "array": array, "meta": meta,
                "pairs": pairs, "body": {"support_size": int(support_size), "ensemble": int(ensemble),
                                         "uncertainty": bool(uncertainty), "model": model, "match": match,
                                         **({"candidates": int(candidates)} if candidates else {})},
                "progress": progress, "cancel": cancel}

    def _request_incontext(self, job: dict[str, Any]) -> dict[str, Any]:
        """Supports uploaded (with their label maps, dropped once the job has read them), or the loaded task's
        id (uploaded again if the worker lost it); then the job, its labels, uncertainty and candidates."""
        client = self._worker()
        supports = self._upload_pairs(job["pairs"])
        given = {"supports": supports} if job["pairs"] else {"task": self._task_id()}
        body = dict(job["body"], volume=self._volume_id(job["volume_node"], job["array"], job["meta"]), **given)
        try:
            started = client.start_job("incontext", dict(body, **self._device_option()))
        finally:  # the job has read the label maps (or was refused): the worker may drop them
            self._discard([support["labels"] for support in supports])
        status = client.wait(started["id"], job["progress"], job["cancel"])
        labels, _ = client.job_array(started["id"], "labels")
        uncertainty = client.job_array(started["id"], "uncertainty")[0] if "uncertainty" in status["arrays"] else None
        candidates = [client.job_array(started["id"], name)[0] for name in status["result"].get("candidates", ())]
        return {"labels": labels, "uncertainty": uncertainty, "segments": status["result"]["segments"],
                "candidates": candidates}

    def _apply_incontext(self, job: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        volume_node, segmentation_node = job["volume_node"], job["segmentation_node"]
        ids = self._write_labels(volume_node, segmentation_node, answer["labels"], answer["segments"])
        node = None
        if answer["uncertainty"] is not None:
            node = add_volume_like(volume_node, answer["uncertainty"].astype(np.float32),
                                   f"{volume_node.GetName()} uncertainty", self.scene)
        candidates = scene_segments.write_candidates(self.scene, segmentation_node, volume_node,
                                                     answer.get("candidates", ()), answer["segments"])
        return {"segments": ids, "uncertainty_node": node, "candidate_nodes": candidates}

    def run_incontext(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Segment ``volume_node`` like the support examples (volume, segmentation, segment ids) show;
        ``{"segments": ids, "uncertainty_node": node or None, "candidate_nodes": [node, ...]}`` (candidates: one
        segmentation node each, "<segmentation> candidate 1"...)."""
        job = self._prepare_incontext(*args, **kwargs)
        return self._apply_incontext(job, self._guarded(lambda: self._request_incontext(job)))

    def run_incontext_async(self, *args: Any, **kwargs: Any) -> Pending:
        job = self._prepare_incontext(*args, **kwargs)
        return self._async(job, self._request_incontext, lambda answer: self._apply_incontext(job, answer))

    # ------------------------------------------------------------------ tasks (3-D in-context models)
    def _prepare_save_task(self, supports: Sequence[Pair], path: str, model: str = DEFAULT_TASK_MODEL,
                           overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                           cancel: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        target = Path(path)
        if not target.name.endswith(TASK_SUFFIX):
            raise ValueError(f"{target}: task files end in {TASK_SUFFIX}")
        if target.exists() and not overwrite:
            raise ValueError(f"{target}: the file exists already")
        pairs, _ = self._prepare_pairs(supports, "support example")
        return {"pairs": pairs, "path": target, "overwrite": overwrite, "body": {"model": model},
                "progress": progress, "cancel": cancel}

    def _request_save_task(self, job: dict[str, Any]) -> dict[str, Any]:
        """The worker encodes the supports into a task; its file is downloaded and written (atomically)."""
        from FMSegCore.io.atomic import atomic_output

        client = self._worker()
        supports = self._upload_pairs(job["pairs"])
        try:
            started = client.start_job("task", dict(job["body"], supports=supports, **self._device_option()))
        finally:  # the job has read the label maps (or was refused): the worker may drop them
            self._discard([support["labels"] for support in supports])
        info = client.wait(started["id"], job["progress"], job["cancel"])["result"]
        data = client.download_task(info["task"])
        with atomic_output(job["path"], overwrite=job["overwrite"]) as temporary:
            temporary.write_bytes(data)
        return dict(info, path=str(job["path"]))

    def save_task(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Encode the supports (volume, segmentation, segment ids) into a task of the 3-D in-context ``model``
        on the worker and write its file to ``path`` (``.fmseg-task``; an existing file only with ``overwrite``);
        the task's summary. The file applies with :meth:`load_task` and ``fmseg incontext --task``."""
        job = self._prepare_save_task(*args, **kwargs)
        return self._guarded(lambda: self._request_save_task(job))

    def save_task_async(self, *args: Any, **kwargs: Any) -> Pending:
        job = self._prepare_save_task(*args, **kwargs)
        return self._async(job, self._request_save_task, lambda info: info)

    def load_task(self, path: str) -> dict[str, Any]:
        """Read a task file, have the worker check it, and keep it: :meth:`run_task` applies it. Its summary
        (model, classes...), with ``path``."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{path}: cannot read the task ({error.strerror})") from None
        info = dict(self._guarded(lambda: self._worker().upload_task(data)), path=str(path))
        self.task = TaskState(info, info["task"], data, str(path))
        return info

    def clear_task(self) -> None:
        """Forget the loaded task (in-context runs use supports again)."""
        self.task = TaskState()

    def _task_id(self) -> str:
        if not self.task.data:
            raise ValueError("no task: load a task file first")
        if not self.task.task_id:
            self.task.task_id = self._worker().upload_task(self.task.data)["task"]
        return self.task.task_id

    def _prepare_run_task(self, volume_node: Any, segmentation_node: Any, uncertainty: bool = InContext.uncertainty,
                          progress: Optional[ProgressCallback] = None,
                          cancel: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        if not self.task.data:
            raise ValueError("no task: load a task file first")
        if segmentation_node is None:
            raise ValueError("choose the segmentation that receives the result")
        array, meta = self._volume_data(volume_node)
        return {"volume_node": volume_node, "segmentation_node": segmentation_node, "array": array, "meta": meta,
                "pairs": [], "body": {"uncertainty": bool(uncertainty)}, "progress": progress, "cancel": cancel}

    def run_task(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Segment ``volume_node`` with the loaded task (its model, its classes' names and colours);
        ``{"segments": ids, "uncertainty_node": node or None}`` (uncertainty: the normalised entropy)."""
        job = self._prepare_run_task(*args, **kwargs)
        return self._apply_incontext(job, self._guarded(lambda: self._request_incontext(job)))

    def run_task_async(self, *args: Any, **kwargs: Any) -> Pending:
        job = self._prepare_run_task(*args, **kwargs)
        return self._async(job, self._request_incontext, lambda answer: self._apply_incontext(job, answer))

    # ------------------------------------------------------------------ adaptation
    def _prepare_adapt(self, cases: Sequence[Pair], mode: str = Adaptation.mode, method: Optional[str] = None,
                       rank: int = Adaptation.rank, steps: int = 0, model: str = Adaptation.model,
                       progress: Optional[ProgressCallback] = None, cancel: Optional[Callable[[], bool]] = None,
                       **training: Any) -> dict[str, Any]:
        pairs, _ = self._prepare_pairs(cases, "labelled case")
        body = {"mode": mode, "method": default_method(mode, method), "rank": int(rank), "model": model,
                **({"steps": int(steps)} if steps else {}), **training}  # steps 0: the method's default
        return {"pairs": pairs, "body": body, "progress": progress, "cancel": cancel}

    def _request_adapt(self, job: dict[str, Any]) -> AdapterState:
        client = self._worker()
        cases = self._upload_pairs(job["pairs"])
        try:
            started = client.start_job("adapt", dict(job["body"], cases=cases, **self._device_option()))
        finally:  # the job has read the label maps (or was refused): the worker may drop them
            self._discard([case["labels"] for case in cases])
        result = client.wait(started["id"], job["progress"], job["cancel"])["result"]
        return AdapterState(result, result["adapter"], client.download_adapter(result["adapter"]))

    def _apply_adapt(self, state: AdapterState) -> dict[str, Any]:
        self.adapter = state
        return state.info

    def adapt(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Adapt the model to labelled cases (volume, segmentation, segment ids); the adapter's summary. The
        adapter stays loaded for prompting or automatic segmentation, and :meth:`save_adapter` writes it."""
        job = self._prepare_adapt(*args, **kwargs)
        return self._apply_adapt(self._guarded(lambda: self._request_adapt(job)))

    def adapt_async(self, *args: Any, **kwargs: Any) -> Pending:
        job = self._prepare_adapt(*args, **kwargs)
        return self._async(job, self._request_adapt, self._apply_adapt)

    def _adapter_id(self) -> str:
        if not self.adapter.data:
            raise ValueError("no adapter: adapt a model or load an adapter file first")
        if not self.adapter.adapter_id:
            self.adapter.adapter_id = self._worker().upload_adapter(self.adapter.data)["adapter"]
        return self.adapter.adapter_id

    def save_adapter(self, path: str, overwrite: bool = False) -> Path:
        """Write the current adapter file (atomically; an existing file only with ``overwrite``)."""
        from FMSegCore.io.atomic import atomic_output

        if not self.adapter.data:
            raise ValueError("no adapter to save: adapt a model first")
        target = Path(path)
        if not target.name.endswith(".pt"):
            raise ValueError(f"{target}: adapter files end in .pt")
        with atomic_output(target, overwrite=overwrite) as temporary:
            temporary.write_bytes(self.adapter.data)
        return target

    def load_adapter(self, path: str) -> dict[str, Any]:
        """Read an adapter file, have the worker check it, and keep it for prompting or segmentation."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{path}: cannot read the adapter ({error.strerror})") from None
        info = self._guarded(lambda: self._worker().upload_adapter(data))
        self.adapter = AdapterState(info, info["adapter"], data)
        return info

    def _prepare_auto(self, volume_node: Any, segmentation_node: Any, progress: Optional[ProgressCallback] = None,
                      cancel: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        if self.adapter.info.get("mode") != "auto":
            raise ValueError("load or train an automatic ('auto' mode) adapter first")
        if segmentation_node is None:
            raise ValueError("choose the segmentation that receives the result")
        array, meta = self._volume_data(volume_node)
        return {"volume_node": volume_node, "segmentation_node": segmentation_node, "array": array, "meta": meta,
                "progress": progress, "cancel": cancel}

    def _request_auto(self, job: dict[str, Any]) -> dict[str, Any]:
        client = self._worker()
        body = {"volume": self._volume_id(job["volume_node"], job["array"], job["meta"]), "adapter": self._adapter_id()}
        started = client.start_job("segment", dict(body, **self._device_option()))
        status = client.wait(started["id"], job["progress"], job["cancel"])
        return {"labels": client.job_array(started["id"], "labels")[0], "segments": status["result"]["segments"]}

    def _apply_auto(self, job: dict[str, Any], answer: dict[str, Any]) -> list[str]:
        return self._write_labels(job["volume_node"], job["segmentation_node"], answer["labels"], answer["segments"])

    def segment_with_adapter(self, *args: Any, **kwargs: Any) -> list[str]:
        """Segment a volume automatically with the loaded adapter; the segment ids."""
        job = self._prepare_auto(*args, **kwargs)
        return self._apply_auto(job, self._guarded(lambda: self._request_auto(job)))

    def segment_with_adapter_async(self, *args: Any, **kwargs: Any) -> Pending:
        job = self._prepare_auto(*args, **kwargs)
        return self._async(job, self._request_auto, lambda answer: self._apply_auto(job, answer))


# ---------------------------------------------------------------------------------------------- helpers


def _prompt_arguments(volume_node: Any, segmentation_node: Any, segment_name: str, include_points: Any = None,
                      exclude_points: Any = None, rois: Sequence[Any] = (), model: str = DEFAULT_PROMPT_MODEL,
                      use_adapter: bool = False, include_curves: Sequence[Any] = (),
                      exclude_curves: Sequence[Any] = ()) -> tuple:
    return (volume_node, segmentation_node, segment_name, include_points, exclude_points, rois, model, use_adapter,
            include_curves, exclude_curves)


def _image_mtime(volume_node: Any) -> int:
    """When a volume's voxels last changed (VTK's modification time of its image data)."""
    return int(volume_node.GetImageData().GetMTime())
