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
from typing import Any, Union

import torch

from FMSegCore.errors import InputError
from FMSegCore.io.atomic import atomic_output

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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(path, f"not an FMSeg adapter file ({reason[:200]})") from None
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
    return Adapter(metadata, state, str(path))
