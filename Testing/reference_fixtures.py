"""The official-code fixtures under ``Testing/Data/reference`` (copied from ../shared/reference, whose README
says how they were made): each official ``state_dict``'s keys, shapes and dtypes, the deterministic fill rule the
fixtures used, fixed inputs and the official outputs. A family's test fills our network with the official tensors
(mapped where our names differ), runs the inputs and compares with :func:`assert_close`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from FMSegCore.bench.families_bench import seeded_tensor

REFERENCE = Path(__file__).resolve().parent / "Data" / "reference"


def reference_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The fixture's value of the official tensor ``key`` (seeded by the official name): the fill rule of
    ../shared/reference/README.md, which the families benchmark uses too."""
    return seeded_tensor(key, shape, dtype)


def metadata(name: str) -> dict:
    """``<name>.keys.json``."""
    return json.loads((REFERENCE / f"{name}.keys.json").read_text())


def arrays(name: str) -> dict[str, np.ndarray]:
    """``<name>.npz`` as a dict."""
    with np.load(REFERENCE / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def official_state_dict(name: str, key_map: Optional[Callable[[str], str]] = None) -> dict[str, torch.Tensor]:
    """The official state_dict of the fixture, in the official order (keys renamed by ``key_map`` if given)."""
    rename = key_map or (lambda key: key)
    return {rename(key): reference_tensor(key, tuple(shape), getattr(torch, dtype))
            for key, shape, dtype in metadata(name)["state_dict"]}


#: Tyche with the fixture's values predicts logits of about -0.115 (spread about 0.02) on the bundled CT's
#: slices, so each candidate, thresholded at 0.5, is empty. This shift of its final bias centres them on 0, where
#: the candidates' noise shows in their label maps (the layout stays the official one).
TYCHE_CENTRED = {"out_conv.conv.bias": 0.115}


def official_checkpoint(name: str, wrapping: Optional[str] = "model",
                        shifts: Optional[dict[str, float]] = None) -> bytes:
    """A valid checkpoint of the official layout, as ``torch.save`` writes it: the fixture's state_dict (each
    tensor named in ``shifts`` plus that value), nested under ``wrapping`` as the release does (Tyche's
    ``{"model": ...}``) or, with None, a plain state_dict. For ``fmseg models import`` and the worker's weights
    upload, into a throw-away cache (``FMSEG_CACHE_DIR``)."""
    state = official_state_dict(name)
    for key, shift in (shifts or {}).items():
        state[key] = state[key] + shift
    buffer = io.BytesIO()
    torch.save({wrapping: state} if wrapping else state, buffer)
    return buffer.getvalue()


def assert_close(out: torch.Tensor | np.ndarray, reference: np.ndarray, tolerance: float = 1e-4) -> None:
    """max |out - reference| <= ``tolerance`` x max |reference| (the fixtures' README's recommendation)."""
    out = out.detach().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)
    assert out.shape == reference.shape, (out.shape, reference.shape)
    error, scale = float(np.abs(out - reference).max()), float(np.abs(reference).max())
    assert error <= tolerance * scale, f"max error {error:.3g} > {tolerance:g} x {scale:.3g}"


def images(u8: np.ndarray) -> torch.Tensor:
    """Fixture images: ``u8 / 255`` as float32."""
    return torch.from_numpy(u8).float() / 255
