"""``fmseg serve``: the worker's HTTP front. JSON for small requests, binary frames for arrays.

Routes (all under ``/v1``; every one requires the token when the server has one):

- ``GET info``, ``GET models``, ``POST models/download`` (a job)
- ``POST volumes`` (an array frame with geometry) -> ``{"volume": id}``; ``DELETE volumes/<id>``
- ``POST adapters`` (an adapter file's bytes) -> ``{"adapter": id, ...}``; ``GET adapters/<id>`` -> the file
- ``POST sessions`` -> ``{"session": id}``; ``POST sessions/<id>/prompt`` -> a mask frame; ``DELETE sessions/<id>``
- ``POST jobs/incontext|adapt|segment`` -> a job; ``GET jobs/<id>``; ``POST jobs/<id>/cancel``;
  ``GET jobs/<id>/arrays/<name>`` -> an array frame
- ``POST shutdown``
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

from FMSegCore.errors import FMSegError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.server.fields import RequestError
from FMSegCore.server.service import Service
from FMSegCore.server.wire import CONTENT_TYPE, WireError, decode_array, encode_mask

DEFAULT_PORT = 8765
MAX_JSON_BYTES = 1 << 20
TOKEN_HEADER = "Authorization"


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WorkerServer(ThreadingHTTPServer):
    """An HTTP server holding the :class:`Service`, its token and its request size limits."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str = "",
                 max_upload_bytes: int = 2 << 30) -> None:
        if not token and not is_loopback(host):
            raise FMSegError(f"binding {host} exposes the worker beyond this machine: give a token "
                             "(--token or FMSEG_SERVER_TOKEN)")
        self.service = service
        self.token = token
        self.max_upload_bytes = max_upload_bytes
        self.stopping = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


Route = tuple[str, "re.Pattern[str]", str]
ROUTES: list[Route] = [(method, re.compile(f"^/v1/{pattern}$"), name) for method, pattern, name in [
    ("GET", r"info", "info"),
    ("GET", r"models", "models"),
    ("POST", r"models/download", "download"),
    ("POST", r"volumes", "add_volume"),
    ("DELETE", r"volumes/(\w+)", "remove_volume"),
    ("POST", r"adapters", "add_adapter"),
    ("GET", r"adapters/(\w+)", "get_adapter"),
    ("POST", r"sessions", "open_session"),
    ("POST", r"sessions/(\w+)/prompt", "prompt"),
    ("DELETE", r"sessions/(\w+)", "close_session"),
    ("POST", r"jobs/(incontext|adapt|segment)", "start_job"),
    ("GET", r"jobs/(\w+)", "job_status"),
    ("POST", r"jobs/(\w+)/cancel", "cancel_job"),
    ("GET", r"jobs/(\w+)/arrays/(\w+)", "job_array"),
    ("POST", r"shutdown", "shutdown"),
]]
BINARY_BODIES = ("add_volume", "add_adapter")


