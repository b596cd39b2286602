"""Atomic file output: results appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from FMSegCore.errors import InputError


def file_ending(path: Path) -> str:
    """The file's ending, double ones included (``.nii.gz``, ``.seg.nrrd``, ``.mrk.json``)."""
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz", ".mrk.json"):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


@contextlib.contextmanager
def atomic_output(path: Union[str, Path], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same ending); move it onto ``path`` only if the block succeeds.

    With ``overwrite=False`` an existing ``path`` is an :class:`InputError` and is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(path, "output exists already (choose another name, or allow overwriting)")
    if not path.parent.exists():
        raise InputError(path, f"output folder {path.parent} does not exist")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{file_ending(path)}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; a result gets the usual permissions
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
