"""Reading official checkpoints: the state_dict inside whatever wrapping a release uses, loaded with strict keys;
every failure is one line naming the file (a :class:`~FMSegCore.errors.ModelError`). Shared by the families'
loaders and by ``fmseg models import``, which checks a user's file the same way before installing it."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from FMSegCore.errors import ModelError
from FMSegCore.io.torch_files import unreadable_reason

#: Keys official releases wrap their state_dict under (checked in this order).
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


def read_state_dict(checkpoint: Union[str, Path], title: str,
                    wrappers: tuple[str, ...] = WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (``weights_only=True``): a plain state_dict or one under a ``wrappers`` key."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: no such file")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors come in many types
        raise ModelError(f"{checkpoint}: cannot read a {title} checkpoint: {unreadable_reason(checkpoint, error)}"
                         ) from None
    if isinstance(state, dict):
        for key in wrappers:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"{checkpoint}: not a {title} checkpoint (no state_dict of tensors found)")
    return state


def check_layout(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: Union[str, Path], title: str) -> None:
    """Raise a one-line :class:`ModelError` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    wrong = [f"{key} {tuple(state[key].shape)} instead of {tuple(value.shape)}" for key, value in expected.items()
             if key in state and tuple(state[key].shape) != tuple(value.shape)]
    parts = [f"{len(keys)} {kind} key(s), e.g. {keys[0]}"
             for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of another shape, e.g. {wrong[0]}")
    if parts:
        raise ModelError(f"{checkpoint}: not a {title} checkpoint ({'; '.join(parts)})")


def load_strict(model: nn.Module, checkpoint: Union[str, Path], title: str,
                wrappers: tuple[str, ...] = WRAPPER_KEYS) -> nn.Module:
    """Load a checkpoint into ``model`` with strict keys and shapes (see :func:`read_state_dict`)."""
    state = read_state_dict(checkpoint, title, wrappers)
    check_layout(model, state, checkpoint, title)
    model.load_state_dict(state, strict=True)
    return model
