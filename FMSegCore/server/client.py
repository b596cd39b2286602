"""A client of the FMSeg worker over HTTP (``requests``; no torch): what Slicer's module and scripts use.

Arrays are numpy KJI arrays; geometry is ITK's (spacing and origin in IJK/LPS order, a 3x3 direction whose
columns are the I, J, K axes in LPS). Errors the worker reports become :class:`WorkerError` with its one line;
a worker that cannot be reached becomes :class:`WorkerUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import requests

from FMSegCore.progress import Progress, ProgressCallback
from FMSegCore.server.wire import CONTENT_TYPE, decode_array, decode_mask, encode_array

JSON_TIMEOUT = (5.0, 600.0)


class WorkerError(Exception):
    """The worker refused a request or a job failed; ``status`` is the HTTP status (0 for a failed job)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class WorkerUnavailable(WorkerError):
    """The worker cannot be reached (not started, stopped, or crashed)."""


class JobCancelledError(WorkerError):
    """The job was cancelled before it finished."""


def geometry(spacing: Sequence[float], origin: Sequence[float], direction: Any, name: str = "") -> dict[str, Any]:
    """The geometry meta of an uploaded volume."""
    return {"spacing": [float(v) for v in spacing], "origin": [float(v) for v in origin],
            "direction": [float(v) for v in np.asarray(direction, dtype=float).reshape(9)], "name": name}


def _box_json(lo: Sequence[float], hi: Sequence[float], corners: Optional[Sequence[Sequence[float]]] = None) -> dict:
    box: dict[str, Any] = {"lo": [float(v) for v in lo], "hi": [float(v) for v in hi]}
    if corners is not None:
        box["corners"] = [[float(v) for v in corner] for corner in corners]
    return box


