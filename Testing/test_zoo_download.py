"""FMSegCore.zoo.download against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from zoo_http_server import FileServer, closed_port_url

from FMSegCore.errors import ModelError
from FMSegCore.zoo.download import download, partial_path

BODY = os.urandom(300_000) + b"end of weights"
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMSEG_OFFLINE", raising=False)


def test_good_download_verifies_and_lands_atomically(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    destination = tmp_path / "models" / "w.pt"
    assert download(url, destination, sha256=SHA, expected_size=len(BODY), progress=False) == destination
    assert destination.read_bytes() == BODY
    assert not partial_path(destination).exists()
    assert sorted(p.name for p in destination.parent.iterdir()) == ["w.pt"]
    assert server.requests == [("/w.pt", None)]


def test_corrupt_file_is_rejected_and_deleted(server: FileServer, tmp_path: Path) -> None:
    corrupt = bytearray(BODY)
    corrupt[1000] ^= 0xFF
    url = server.serve("/w.pt", bytes(corrupt))
    destination = tmp_path / "w.pt"
    with pytest.raises(ModelError) as caught:
        download(url, destination, sha256=SHA, progress=False)
    message = str(caught.value)
    assert url in message and SHA in message and hashlib.sha256(bytes(corrupt)).hexdigest() in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY, mode="cut-first")
    destination = tmp_path / "w.pt"
    with pytest.raises(ModelError, match="cut off"):
        download(url, destination, sha256=SHA, progress=False)
    assert not destination.exists()
    kept = partial_path(destination).stat().st_size
    assert 0 < kept < len(BODY)
    assert download(url, destination, sha256=SHA, progress=False).read_bytes() == BODY
    assert server.requests[-1] == ("/w.pt", f"bytes={kept}-")
    assert not partial_path(destination).exists()


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY, mode="ignore-range")
    destination = tmp_path / "w.pt"
    partial_path(destination).write_bytes(b"garbage from another file")
    download(url, destination, sha256=SHA, progress=False)
    assert destination.read_bytes() == BODY
    assert server.requests == [("/w.pt", "bytes=25-")]


def test_complete_partial_file_answered_416_is_verified(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    destination = tmp_path / "w.pt"
    partial_path(destination).write_bytes(BODY)
    download(url, destination, sha256=SHA, progress=False)
    assert destination.read_bytes() == BODY
    assert server.requests == [("/w.pt", f"bytes={len(BODY)}-")]


def test_partial_file_longer_than_remote_restarts(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    destination = tmp_path / "w.pt"
    partial_path(destination).write_bytes(BODY + b"extra bytes")
    download(url, destination, sha256=SHA, progress=False)
    assert destination.read_bytes() == BODY
    assert server.requests == [("/w.pt", f"bytes={len(BODY) + 11}-"), ("/w.pt", None)]


def test_no_resume_discards_partial_file(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    destination = tmp_path / "w.pt"
    partial_path(destination).write_bytes(BODY[:100])
    download(url, destination, sha256=SHA, progress=False, resume=False)
    assert server.requests == [("/w.pt", None)]


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_url_and_status(server: FileServer, tmp_path: Path, status: int) -> None:
    url = server.serve("/w.pt", b"nope", mode=f"status:{status}")
    with pytest.raises(ModelError) as caught:
        download(url, tmp_path / "w.pt", progress=False)
    assert url in str(caught.value) and f"HTTP {status}" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_web_page_instead_of_file_is_an_error(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", b"<html>Sign in to continue</html>", mode="html")
    with pytest.raises(ModelError, match="web page"):
        download(url, tmp_path / "w.pt", progress=False)
    assert not (tmp_path / "w.pt").exists()


def test_size_mismatch_announced_by_server_fails_early(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    with pytest.raises(ModelError, match=f"offers {len(BODY)} bytes, expected 1234"):
        download(url, tmp_path / "w.pt", expected_size=1234, progress=False)
    assert not (tmp_path / "w.pt").exists()


def test_unverified_download_without_hash_is_accepted(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    assert download(url, tmp_path / "w.pt", progress=False).read_bytes() == BODY


def test_offline_environment_makes_no_request(server: FileServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.serve("/w.pt", BODY)
    monkeypatch.setenv("FMSEG_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline") as caught:
        download(url, tmp_path / "w.pt", sha256=SHA, progress=False)
    assert url in str(caught.value) and "not cached" in str(caught.value)
    assert server.requests == []


def test_offline_argument_makes_no_request(server: FileServer, tmp_path: Path) -> None:
    url = server.serve("/w.pt", BODY)
    with pytest.raises(ModelError, match="offline"):
        download(url, tmp_path / "w.pt", progress=False, offline=True)
    assert server.requests == []


def test_refused_connection_is_one_line_naming_url(tmp_path: Path) -> None:
    url = closed_port_url()
    with pytest.raises(ModelError) as caught:
        download(url, tmp_path / "w.pt", progress=False, timeout=5)
    message = str(caught.value)
    assert url in message and "cannot connect" in message and "\n" not in message
    assert not (tmp_path / "w.pt").exists()


def test_stalled_server_times_out(server: FileServer, tmp_path: Path) -> None:
    server.stall_s = 1.5
    url = server.serve("/w.pt", BODY, mode="stall")
    with pytest.raises(ModelError, match="timed out") as caught:
        download(url, tmp_path / "w.pt", progress=False, timeout=(5, 0.3))
    assert url in str(caught.value)
    assert not (tmp_path / "w.pt").exists()
