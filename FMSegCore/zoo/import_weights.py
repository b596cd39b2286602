"""Install a checkpoint the user downloaded by hand (offline sites, licence-gated weights): checked against the
card (size and sha256 where published) and against its family's key layout (the family's own loader reads it),
then copied atomically into the cache, where ``fmseg`` finds it as if it had been fetched."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from FMSegCore.errors import InputError, ModelError
from FMSegCore.zoo.cache import download_path, file_matches, remember_digest
from FMSegCore.zoo.download import file_sha256
from FMSegCore.zoo.families import family_of
from FMSegCore.zoo.registry import ModelCard


def check_weights(card: ModelCard, path: Path) -> str:
    """The file's sha256 when it is ``card``'s checkpoint: its published size and sha256, and a strict load by
    the card's family; otherwise a one-line error naming the file and what does not match."""
    if not path.is_file():
        raise InputError(path, "no such file")
    family = family_of(card)
    if family is None:
        raise ModelError(f"{path}: no FMSeg family runs model {card.name} yet, so its layout cannot be checked")
    if card.size_bytes is not None and path.stat().st_size != card.size_bytes:
        raise ModelError(f"{path}: {path.stat().st_size:,} bytes, but {card.name}'s file has {card.size_bytes:,}")
    digest = file_sha256(path)
    if card.sha256 is not None and digest != card.sha256.lower():
        raise ModelError(f"{path}: sha256 {digest[:16]}... is not the published {card.sha256[:16]}... of "
                         f"{card.name}")
    try:
        family.load_function()(path, "cpu")
    except (ModelError, InputError) as error:
        raise ModelError(f"{str(error).rstrip('.')} (importing it as {card.name})") from None
    return digest


def import_weights(card: ModelCard, path: Path, replace: bool = False) -> Path:
    """Check ``path`` (:func:`check_weights`) and copy it to the card's cache location atomically; an installed
    file is replaced only with ``replace``. Returns the installed path."""
    if card.parsed_source.kind == "bundled":
        raise ModelError(f"model {card.name} ships with FMSeg: there is nothing to import")
    destination = download_path(card)
    if destination.exists() and not replace and file_matches(destination, card):
        raise ModelError(f"{destination}: model {card.name} is already installed; pass --replace to replace it")
    digest = check_weights(card, path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    os.close(handle)
    try:
        shutil.copyfile(path, temporary)
        os.replace(temporary, destination)
    finally:
        Path(temporary).unlink(missing_ok=True)
    remember_digest(destination, digest)
    return destination
