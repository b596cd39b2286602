"""The adapter file: only the trained parameters of an adaptation, plus what is needed to trust and rebuild it.

Metadata: base model id and sha256, mode, method and its settings, structures (names, colours, label values),
number and hash of the training cases, validation figures, library versions. The file is a ``torch.save`` of
a JSON metadata string and tensors, read back with ``weights_only=True``; it is written atomically, so a cancelled or
failed run never leaves a half-written adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from FMSegCore.engines.adaptation.defaults import MODES
from FMSegCore.errors import InputError
from FMSegCore.io.atomic import atomic_output
from FMSegCore.io.torch_files import unreadable_reason

FORMAT = "fmseg-adapter"
VERSION = 1
#: The ending adapter files carry.
ADAPTER_SUFFIX = ".fmseg-adapter.pt"


@dataclass
class Adapter:
    """An adapter read from disk: its metadata and trained tensors."""

    metadata: dict[str, Any]
    state: dict[str, torch.Tensor]
    path: str = ""

    @property
    def mode(self) -> str:
        return str(self.metadata["mode"])

    @property
    def base_model(self) -> str:
        return str(self.metadata["base_model"])


def save_adapter(path: Union[str, Path], metadata: dict[str, Any], state: dict[str, torch.Tensor],
                 overwrite: bool = False) -> Path:
    """Write an adapter atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    text = json.dumps(metadata, default=_plain)  # metadata travels as JSON: plain, readable, weights_only-safe
    payload = {"format": FORMAT, "version": VERSION, "metadata": text,
               "state": {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}}
    with atomic_output(path, overwrite=overwrite) as temporary:
        torch.save(payload, temporary)
    return path


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (and tuples) as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_adapter(path: Union[str, Path]) -> Adapter:
    """Read an adapter (``weights_only=True``); anything else is an :class:`InputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "adapter file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not an adapter"
        raise InputError(path, f"not an FMSeg adapter file: {unreadable_reason(path, error)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, "not an FMSeg adapter file (no fmseg-adapter header)")
    if payload.get("version") != VERSION:
        raise InputError(path, f"adapter format version {payload.get('version')} is not supported (this FMSeg "
                               f"reads version {VERSION})")
    metadata, state = payload.get("metadata"), payload.get("state")
    try:
        metadata = json.loads(metadata) if isinstance(metadata, str) else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or not isinstance(state, dict):
        raise InputError(path, "damaged adapter file (metadata or weights missing)")
    for key in ("base_model", "base_sha256", "mode", "method", "structures"):
        if key not in metadata:
            raise InputError(path, f"damaged adapter file (no '{key}' in its metadata)")
    problem = metadata_problem(metadata)
    if problem is None and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        problem = "its weights are not named tensors"
    if problem is not None:
        raise InputError(path, f"damaged adapter file ({problem})")
    return Adapter(metadata, state, str(path))


#: Metadata fields, the JSON type their readers rely on, and whether they may be absent or null.
_FIELD_TYPES: dict[str, tuple[type, bool]] = {
    "base_model": (str, False), "base_sha256": (str, False), "mode": (str, False), "method": (dict, False),
    "structures": (list, False), "validation_dice": (dict, True), "fit": (dict, True), "geometry": (dict, True),
    "trainable_parameters": (int, True), "views": (int, True)}
_TYPE_NAMES = {str: "a string", dict: "an object", list: "a list", int: "an integer"}


def _is(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of JSON type ``kind`` (a type or a tuple of types; a boolean is no number)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def metadata_problem(metadata: dict[str, Any]) -> Optional[str]:
    """What is wrong with an adapter's metadata (a field its readers cannot use), or None."""
    for key, (kind, optional) in _FIELD_TYPES.items():
        value = metadata.get(key)
        if not (_is(value, kind) or (optional and value is None)):
            return f"its metadata's '{key}' must be {_TYPE_NAMES[kind]}"
    if metadata["mode"] not in MODES:
        return f"its metadata's 'mode' must be one of {', '.join(MODES)}"
    if not isinstance(metadata["method"].get("method"), str):
        return "its metadata's 'method' names no method"
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) and _is(s.get("value"), int)
               for s in metadata["structures"]):
        return "its metadata's 'structures' must each have a name and an integer value"
    if not all(_is(v, (int, float)) for v in (metadata.get("validation_dice") or {}).values()):
        return "its metadata's 'validation_dice' must map names to numbers"
    return None