class Handler(BaseHTTPRequestHandler):
    """Dispatches one request to the service; answers errors as ``{"error": "one line"}``."""

    server: WorkerServer
    protocol_version = "HTTP/1.1"  # keep-alive: a prompt costs one round trip, not a TCP handshake
    disable_nagle_algorithm = True  # small answers leave at once
    server_version = "fmseg-worker"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self, method: str) -> None:
        self._consumed = method != "POST"
        try:
            if not self._authorised():
                raise RequestError(401, "missing or wrong token (send 'Authorization: Bearer <token>')")
            path = self.path.split("?", 1)[0]
            for route_method, pattern, name in ROUTES:
                match = pattern.match(path)
                if match and route_method == method:
                    body = self._body(binary=name in BINARY_BODIES) if method == "POST" else None
                    getattr(self, f"_{name}")(body, *match.groups())
                    return
            if any(pattern.match(path) for _, pattern, _ in ROUTES):
                raise RequestError(405, f"{method} is not allowed on {path}")
            raise RequestError(404, f"no such route: {method} {path}")
        except RequestError as error:
            self._refuse(error.message, error.status)
        except (WireError, FMSegError) as error:
            self._refuse(str(error), 400)
        except Exception as error:  # a bug must not take the worker down: report it, keep serving
            self.log_error("internal error: %r", error)
            self._refuse(f"internal error: {type(error).__name__}: {error}", 500)

    def _refuse(self, message: str, status: int) -> None:
        if not self._consumed:
            self.close_connection = True  # an unread body must not be parsed as the next request
        self._send_json({"error": " ".join(message.split())}, status)

    def _authorised(self) -> bool:
        if not self.server.token:
            return True
        given = self.headers.get(TOKEN_HEADER, "")
        expected = f"Bearer {self.server.token}"
        return hmac.compare_digest(given.encode(), expected.encode())

    def _body(self, binary: bool) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "send a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise RequestError(411, "missing or bad Content-Length") from None
        limit = self.server.max_upload_bytes if binary else MAX_JSON_BYTES
        if length < 0 or length > limit:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        data = self.rfile.read(length)
        self._consumed = True
        if len(data) != length:
            self.close_connection = True
            raise RequestError(400, "request body ended early")
        if binary:
            return data
        try:
            return json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(400, f"request body is not valid JSON ({error.__class__.__name__})") from None

    def _send(self, data: bytes, content_type: str, status: int = 200) -> None:
        head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Server: {self.server_version}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(data)}\r\n"
                f"{'Connection: close' if self.close_connection else 'Connection: keep-alive'}\r\n\r\n")
        self.wfile.write(head.encode("latin-1") + data)  # one write: no wait for a delayed ACK
        self.wfile.flush()

    def _send_json(self, content: Any, status: int = 200) -> None:
        self._send(json.dumps(content).encode(), "application/json", status)

    # ------------------------------------------------------------------ routes
    @property
    def service(self) -> Service:
        return self.server.service

    def _info(self, _body: Any) -> None:
        self._send_json(self.service.info())

    def _models(self, _body: Any) -> None:
        self._send_json({"models": self.service.models()})

    def _download(self, body: Any) -> None:
        self._send_json(self.service.start_download(body).status(), 202)

    def _add_volume(self, data: bytes) -> None:
        array, meta = decode_array(data)
        self._send_json(self.service.add_volume(array, meta), 201)

    def _remove_volume(self, _body: Any, volume_id: str) -> None:
        self.service.remove_volume(volume_id)
        self._send_json({"removed": volume_id})

    def _add_adapter(self, data: bytes) -> None:
        self._send_json(self.service.add_adapter(data), 201)

    def _get_adapter(self, _body: Any, adapter_id: str) -> None:
        self._send(self.service.adapter_bytes(adapter_id), "application/octet-stream")

    def _open_session(self, body: Any) -> None:
        self._send_json(self.service.open_session(body), 201)

    def _prompt(self, body: Any, session_id: str) -> None:
        mask, info = self.service.prompt(session_id, body)
        self._send(encode_mask(mask, info), CONTENT_TYPE)

    def _close_session(self, _body: Any, session_id: str) -> None:
        self.service.close_session(session_id)
        self._send_json({"closed": session_id})

    def _start_job(self, body: Any, kind: str) -> None:
        start: dict[str, Callable[[Any], Any]] = {"incontext": self.service.start_incontext,
                                                  "adapt": self.service.start_adaptation,
                                                  "segment": self.service.start_auto_segmentation}
        self._send_json(start[kind](body).status(), 202)

    def _job_status(self, _body: Any, job_id: str) -> None:
        self._send_json(self.service.job(job_id).status())

    def _cancel_job(self, _body: Any, job_id: str) -> None:
        job = self.service.job(job_id)
        job.cancel()
        self._send_json(job.status())

    def _job_array(self, _body: Any, job_id: str, name: str) -> None:
        job = self.service.job(job_id)
        if name not in job.frames:
            raise RequestError(404, f"job {job_id} has no array {name!r} (state: {job.state})")
        self._send(job.frames[name], CONTENT_TYPE)

    def _shutdown(self, _body: Any) -> None:
        self.close_connection = True
        self._send_json({"stopping": True})
        self.server.stopping.set()
        threading.Thread(target=self.server.shutdown, daemon=True).start()


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str = "", device: str = "auto",
          max_upload_bytes: int = 2 << 30, ready_file: Optional[str] = None, verbose: bool = False,
          ready: Optional[Callable[[WorkerServer], None]] = None) -> None:
    """Run the worker until shut down (``POST /v1/shutdown`` or Ctrl-C)."""
    server = WorkerServer(Service(device), host, port, token, max_upload_bytes)
    server.verbose = verbose  # type: ignore[attr-defined]
    print(f"fmseg worker on {server.url} (device {server.service.device}; "
          f"{'token required' if token else 'no token: this machine only'}); Ctrl-C stops it", file=sys.stderr,
          flush=True)
    if ready_file:  # the launcher waits for this file to learn the port
        with atomic_output(Path(ready_file)) as temporary:
            temporary.write_text(json.dumps({"url": server.url, "device": str(server.service.device),
                                             "pid": os.getpid()}))
    if ready:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.service.shutdown()
        server.server_close()
