"""``fmseg serve``: the worker's HTTP front (FastAPI on uvicorn, one process). JSON for small requests, binary
frames for arrays (:mod:`~FMSegCore.server.wire`).

Routes (all under ``/v1``; every one requires the token when the server has one):

- ``GET info``, ``GET models``, ``POST models/download`` (a job)
- ``POST volumes`` (an array frame with geometry; ``kind: labels`` or ``segments`` in its meta for a label map)
  -> ``{"volume": id, ...}``; ``DELETE volumes/<id>``
- ``POST adapters`` (an adapter file's bytes) -> ``{"adapter": id, ...}``; ``GET adapters/<id>`` -> the file
- ``POST tasks`` (a task file's bytes, ``fmseg task create``) -> ``{"task": id, "model", "classes", ...}``;
  ``GET tasks/<id>`` -> the file
- ``POST sessions`` -> ``{"session": id}``; ``POST sessions/<id>/prompt`` -> a mask frame; ``DELETE sessions/<id>``
- ``POST jobs/incontext|task|adapt|segment`` -> a job (``jobs/task``: a task from labelled references; its
  result is the new task's id and summary); ``GET jobs/<id>``; ``POST jobs/<id>/cancel``;
  ``GET jobs/<id>/arrays/<name>`` -> an array frame
- ``POST shutdown``

The API is described at ``/openapi.json`` and ``/docs`` (outside ``/v1``; they too require the token when the
server has one). Refusals are one line, ``{"error": "..."}``: 400 bad input (the field named), 401 token, 404,
405, 411/413 body size, 500 internal error (logged with its traceback).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import uvicorn

from FMSegCore.errors import FMSegError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.server.defaults import EMBEDDING_BUDGET, SESSION_IDLE_S
from FMSegCore.server.gate import MAX_JSON_BYTES, GateSettings
from FMSegCore.server.routes import build_app
from FMSegCore.server.service import Service

DEFAULT_PORT = 8765
#: Idle keep-alive connections stay open this long, so a client's pooled connection is not closed under it
#: between two prompts.
KEEP_ALIVE_S = 3600
__all__ = ["DEFAULT_PORT", "MAX_JSON_BYTES", "WorkerServer", "is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, read back with ``getsockname``)."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on such sockets (else each answer waits ~40 ms for an ACK)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class WorkerServer:
    """The :class:`Service` served over HTTP on a socket bound at construction (so the port is known at once),
    with the standard library servers' ``serve_forever`` / ``shutdown`` / ``server_close``."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str = "",
                 max_upload_bytes: int = 2 << 30, verbose: bool = False) -> None:
        if not token and not is_loopback(host):
            raise FMSegError(f"binding {host} exposes the worker beyond this machine: give a token "
                             "(--token or FMSEG_SERVER_TOKEN)")
        self.service = service
        self.settings = GateSettings(token, max_upload_bytes, verbose)
        self.socket = listen(host, port)
        config = uvicorn.Config(build_app(service, self.settings, self.stop), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", proxy_headers=False, server_header=False,
                                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=30)
        self._server = uvicorn.Server(config)
        self._serving = threading.Event()
        self._finished = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        """Serve until :meth:`stop` (``POST /v1/shutdown``), :meth:`shutdown` or, in the main thread, Ctrl-C.
        ``poll_interval`` is the standard library's argument, unused (uvicorn looks every 0.1 s)."""
        self._serving.set()
        if threading.current_thread() is threading.main_thread():
            # uvicorn stops on SIGINT and then re-raises it under the handler it found: make that Python's, so
            # Ctrl-C ends as an interrupted command (exit 130) even when the worker was started with SIGINT ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._finished.set()

    def stop(self) -> None:
        """Ask the server to stop (it finishes the answers under way); returns at once."""
        self._server.should_exit = True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop, and wait until :meth:`serve_forever` has returned (from another thread)."""
        self.stop()
        if self._serving.is_set():
            self._finished.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str = "", device: str = "auto",
          max_upload_bytes: int = 2 << 30, ready_file: Optional[str] = None, verbose: bool = False,
          ready: Optional[Callable[[WorkerServer], None]] = None, embedding_budget_bytes: int = EMBEDDING_BUDGET,
          session_idle_s: float = SESSION_IDLE_S) -> None:
    """Run the worker until shut down (``POST /v1/shutdown`` or Ctrl-C)."""
    service = Service(device, embedding_budget_bytes=embedding_budget_bytes, session_idle_s=session_idle_s)
    server = WorkerServer(service, host, port, token, max_upload_bytes, verbose)
    print(f"fmseg worker on {server.url} (device {server.service.device}; "
          f"{'token required' if token else 'no token: this machine only'}; API at {server.url}/docs); "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    if ready_file:  # the launcher waits for this file to learn the port
        with atomic_output(Path(ready_file)) as temporary:
            temporary.write_text(json.dumps({"url": server.url, "device": str(server.service.device),
                                             "pid": os.getpid()}))
    if ready:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.service.shutdown()
        server.server_close()
