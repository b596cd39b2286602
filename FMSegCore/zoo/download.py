"""Resumable, verified, atomic HTTP downloads with ``requests``.

A download streams into ``<destination>.partial``; an interrupted one is continued later with an HTTP ``Range``
request. Only a complete file whose size and sha256 check out is renamed onto ``destination``, so that path
never holds a partial or corrupt file. Every failure is a one-line :class:`ModelError` naming the URL and what
to do about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import requests
from tqdm import tqdm

from FMSegCore.errors import ModelError

#: Environment variable that forbids every network access of the zoo when set to 1/true/yes.
OFFLINE_ENV = "FMSEG_OFFLINE"

#: (connect, read) timeouts in seconds.
DEFAULT_TIMEOUT = (15.0, 60.0)

_CHUNK = 1 << 16
_RESUME_HINT = "run the same command again to resume the download"


def offline_requested(offline: Optional[bool] = None) -> bool:
    """``offline`` when given, else whether ``FMSEG_OFFLINE`` is set to a true value."""
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def file_sha256(path: Union[str, Path]) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def partial_path(destination: Union[str, Path]) -> Path:
    """Where an unfinished download of ``destination`` is kept."""
    destination = Path(destination)
    return destination.with_name(destination.name + ".partial")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(error: BaseException) -> str:
    """The useful end of a requests/urllib3 exception chain, on one line."""
    reason: Any = error.args[0] if error.args else error
    reason = getattr(reason, "reason", reason)
    if isinstance(reason, BaseException) and reason.args and isinstance(reason.args[0], str):
        reason = reason.args[0]
    text = re.sub(r"^(<[^>]*>|\w+\([^)]*\)): ", "", _one_line(str(reason)))
    return text.replace("Failed to establish a new connection: ", "") or type(error).__name__


@contextlib.contextmanager
def session_scope(session: Optional[requests.Session] = None) -> Iterator[requests.Session]:
    """``session`` when given, else a new session closed at the end of the block."""
    if session is not None:
        yield session
        return
    with requests.Session() as own:
        yield own


def request(url: str, session: requests.Session, timeout: Any, headers: Optional[dict] = None,
            stream: bool = False) -> requests.Response:
    """GET ``url``; connection failures and timeouts become a :class:`ModelError` naming the URL."""
    try:
        return session.get(url, headers=headers or {}, timeout=timeout, stream=stream, allow_redirects=True)
    except requests.Timeout as error:
        raise ModelError(f"{url}: timed out ({_reason(error)}); check the network connection and retry") from error
    except requests.RequestException as error:
        raise ModelError(f"{url}: cannot connect ({_reason(error)}); check the network connection or proxy "
                         "settings, or download the file by hand") from error


def raise_for_status(response: requests.Response, url: str) -> None:
    """An HTTP error status becomes a :class:`ModelError` naming the URL and a remedy."""
    if response.status_code < 400:
        return
    remedy = ("the file may have moved: check the model's homepage" if response.status_code in (403, 404, 410)
              else "the server failed: retry later")
    raise ModelError(f"{url}: HTTP {response.status_code} {_one_line(response.reason or '')}; {remedy}")


def _total_from_content_range(value: Optional[str]) -> Optional[int]:
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _start_from_content_range(value: Optional[str]) -> Optional[int]:
    match = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def _open_response(url: str, partial: Path, offset: int, session: requests.Session,
                   timeout: Any) -> tuple[Optional[requests.Response], int]:
    """The response to stream and the offset it starts at; ``(None, size)`` when the partial file is complete."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    response = request(url, session, timeout, headers, stream=True)
    if response.status_code == 416 and offset:
        response.close()
        if _total_from_content_range(response.headers.get("Content-Range")) == offset:
            return None, offset
        partial.unlink()
        return _open_response(url, partial, 0, session, timeout)
    raise_for_status(response, url)
    if response.headers.get("Content-Type", "").lower().startswith("text/html"):
        response.close()
        raise ModelError(f"{url}: the server sent a web page instead of the file (a login, quota or confirmation "
                         "page?); download it by hand from the model's homepage")
    if response.status_code != 206:
        return response, 0  # 200: the whole file (a server that ignores Range restarts the download)
    if _start_from_content_range(response.headers.get("Content-Range")) == offset:
        return response, offset
    response.close()
    if not offset:
        raise ModelError(f"{url}: the server sent part of the file when the whole was asked for; retry later")
    partial.unlink()
    return _open_response(url, partial, 0, session, timeout)


