"""Slices of training cases as model inputs: the window a 2D model sees, its input tensor and its targets.

Windows are the prompting engine's (:mod:`FMSegCore.engines.prompting.windows`): the whole slice, or for
prompts on large slices a crop around the structure, so adapted models train on what they see at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from FMSegCore.engines.adaptation.cases import Structure, TrainingCase, case_targets
from FMSegCore.engines.prompting.windows import SliceWindow, extract, full_window


@dataclass
class WindowedSlice:
    """One window of a case's slice: model input (C, S, S), binary targets (K, S, S) and known structures (K,)."""

    image: torch.Tensor
    targets: torch.Tensor
    known: torch.Tensor
    window: SliceWindow


def window_targets(masks: np.ndarray, window: SliceWindow) -> torch.Tensor:
    """Binary masks (K, rows, cols) resampled into the window (K, S, S)."""
    return torch.stack([extract(mask.astype(np.float32), window) > 0.5 for mask in masks])


def windowed_slice(case: TrainingCase, index: int, structures: Sequence[Structure], window: SliceWindow,
                   preprocess: Callable[[np.ndarray], torch.Tensor]) -> WindowedSlice:
    """The model input and targets of one slice of a case, seen through ``window``."""
    image, labels = case.slice(index)
    masks, known = case_targets(case, labels, structures)
    return WindowedSlice(preprocess(extract(image, window).numpy()), window_targets(masks, window),
                         torch.from_numpy(known), window)


def whole_slice_window(case: TrainingCase, index: int, size: int) -> SliceWindow:
    """The whole slice, squared in millimetres, at the model's input size."""
    return full_window(case.slice(index)[0].shape, case.spacing_rc(), size)
