"""The worker's routes (FastAPI) onto its :class:`~FMSegCore.server.service.Service`, and how refusals are answered:
one line, ``{"error": "..."}``, with the status the service or the request's validation chose."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from FMSegCore import __version__
from FMSegCore.errors import FMSegError
from FMSegCore.server.fields import RequestError, one_line
from FMSegCore.server.gate import Gate, GateSettings, error_response, internal_error
from FMSegCore.server.schemas import (
    AdapterInfo,
    AdaptRequest,
    Closed,
    DownloadRequest,
    ErrorAnswer,
    IncontextRequest,
    Info,
    JobStatus,
    ModelList,
    PromptRequest,
    Removed,
    SegmentRequest,
    SessionOpened,
    SessionRequest,
    Stopping,
    TaskInfo,
    TaskRequest,
    VolumeAdded,
    WeightsImported,
)
from FMSegCore.server.service import Service
from FMSegCore.server.wire import CONTENT_TYPE, WireError, decode_array, encode_mask

OCTET_STREAM = "application/octet-stream"
BINARY = {"content": {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}}
OCTETS = {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}
#: The bodies of the binary uploads: an array frame (volumes), an adapter's or a task's file bytes.
UPLOAD = {"requestBody": {"required": True, **BINARY}}
ADAPTER_UPLOAD = {"requestBody": {"required": True, **OCTETS}}
TASK_UPLOAD = ADAPTER_UPLOAD
REFUSALS = {status: {"model": ErrorAnswer, "description": text} for status, text in [
    (400, "bad input (the field and the reason, in one line)"), (401, "missing or wrong token"),
    (404, "no such route, volume, session, adapter, task or job"), (413, "request body over the size limit"),
    (500, "internal error (logged by the worker with its traceback)")]}


class WorkerRoute(APIRoute):
    """A route whose request validation errors become one-line 400 answers naming the field."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        body = getattr(getattr(self.body_field, "field_info", None), "annotation", None)
        where = getattr(body, "where", "request")

        async def validated(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                raise RequestError(400, one_line(error.errors(), where)) from None
            except HTTPException as error:
                cause = error.__cause__
                if error.status_code != 400 or cause is None:
                    raise
                # FastAPI's "There was an error parsing the body": say why (JSON nested too deep, ...)
                raise RequestError(400, f"{where}: request body cannot be read as JSON "
                                        f"({type(cause).__name__}: {cause})") from None

        return validated


async def read_upload(request: Request, limit: int) -> bytearray:
    """The body of a binary upload, read as it streams in (into one buffer of its announced length); a body
    longer than ``limit`` is refused as soon as it passes it."""
    data, size = bytearray(min(int(request.headers.get("content-length", 0)), limit)), 0
    try:
        async for chunk in request.stream():
            if size + len(chunk) > len(data):
                raise RequestError(413 if size + len(chunk) > limit else 400,
                                   f"request body is longer than {len(data)} bytes (its Content-Length, limit {limit})")
            data[size:size + len(chunk)] = chunk
            size += len(chunk)
    except ClientDisconnect:
        raise RequestError(400, "request body ended early (the client went away)") from None
    if size != len(data):
        raise RequestError(400, "request body ended early")
    return data


def build_app(service: Service, settings: GateSettings, stop: Callable[[], None]) -> Any:
    """The worker's ASGI application: the routes under ``/v1``, ``/docs`` and ``/openapi.json``, behind the
    :class:`~FMSegCore.server.gate.Gate`. ``stop()`` is called once the answer to ``POST /v1/shutdown`` is sent."""
    app = FastAPI(title="FMSeg worker", version=__version__, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json", responses=REFUSALS,
                  description="FMSeg's models over HTTP. Every request carries `Authorization: Bearer <token>` "
                              "when the worker has a token (the docs too). Arrays travel as binary frames "
                              f"(`{CONTENT_TYPE}`, see `FMSegCore/server/wire.py`).")
    app.router.route_class = WorkerRoute
    _answer_errors(app)
    _document_auth(app)

    @app.get("/v1/info", response_model=Info)
    def info() -> Any:
        return service.info()

    @app.get("/v1/models", response_model=ModelList)
    def models() -> Any:
        return {"models": service.models()}

    @app.post("/v1/models/download", status_code=202, response_model=JobStatus)
    def download(body: DownloadRequest) -> Any:
        return service.start_download(body).status()

    @app.post("/v1/models/{model_id}/weights", status_code=201, response_model=WeightsImported,
              openapi_extra=ADAPTER_UPLOAD, summary="Install a checkpoint downloaded by hand (its bytes) as a "
                                                    "zoo model's weights, checked as `fmseg models import` does")
    async def import_weights(model_id: str, request: Request, replace: bool = False) -> Any:
        data = await read_upload(request, settings.max_upload_bytes)
        return await run_in_threadpool(service.import_weights, model_id, bytes(data), replace)

    @app.post("/v1/volumes", status_code=201, response_model=VolumeAdded, openapi_extra=UPLOAD,
              summary="Upload a volume (an array frame: KJI array, geometry, kind or segments in its meta)")
    async def add_volume(request: Request) -> Any:
        limit = settings.max_upload_bytes  # a compressed frame inflates to no more than a raw one may hold
        data = await read_upload(request, limit)
        return await run_in_threadpool(lambda: service.add_volume(*decode_array(data, max_bytes=limit)))

    @app.delete("/v1/volumes/{volume_id}", response_model=Removed)
    def remove_volume(volume_id: str) -> Any:
        service.remove_volume(volume_id)
        return {"removed": volume_id}

    @app.post("/v1/adapters", status_code=201, response_model=AdapterInfo, openapi_extra=ADAPTER_UPLOAD,
              summary="Upload an adapter file (its bytes)")
    async def add_adapter(request: Request) -> Any:
        data = await read_upload(request, settings.max_upload_bytes)
        return await run_in_threadpool(service.add_adapter, data)

    @app.get("/v1/adapters/{adapter_id}", response_class=Response, responses={200: OCTETS},
             summary="Download an adapter file")
    def get_adapter(adapter_id: str) -> Response:
        return Response(service.adapter_bytes(adapter_id), media_type=OCTET_STREAM)

    @app.post("/v1/tasks", status_code=201, response_model=TaskInfo, openapi_extra=TASK_UPLOAD,
              summary="Upload a task file of a 3-D in-context model (its bytes, fmseg task create's .fmseg-task)")
    async def add_task(request: Request) -> Any:
        from FMSegCore.engines.incontext.task_file import MAX_TASK_BYTES

        data = await read_upload(request, min(settings.max_upload_bytes, MAX_TASK_BYTES))
        return await run_in_threadpool(service.add_task, bytes(data))

    @app.get("/v1/tasks/{task_id}", response_class=Response, responses={200: OCTETS},
             summary="Download a task file (uploaded, or made by a task job)")
    def get_task(task_id: str) -> Response:
        return Response(service.task_bytes(task_id), media_type=OCTET_STREAM)

    @app.post("/v1/sessions", status_code=201, response_model=SessionOpened)
    def open_session(body: SessionRequest) -> Any:
        return service.open_session(body)

    @app.post("/v1/sessions/{session_id}/prompt", response_class=Response, responses={200: BINARY},
              summary="Segment one structure: the answer is a mask frame (bit-packed crop, timings in its meta)")
    def prompt(session_id: str, body: PromptRequest) -> Response:
        mask, timings = service.prompt(session_id, body)
        return Response(encode_mask(mask, timings), media_type=CONTENT_TYPE)

    @app.delete("/v1/sessions/{session_id}", response_model=Closed)
    def close_session(session_id: str) -> Any:
        service.close_session(session_id)
        return {"closed": session_id}

    @app.post("/v1/jobs/incontext", status_code=202, response_model=JobStatus)
    def start_incontext(body: IncontextRequest) -> Any:
        return service.start_incontext(body).status()

    @app.post("/v1/jobs/task", status_code=202, response_model=JobStatus,
              summary="Encode uploaded labelled references into a task of a 3-D in-context model (a job; its "
                      "result is the new task's TaskInfo, its file at GET tasks/<id>)")
    def start_task(body: TaskRequest) -> Any:
        return service.start_task(body).status()

    @app.post("/v1/jobs/adapt", status_code=202, response_model=JobStatus)
    def start_adaptation(body: AdaptRequest) -> Any:
        return service.start_adaptation(body).status()

    @app.post("/v1/jobs/segment", status_code=202, response_model=JobStatus)
    def start_segmentation(body: SegmentRequest) -> Any:
        return service.start_auto_segmentation(body).status()

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus)
    def job_status(job_id: str) -> Any:
        return service.job(job_id).status()

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus)
    def cancel_job(job_id: str) -> Any:
        job = service.job(job_id)
        job.cancel()
        return job.status()

    @app.get("/v1/jobs/{job_id}/arrays/{name}", response_class=Response, responses={200: BINARY},
             summary="A job's result array (a frame)")
    def job_array(job_id: str, name: str) -> Response:
        job = service.job(job_id)
        if name not in job.frames:
            raise RequestError(404, f"job {job_id} has no array {name!r} (state: {job.state})")
        return Response(job.frames[name], media_type=CONTENT_TYPE)

    @app.post("/v1/shutdown", response_model=Stopping)
    def shutdown() -> Any:
        return JSONResponse({"stopping": True}, headers={"Connection": "close"}, background=BackgroundTask(stop))

    return Gate(app, settings)


def _answer_errors(app: FastAPI) -> None:
    """Every refusal as one line: the service's (its status), bad frames and user errors (400), the router's,
    and internal errors (500)."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> Response:
        return error_response(error.status, error.message)

    @app.exception_handler(WireError)
    @app.exception_handler(FMSegError)
    async def bad_input(request: Request, error: Exception) -> Response:
        return error_response(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:  # outside a WorkerRoute
        return error_response(400, one_line(error.errors()))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> Response:  # a bug: the gate logs its traceback
        return internal_error(error)

    @app.exception_handler(HTTPException)
    async def routing(request: Request, error: HTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        message = {404: f"no such route: {where}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return error_response(error.status_code, message, headers=error.headers)


def _document_auth(app: FastAPI) -> None:
    """The schema names the bearer token, and validation errors as the 400 they are answered with (not 422)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