def _body_end(response: requests.Response, offset: int) -> Optional[int]:
    """The file size the response will leave, from its Content-Length; None when it has none."""
    length = response.headers.get("Content-Length", "")
    return offset + int(length) if length.isdigit() else None


def _stream(response: requests.Response, url: str, partial: Path, offset: int, progress: bool) -> None:
    """Write the response body to ``partial`` from ``offset``; a short body is a :class:`ModelError`."""
    expected = _body_end(response, offset)
    show = progress and sys.stderr.isatty()
    received = offset
    with response, open(partial, "r+b" if offset else "wb") as stream, \
            tqdm(total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=partial.name[:-len(".partial")], disable=not show, leave=False) as bar:
        stream.seek(offset)
        stream.truncate()
        try:
            for chunk in response.iter_content(_CHUNK):
                stream.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except requests.RequestException as error:
            reason = _reason(error)
            what = "timed out" if "timed out" in reason.lower() else "transfer cut off"
            raise ModelError(f"{url}: {what} after {received} of {expected or '?'} bytes ({reason}); "
                             f"{_RESUME_HINT}") from error
    if expected is not None and received != expected:
        raise ModelError(f"{url}: transfer cut off after {received} of {expected} bytes; {_RESUME_HINT}")


def _check_size(url: str, partial: Path, expected_size: Optional[int]) -> None:
    size = partial.stat().st_size
    if expected_size is not None and size != expected_size:
        partial.unlink()
        raise ModelError(f"{url}: got {size} bytes, expected {expected_size}; the download was deleted: retry, "
                         "and if it persists the file on the server changed (report it to FMSeg)")


def _check_sha256(url: str, partial: Path, sha256: Optional[str]) -> None:
    if sha256 is None:
        return
    actual = file_sha256(partial)
    if actual != sha256.lower():
        partial.unlink()
        raise ModelError(f"{url}: checksum mismatch: expected sha256 {sha256.lower()}, got {actual}; the corrupt "
                         "download was deleted: retry, and if it persists the file on the server changed "
                         "(report it to FMSeg)")


def download(url: str, destination: Union[str, Path], sha256: Optional[str] = None,
             expected_size: Optional[int] = None, progress: bool = True, resume: bool = True,
             timeout: Any = DEFAULT_TIMEOUT, session: Optional[requests.Session] = None,
             offline: Optional[bool] = None) -> Path:
    """Download ``url`` to ``destination``, verified against ``expected_size`` and ``sha256`` when given.

    Resumes ``<destination>.partial`` when ``resume``; shows a progress bar on a terminal when ``progress``.
    ``offline`` (default: the ``FMSEG_OFFLINE`` environment variable) forbids any request.
    """
    destination = Path(destination)
    if offline_requested(offline):
        raise ModelError(f"{destination} is not cached and offline mode ({OFFLINE_ENV}=1) forbids downloading "
                         f"it from {url}: download it where the network is available and copy it there")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(destination)
    if partial.exists() and (not resume or (expected_size is not None and partial.stat().st_size > expected_size)):
        partial.unlink()
    offset = partial.stat().st_size if partial.exists() else 0
    with session_scope(session) as active:
        response, offset = _open_response(url, partial, offset, active, timeout)
        if response is not None:
            total = _body_end(response, offset)
            if expected_size is not None and total is not None and total != expected_size:
                response.close()
                raise ModelError(f"{url}: the server offers {total} bytes, expected {expected_size}; the file on "
                                 "the server changed: check the model's homepage")
            _stream(response, url, partial, offset, progress)
    _check_size(url, partial, expected_size)
    _check_sha256(url, partial, sha256)
    os.replace(partial, destination)
    return destination
