"""Reading JSON input files with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from FMSegCore.errors import InputError
from FMSegCore.io.volume import PathLike


def read_json(path: PathLike, kind: str = "JSON file") -> object:
    """The parsed content of a JSON file; :class:`InputError` naming the file if missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a valid {kind} ({error})") from None