class WorkerClient:
    """Calls a running worker; one keep-alive connection per client."""

    def __init__(self, url: str, token: str = "", timeout: Any = JSON_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ plumbing
    def _call(self, method: str, route: str, json: Any = None, data: Optional[bytes] = None,
              binary: bool = False, content_type: str = CONTENT_TYPE) -> Any:
        headers = {"Content-Type": content_type} if data is not None else None
        try:
            response = self.http.request(method, f"{self.url}/v1/{route}", json=json, data=data, headers=headers,
                                         timeout=self.timeout)
        except requests.ConnectionError as error:
            raise WorkerUnavailable(f"the FMSeg worker at {self.url} cannot be reached ({type(error).__name__})") \
                from None
        except requests.Timeout:
            raise WorkerUnavailable(f"the FMSeg worker at {self.url} did not answer in time") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200] or response.reason
            raise WorkerError(f"worker: {message}", response.status_code)
        return response.content if binary else response.json()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ calls
    def info(self) -> dict[str, Any]:
        return self._call("GET", "info")

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "models")["models"]

    def upload_volume(self, array: np.ndarray, meta: dict[str, Any], compress: bool = False) -> str:
        """Send a KJI array with its geometry; its id on the worker. A label map says so in its meta
        (``"kind": "labels"``, or its ``segments``); any other array is an image, whatever its dtype."""
        return self._call("POST", "volumes", data=encode_array(array, meta, compress=compress))["volume"]

    def remove_volume(self, volume_id: str) -> None:
        self._call("DELETE", f"volumes/{volume_id}")

    def upload_adapter(self, data: bytes) -> dict[str, Any]:
        return self._call("POST", "adapters", data=data, content_type="application/octet-stream")

    def download_adapter(self, adapter_id: str) -> bytes:
        return self._call("GET", f"adapters/{adapter_id}", binary=True)

    def upload_task(self, data: bytes) -> dict[str, Any]:
        """Send a task file's bytes (``fmseg task create``); the worker's TaskInfo (``task``: its id there)."""
        return self._call("POST", "tasks", data=data, content_type="application/octet-stream")

    def download_task(self, task_id: str) -> bytes:
        """The bytes of a task file the worker holds (uploaded, or made by a ``task`` job)."""
        return self._call("GET", f"tasks/{task_id}", binary=True)

    def create_task(self, supports: Sequence[dict[str, str]], progress: Optional[ProgressCallback] = None,
                    cancel: Optional[Callable[[], bool]] = None, **options: Any) -> dict[str, Any]:
        """Encode uploaded labelled references (``{"image": id, "labels": id}`` pairs) into a task of a 3-D
        in-context model (options: model, classes, modality, window, device) and wait for it; its TaskInfo
        (``task``: its id, the file at :meth:`download_task`)."""
        job = self.start_job("task", {"supports": list(supports), **options})
        return self.wait(job["id"], progress, cancel)["result"]

    def open_session(self, volume_id: str, **options: Any) -> str:
        """A prompt session on an uploaded volume (options: model, adapter, axis, context, modality, window,
        precision, device)."""
        return self._call("POST", "sessions", json={"volume": volume_id, **options})["session"]

    def prompt(self, session_id: str, name: str, boxes: Sequence[Sequence[Any]] = (),
               points: Sequence[tuple[Sequence[float], bool]] = (),
               curves: Sequence[tuple[Sequence[Sequence[float]], bool, bool]] = ()) -> tuple[np.ndarray, dict[str, Any]]:
        """Segment one structure: boxes as (lo, hi) IJK corners, or (lo, hi, corners) for an oriented ROI with
        its 8 IJK corners; points as (ijk, include); curves as (IJK control points, include, closed): scribbles
        and lassos. Returns (KJI mask, timings)."""
        body = {"name": name, "boxes": [_box_json(*box) for box in boxes],
                "points": [{"ijk": list(map(float, ijk)), "include": bool(include)} for ijk, include in points]}
        if curves:
            body["curves"] = [{"points": [list(map(float, p)) for p in ijk], "include": bool(include),
                               "closed": bool(closed)} for ijk, include, closed in curves]
        data = self._call("POST", f"sessions/{session_id}/prompt", json=body, binary=True)
        mask, info = decode_mask(data)
        info["bytes"] = len(data)
        return mask, info

    def close_session(self, session_id: str) -> None:
        self._call("DELETE", f"sessions/{session_id}")

    def start_job(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Start an ``incontext``, ``task``, ``adapt`` or ``segment`` job; its status (with ``id``). An
        ``incontext`` body holds ``supports`` or the ``task`` id of an uploaded or created task."""
        return self._call("POST", f"jobs/{kind}", json=body)

    def import_weights(self, model: str, data: bytes, replace: bool = False) -> dict[str, Any]:
        """Install checkpoint bytes as ``model``'s weights on the worker (checked there); where they went."""
        return self._call("POST", f"models/{model}/weights{'?replace=true' if replace else ''}", data=data,
                          content_type="application/octet-stream")

    def start_download(self, model: str) -> dict[str, Any]:
        return self._call("POST", "models/download", json={"model": model})

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"jobs/{job_id}/cancel")

    def job_array(self, job_id: str, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        return decode_array(self._call("GET", f"jobs/{job_id}/arrays/{name}", binary=True))

    def wait(self, job_id: str, progress: Optional[ProgressCallback] = None,
             cancel: Optional[Callable[[], bool]] = None, interval: float = 0.2) -> dict[str, Any]:
        """Poll a job until it ends; ``progress`` hears the job's :class:`Progress` on each poll; ``cancel()``
        true cancels it.
        Returns the final status of a finished job; a failed job raises :class:`WorkerError`, a cancelled one
        :class:`JobCancelledError`."""
        cancelling = False
        while True:
            status = self.job(job_id)
            if progress:
                progress(Progress.from_json(status))
            if status["state"] == "done":
                return status
            if status["state"] == "failed":
                raise WorkerError(f"worker: {status['error']}")
            if status["state"] == "cancelled":
                raise JobCancelledError("cancelled")
            if cancel and not cancelling and cancel():
                self.cancel(job_id)
                cancelling = True
            time.sleep(interval)

    def shutdown(self) -> None:
        try:
            self._call("POST", "shutdown")
        except WorkerUnavailable:
            pass
