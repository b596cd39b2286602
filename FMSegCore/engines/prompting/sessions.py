"""Open the prompt session a model needs: 3-D crops for a :class:`PromptableModel3D`, slice propagation for a
:class:`PromptableModel2D` (chosen from what the model implements, not from its name)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from FMSegCore.engines.prompting.embedding_cache import SharedBudget
from FMSegCore.engines.prompting.session import PromptSession
from FMSegCore.engines.prompting.session3d import PromptSession3D
from FMSegCore.errors import ModelError
from FMSegCore.io.volume import Volume
from FMSegCore.models.interfaces import PromptableModel2D, PromptableModel3D

AnySession = Union[PromptSession, PromptSession3D]


def session_dims(model: Any) -> int:
    """3 for a promptable 3-D model, 2 for a promptable 2-D one; anything else is a :class:`ModelError`."""
    if isinstance(model, PromptableModel3D):
        return 3
    if isinstance(model, PromptableModel2D):
        return 2
    raise ModelError(f"{type(model).__name__} is not a promptable model (it implements neither PromptableModel2D "
                     "nor PromptableModel3D)")


def open_prompt_session(volume: Volume, model: Any, device: Optional[Union[torch.device, str]] = None, *,
                        axis: int = 2, context: str = "auto", modality: str = "auto", window: str = "auto",
                        cache_bytes: int = 2 << 30, autocast_dtype: Optional[torch.dtype] = None,
                        budget: Optional[SharedBudget] = None, three_planes: bool = False) -> AnySession:
    """A session on ``volume`` for ``model``. ``axis``, ``context``, ``modality`` and ``window`` steer the 2-D
    path (which slices, how much of them, which intensity window); a 3-D model crops and normalises itself.
    ``budget``: a memory budget the session's embedding cache shares with others (the worker's sessions).
    ``three_planes``: a 2-D model also propagates along the two other axes, and the three planes vote."""
    if session_dims(model) == 3:
        return PromptSession3D(volume, model, device, cache_bytes=cache_bytes, autocast_dtype=autocast_dtype,
                               budget=budget)
    return PromptSession(volume, model, device, axis=axis, context=context, modality=modality, window=window,
                         cache_bytes=cache_bytes, autocast_dtype=autocast_dtype, budget=budget,
                         planes=3 if three_planes else 1)
