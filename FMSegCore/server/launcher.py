"""Start and watch a local worker process (``python -m FMSegCore serve``) from any Python, Slicer's included.

The worker may run under another Python (``python=``): an environment of its own holding torch, so torch never
enters the caller's Python. The port is chosen by the system, the token is fresh and travels in the
environment (not on the command line), and the worker writes its address to a file once it listens.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from FMSegCore.server.client import WorkerClient, WorkerUnavailable

TOKEN_ENV = "FMSEG_SERVER_TOKEN"
PYTHON_ENV = "FMSEG_WORKER_PYTHON"


def core_root() -> Path:
    """The folder holding the FMSegCore package (put on the worker's PYTHONPATH)."""
    return Path(__file__).resolve().parents[2]


class LocalWorker:
    """A worker process on this machine: start, check, stop, restart."""

    def __init__(self, python: Optional[str] = None, device: str = "auto", startup_timeout: float = 180.0,
                 log_path: Optional[str] = None, extra_env: Optional[dict[str, str]] = None) -> None:
        self.python = python or os.environ.get(PYTHON_ENV) or sys.executable
        self.device = device
        self.startup_timeout = startup_timeout
        self._folder = tempfile.TemporaryDirectory(prefix="fmseg-launch-")
        self.log_path = Path(log_path) if log_path else Path(self._folder.name) / "worker.log"
        self.extra_env = dict(extra_env or {})
        self.process: Optional[subprocess.Popen] = None
        self.client: Optional[WorkerClient] = None
        self.token = ""
        self.url = ""
        self.starts = 0

    def start(self) -> WorkerClient:
        """Start the worker and wait until it answers; its client."""
        self.stop()
        self.token = secrets.token_urlsafe(24)
        ready = Path(self._folder.name) / f"ready-{self.starts}.json"
        env = dict(os.environ, **self.extra_env)
        env[TOKEN_ENV] = self.token
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(core_root()), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        command = [self.python, "-m", "FMSegCore", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--device", self.device, "--ready-file", str(ready)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=self._folder.name)
        except OSError as error:
            raise WorkerUnavailable(f"{self.python}: cannot start the FMSeg worker ({error.strerror})") from None
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise WorkerUnavailable(f"the FMSeg worker exited at start (code {self.process.returncode}): "
                                        f"{self.last_log_line()}")
            if time.monotonic() > deadline:
                self.stop()
                raise WorkerUnavailable(f"the FMSeg worker did not start within {self.startup_timeout:.0f} s "
                                        f"(log: {self.log_path})")
            time.sleep(0.05)
        announced = json.loads(ready.read_text())
        self.url = announced["url"]
        self.client = WorkerClient(self.url, self.token)
        return self.client

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def last_log_line(self) -> str:
        """The last non-empty line the worker wrote (why it stopped, usually)."""
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to shut down; kill it if it does not."""
        if self.client is not None:
            if self.running:
                self.client.shutdown()
            self.client.close()
            self.client = None
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> LocalWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
