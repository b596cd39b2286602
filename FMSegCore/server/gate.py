"""What every request to the worker passes before and after its route (an ASGI middleware): the bearer token
(compared in constant time), the body size limits (checked on Content-Length, before a byte of the body is
read), the request log (``--verbose``) and the net for internal errors (always logged with their traceback).
"""

from __future__ import annotations

import hmac
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from starlette.responses import JSONResponse

MAX_JSON_BYTES = 1 << 20
TOKEN_HEADER = b"authorization"
#: (method, path) of the routes whose bodies are binary uploads, limited by ``max_upload_bytes``.
UPLOADS = {("POST", "/v1/volumes"), ("POST", "/v1/adapters"), ("POST", "/v1/tasks")}
#: Upload routes with a part of the path that varies (a model's weights).
UPLOAD_PATTERNS = (("POST", re.compile(r"/v1/models/[^/]+/weights")),)


def is_upload(method: str, path: str) -> bool:
    """Whether a request may carry an upload's body (``max_upload_bytes``) rather than JSON."""
    return (method, path) in UPLOADS or any(method == m and pattern.fullmatch(path) for m, pattern in UPLOAD_PATTERNS)


@dataclass
class GateSettings:
    """The token (empty: none required), the upload limit and whether to log every request; read per request,
    so they may change while the worker serves."""

    token: str = ""
    max_upload_bytes: int = 2 << 30
    verbose: bool = False


def error_response(status: int, message: str, close: bool = False, headers: Any = None) -> JSONResponse:
    """The one-line error answer ``{"error": "..."}``; ``close`` ends the connection (an unread body must not be
    read as the next request)."""
    extra = dict(headers or {}, **({"Connection": "close"} if close else {}))
    return JSONResponse({"error": " ".join(str(message).split())}, status, headers=extra)


def internal_error(error: BaseException) -> JSONResponse:
    """The one-line answer to a bug (500); the connection is closed."""
    return error_response(500, f"internal error: {type(error).__name__}: {error}", close=True)


def log(line: str) -> None:
    print(f"fmseg worker: {line}", file=sys.stderr, flush=True)


class Gate:
    """The middleware: refuses what may not pass, logs what did, and turns an escaped exception into a 500."""

    def __init__(self, app: Callable, settings: GateSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 0
        verbose, logged = self.settings.verbose, False  # a request is logged when verbose was on as it came in

        def log_request() -> None:
            nonlocal logged
            if verbose and not logged:
                logged = True
                log(f"{scope['method']} {scope['path']} {status} {1000 * (time.perf_counter() - began):.1f} ms")

        async def send_noted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                log_request()  # before the answer's end leaves: a client that got it finds the line logged
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_noted)
            else:
                await self.app(_json_by_default(scope), receive, send_noted)
        except Exception as error:  # a bug must not take the worker down: report it, keep serving
            log(f"internal error on {scope['method']} {scope['path']}:\n{traceback.format_exc().rstrip()}")
            if not status:
                await internal_error(error)(scope, receive, send_noted)
        finally:
            log_request()  # no answer sent (the client left): logged all the same

    def refusal(self, scope: dict) -> Any:
        """The answer refusing this request (401, 411, 413), or None to let it through."""
        headers = dict(scope["headers"])
        token = self.settings.token
        if token and not hmac.compare_digest(headers.get(TOKEN_HEADER, b""), f"Bearer {token}".encode()):
            return error_response(401, "missing or wrong token (send 'Authorization: Bearer <token>')",
                                  close=scope["method"] == "POST")
        if scope["method"] != "POST":
            return None
        if b"transfer-encoding" in headers:
            return error_response(411, "send a Content-Length (chunked bodies are not accepted)", close=True)
        try:  # no Content-Length (and no Transfer-Encoding): no body, as HTTP/1.1 has it
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return error_response(411, "missing or bad Content-Length", close=True)
        limit = self.settings.max_upload_bytes if is_upload(scope["method"], scope["path"]) else MAX_JSON_BYTES
        if length < 0 or length > limit:
            return error_response(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                                  close=True)
        return None


def _json_by_default(scope: dict) -> dict:
    """A JSON route's body without a Content-Type is read as JSON (as FastAPI did before it required the type)."""
    if scope["method"] != "POST" or (scope["method"], scope["path"]) in UPLOADS or \
            any(name == b"content-type" for name, _ in scope["headers"]):
        return scope
    return dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
