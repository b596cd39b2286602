"""A real HTTP file server on 127.0.0.1 for the zoo tests, with Range support and misbehaving modes.

Each route serves bytes in one mode:

- ``ok``: the file, honouring ``Range: bytes=N-`` (206, or 416 past the end);
- ``ignore-range``: always the whole file with 200;
- ``cut-first``: the first response announces the full Content-Length but closes after half of it; later
  responses behave like ``ok``;
- ``html``: the bytes as ``text/html`` (a login or quota page);
- ``stall``: headers, then silence for ``stall_s`` seconds;
- ``status:<code>``: an error page with that status (404, 500...).

Every request is recorded as ``(path, Range header or None)``.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional


class Route:
    """What one path serves."""

    def __init__(self, body: bytes, mode: str = "ok", content_type: str = "application/octet-stream") -> None:
        self.body = body
        self.mode = mode
        self.content_type = content_type
        self.hits = 0


class FileServer(ThreadingHTTPServer):
    """Serves :class:`Route` objects from a thread; use as a context manager."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, Optional[str]]] = []
        self.stall_s = 2.0
        self._thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up early (the tests' timeouts) are expected: no traceback on stderr."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def serve(self, path: str, body: bytes, mode: str = "ok", content_type: str = "application/octet-stream") -> str:
        """Register ``body`` at ``path``; its full URL."""
        self.routes[path] = Route(body, mode, content_type)
        return self.base + path

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def _headers(self, status: int, length: int, content_type: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        route = self.server.routes.get(self.path)
        if route is None:
            route = Route(b"not found", "status:404")
        route.hits += 1
        body, mode = route.body, route.mode
        if mode.startswith("status:"):
            self._headers(int(mode.split(":")[1]), len(body), "text/plain")
            self.wfile.write(body)
        elif mode == "cut-first" and route.hits == 1:
            self._headers(200, len(body), route.content_type)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif mode == "stall":
            self._headers(200, len(body), route.content_type)
            self.wfile.flush()
            time.sleep(self.server.stall_s)
            self.close_connection = True
        elif mode == "html":
            self._headers(200, len(body), "text/html; charset=utf-8")
            self.wfile.write(body)
        else:
            self._send_range(body, route.content_type, None if mode == "ignore-range" else range_header)

    def _send_range(self, body: bytes, content_type: str, range_header: Optional[str]) -> None:
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match is None:
            self._headers(200, len(body), content_type, {"Accept-Ranges": "bytes"})
            self.wfile.write(body)
            return
        start = int(match.group(1))
        if start >= len(body):
            self._headers(416, 0, content_type, {"Content-Range": f"bytes */{len(body)}"})
            return
        self._headers(206, len(body) - start, content_type,
                      {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        self.wfile.write(body[start:])


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights.pt"


def build_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel (a zip) holding ``members``."""
    name = dist.replace("-", "_")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {dist}\nVersion: {version}\n")
    return wheel


def json_api_page(wheel_url: str, wheel_name: str, sha256: str, size: int) -> bytes:
    """A PyPI JSON API page (``/pypi/<dist>/<version>/json``) listing one wheel."""
    entry = {"packagetype": "bdist_wheel", "filename": wheel_name, "url": wheel_url,
             "digests": {"sha256": sha256}, "size": size}
    return json.dumps({"info": {}, "urls": [entry]}).encode()


def simple_api_page(wheel_url: str, wheel_name: str, sha256: str, size: int) -> bytes:
    """A PEP 691 simple API page (``/simple/<dist>/``) listing one wheel."""
    entry = {"filename": wheel_name, "url": wheel_url, "hashes": {"sha256": sha256}, "size": size}
    return json.dumps({"meta": {"api-version": "1.1"}, "files": [entry]}).encode()
