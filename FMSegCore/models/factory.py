"""Build zoo models by name: fetch the verified checkpoint, then load it into its family's network."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from FMSegCore.device import resolve_device
from FMSegCore.errors import ModelError
from FMSegCore.models.interfaces import INTERFACES
from FMSegCore.zoo.cache import fetch
from FMSegCore.zoo.families import Family, families, family_of
from FMSegCore.zoo.registry import DEFAULT_PROMPTABLE, ModelCard, get_card

_LOADED: dict[tuple[str, str], nn.Module] = {}


def card_family(card: ModelCard) -> Family:
    """The family that runs ``card``; a card no family runs is a :class:`ModelError`."""
    family = family_of(card)
    if family is None:
        runnable = sorted(f.name for f in families())
        raise ModelError(f"model '{card.name}' is in the zoo (weights only) but FMSeg has no network for it yet "
                         f"(families: {', '.join(runnable)})")
    return family


def build_network(card: ModelCard, device: torch.device, trainable: bool = False, allow_download: bool = True,
                  checkpoint: Optional[Path] = None) -> nn.Module:
    """A new network of ``card``'s family with its verified checkpoint (``checkpoint``: already fetched), checked
    against the declared interfaces."""
    family = card_family(card)
    loader = family.load_function()
    path = checkpoint or fetch(card, allow_download=allow_download)
    network = loader(path, device=device, trainable=trainable)
    missing = [name for name in family.implements if not isinstance(network, INTERFACES[name])]
    if missing:
        raise ModelError(f"family {family.name!r}: its network does not implement {', '.join(missing)}")
    return network


def load_model(name: str = DEFAULT_PROMPTABLE, device: Union[str, torch.device] = "auto",
               allow_download: bool = True) -> nn.Module:
    """The zoo model ``name`` on ``device`` for inference, loaded once per process and reused."""
    device = resolve_device(device)
    key = (name, str(device))
    if key not in _LOADED:
        _LOADED[key] = build_network(get_card(name), device, allow_download=allow_download)
    return _LOADED[key]


def forget_model(name: str) -> None:
    """Drop the loaded copies of zoo model ``name`` (its weights were replaced): the next :func:`load_model`
    reads its checkpoint again."""
    for key in [key for key in _LOADED if key[0] == name]:
        del _LOADED[key]
