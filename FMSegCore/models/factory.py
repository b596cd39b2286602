"""Build zoo models by name: fetch the verified checkpoint, then load it into our architecture."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from FMSegCore.device import resolve_device
from FMSegCore.errors import ModelError
from FMSegCore.models.litemedsam import load_litemedsam
from FMSegCore.models.swinunetr import load_swinunetr_model
from FMSegCore.models.universeg import load_universeg
from FMSegCore.zoo.cache import fetch
from FMSegCore.zoo.registry import DEFAULT_PROMPTABLE, get_card

#: architecture id (as on a model card) -> loader(checkpoint path, device)
LOADERS: dict[str, Callable[..., nn.Module]] = {
    "litemedsam": load_litemedsam,
    "swinunetr": load_swinunetr_model,
    "universeg": load_universeg,
}

_LOADED: dict[tuple[str, str], nn.Module] = {}


def load_model(name: str = DEFAULT_PROMPTABLE, device: Union[str, torch.device] = "auto",
               allow_download: bool = True) -> nn.Module:
    """The zoo model ``name`` on ``device``, loaded once per process and reused."""
    device = resolve_device(device)
    key = (name, str(device))
    if key not in _LOADED:
        card = get_card(name)
        loader = LOADERS.get(card.architecture or "")
        if loader is None:
            raise ModelError(f"model '{name}' is in the zoo but FMSeg has no architecture for it yet "
                             f"(loadable: {', '.join(sorted(n for n in LOADERS))})")
        _LOADED[key] = loader(fetch(card, allow_download=allow_download), device=device)
    return _LOADED[key]
