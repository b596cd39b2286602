"""Segment new slices or volumes with an adapted automatic segmenter: no prompt, one output per structure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import numpy as np
import torch

from FMSegCore.engines.adaptation.auto_learner import AutoSegmenter2D
from FMSegCore.engines.prompting.windows import SliceWindow, extract, full_window, paste
from FMSegCore.io.overlay import anatomical_axes
from FMSegCore.io.volume import Volume
from FMSegCore.preprocessing.intensity import normalize
from FMSegCore.preprocessing.slicing import AXIS_NAMES, get_slice, in_plane_axes, put_slice


@torch.no_grad()
def slice_probabilities(segmenter: AutoSegmenter2D, images: Sequence[np.ndarray], spacing_rc: tuple[float, float],
                        device: torch.device, autocast: Optional[torch.dtype] = None) -> np.ndarray:
    """Per-structure probabilities (B, K, rows, cols) of normalised 2D slices (all the same shape)."""
    shape = images[0].shape
    window = full_window(shape, spacing_rc, segmenter.input_size)
    batch = torch.stack([segmenter.preprocess(extract(image, window).numpy()) for image in images]).to(device)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = segmenter(batch).float().cpu()
    return np.stack([probabilities_on_slice(item, window, shape) for item in logits])


def probabilities_on_slice(logits: torch.Tensor, window: SliceWindow, shape: tuple[int, int]) -> np.ndarray:
    """Per-structure logits (K, S, S) of a window -> sigmoid probabilities (K, rows, cols) on the slice."""
    return np.stack([torch.sigmoid(paste(channel.float().cpu(), window, shape)).numpy() for channel in logits])


def labels_from_probabilities(probabilities: np.ndarray, values: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """One label map from per-structure probabilities (K, ...): the most probable structure above threshold."""
    best = probabilities.argmax(axis=0)
    labels = np.asarray(values, dtype=np.uint16)[best]
    labels[probabilities.max(axis=0) < threshold] = 0
    return labels


def segment_volume_auto(segmenter: AutoSegmenter2D, image: np.ndarray, axis: int, spacing: Sequence[float],
                        values: Sequence[int], device: torch.device, autocast: Optional[torch.dtype] = None,
                        batch_size: int = 4, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Label map (KJI, uint16) of a normalised volume (or a 2D slice), slice by slice across ``axis``."""
    segmenter.eval()
    if image.ndim == 2:
        spacing_rc = (float(spacing[1]), float(spacing[0]))
        return labels_from_probabilities(slice_probabilities(segmenter, [image], spacing_rc, device, autocast)[0],
                                         values)
    rows, cols = in_plane_axes(axis)
    spacing_rc = (float(spacing[rows]), float(spacing[cols]))
    count = image.shape[2 - axis]
    labels = np.zeros(image.shape, dtype=np.uint16)
    for start in range(0, count, batch_size):
        indices = list(range(start, min(count, start + batch_size)))
        probabilities = slice_probabilities(segmenter, [get_slice(image, axis, i) for i in indices], spacing_rc,
                                            device, autocast)
        for index, item in zip(indices, probabilities):
            put_slice(labels, axis, index, labels_from_probabilities(item, values))
        if progress is not None:
            progress(indices[-1] + 1, count)
    return labels


def segment_with_adapter(segmenter: AutoSegmenter2D, metadata: dict, volume: Volume, device: torch.device,
                         autocast: Optional[torch.dtype] = None,
                         progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Label map (KJI, uint16) of a raw volume from an automatic adapter's model, normalised and sliced as the
    adapter was trained (its metadata: modality, CT window, slicing direction, structures' values)."""
    window = metadata.get("window", "abdomen")
    image = normalize(volume, modality=metadata.get("modality", "auto"),
                      window=tuple(window) if isinstance(window, list) else window)
    axis = anatomical_axes(volume.direction)[AXIS_NAMES[metadata.get("axis", "axial")]]
    values = [structure["value"] for structure in metadata["structures"]]
    return segment_volume_auto(segmenter, image, axis, volume.spacing, values, device, autocast, progress=progress)
