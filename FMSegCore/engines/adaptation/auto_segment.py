"""Segment new slices or volumes with an adapted automatic segmenter: no prompt, one output per structure.

Adapters with a ``geometry`` in their metadata (physical units, :mod:`.geometry`) see the volume in canonical
orientation, its body region resampled to their pixel size and tiled into windows of their physical side;
older adapters see each whole slice, squared and resized to the model input, as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from FMSegCore.engines.adaptation.auto_learner import AutoSegmenter2D
from FMSegCore.engines.adaptation.geometry import (
    Reorientation,
    SliceGeometry,
    body_region,
    tile_windows,
    to_pixel_size,
)
from FMSegCore.engines.label_vote import labels_from_probabilities
from FMSegCore.engines.prompting.windows import SliceWindow, extract, full_window, paste
from FMSegCore.errors import InputError
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.volume import Volume
from FMSegCore.preprocessing.intensity import guess_modality, normalize
from FMSegCore.preprocessing.slicing import AXIS_NAMES, get_slice, in_plane_axes, resize_2d
from FMSegCore.progress import ProgressCallback, ProgressClock


def _run(segmenter: AutoSegmenter2D, inputs: list[torch.Tensor], device: torch.device,
         autocast: Optional[torch.dtype]) -> torch.Tensor:
    batch = torch.stack(inputs).to(device)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return segmenter(batch).float().cpu()


@torch.no_grad()
def slice_probabilities(segmenter: AutoSegmenter2D, images: Sequence[np.ndarray], spacing_rc: tuple[float, float],
                        device: torch.device, autocast: Optional[torch.dtype] = None) -> np.ndarray:
    """Per-structure probabilities (B, K, rows, cols) of normalised 2D slices (all the same shape), each whole
    slice squared and resized to the model input (adapters from before physical units)."""
    shape = images[0].shape
    window = full_window(shape, spacing_rc, segmenter.input_size)
    logits = _run(segmenter, [segmenter.preprocess(extract(image, window).numpy()) for image in images], device,
                  autocast)
    return np.stack([probabilities_on_slice(item, window, shape) for item in logits])


@torch.no_grad()
def physical_probabilities(segmenter: AutoSegmenter2D, images: Sequence[np.ndarray], spacing_rc: tuple[float, float],
                           geometry: SliceGeometry, device: torch.device, autocast: Optional[torch.dtype] = None,
                           batch_size: int = 4) -> np.ndarray:
    """Per-structure probabilities (B, K, rows, cols) of normalised 2D slices (all the same shape): resampled to
    the geometry's pixel size, tiled, each tile's probabilities averaged where tiles overlap."""
    shape = images[0].shape
    resampled = [to_pixel_size(image, spacing_rc, geometry.pixel_mm) for image in images]
    small = resampled[0].shape
    windows = tile_windows(small, geometry)
    jobs = [(n, window) for n in range(len(images)) for window in windows]
    sums: Optional[np.ndarray] = None
    counts = np.zeros(small, dtype=np.float32)
    for window in windows:
        counts[_covered(window, small)] += 1
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        logits = _run(segmenter, [segmenter.preprocess(extract(resampled[n], w).numpy()) for n, w in chunk], device,
                      autocast)
        if sums is None:
            sums = np.zeros((len(images), logits.shape[1]) + small, dtype=np.float32)
        for (n, window), item in zip(chunk, logits):
            target, source = _covered(window, small), _inside(window, small)
            sums[n][(slice(None),) + target] += torch.sigmoid(item).numpy()[(slice(None),) + source]
    probabilities = sums / np.maximum(counts, 1)
    return np.stack([resize_2d(item, shape, "bilinear") for item in probabilities]) if small != shape \
        else probabilities


def _covered(window: SliceWindow, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The slice pixels a whole-pixel window covers."""
    r0, c0, size = int(window.row0), int(window.col0), window.size
    return (slice(max(0, r0), min(shape[0], r0 + size)), slice(max(0, c0), min(shape[1], c0 + size)))


def _inside(window: SliceWindow, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The window pixels that lie on the slice (the part of the window :func:`_covered` maps to)."""
    rows, cols = _covered(window, shape)
    r0, c0 = int(window.row0), int(window.col0)
    return (slice(rows.start - r0, rows.stop - r0), slice(cols.start - c0, cols.stop - c0))


def probabilities_on_slice(logits: torch.Tensor, window: SliceWindow, shape: tuple[int, int]) -> np.ndarray:
    """Per-structure logits (K, S, S) of a window -> sigmoid probabilities (K, rows, cols) on the slice."""
    return np.stack([torch.sigmoid(paste(channel.float().cpu(), window, shape)).numpy() for channel in logits])


def segment_volume_auto(segmenter: AutoSegmenter2D, image: np.ndarray, axis: int, spacing: Sequence[float],
                        values: Sequence[int], device: torch.device, autocast: Optional[torch.dtype] = None,
                        batch_size: int = 4, progress: Optional[ProgressCallback] = None,
                        geometry: Optional[SliceGeometry] = None) -> np.ndarray:
    """Label map (KJI, uint16) of a normalised volume (or a 2D slice), slice by slice across ``axis``; with a
    ``geometry``, only the body region, in physical units (the volume must be in the geometry's orientation)."""
    segmenter.eval()
    if image.ndim == 2:
        spacing_rc = (float(spacing[1]), float(spacing[0]))
        if geometry is not None:
            return labels_from_probabilities(
                physical_probabilities(segmenter, [image], spacing_rc, geometry, device, autocast)[0], values)
        return labels_from_probabilities(slice_probabilities(segmenter, [image], spacing_rc, device, autocast)[0],
                                         values)
    rows, cols = in_plane_axes(axis)
    spacing_rc = (float(spacing[rows]), float(spacing[cols]))
    region = (slice(None), slice(None)) if geometry is None else \
        body_region(image, axis, spacing_rc, geometry.margin_mm)
    count = image.shape[2 - axis]
    clock = ProgressClock(progress, count, "segmenting")
    labels = np.zeros(image.shape, dtype=np.uint16)
    for start in range(0, count, batch_size):
        indices = list(range(start, min(count, start + batch_size)))
        slices = [get_slice(image, axis, i)[region] for i in indices]
        if geometry is not None:
            probabilities = physical_probabilities(segmenter, slices, spacing_rc, geometry, device, autocast,
                                                   batch_size)
        else:
            probabilities = slice_probabilities(segmenter, slices, spacing_rc, device, autocast)
        for index, item in zip(indices, probabilities):
            get_slice(labels, axis, index)[region] = labels_from_probabilities(item, values)
        clock(indices[-1] + 1)
    return labels


def scan_modality(image: Volume, source: object, metadata: dict, modality: str = "auto",
                  override: str = "--modality") -> Optional[str]:
    """The modality to normalise the scan as: the given one, else the adapter's; a scan that looks like another
    modality than the adapter's is refused (one line naming ``source``) unless the modality is given (how, in
    ``override``)."""
    if modality != "auto":
        return modality
    trained = str(metadata.get("modality", "auto")).upper()
    if trained not in ("CT", "MR"):
        return None
    seen = guess_modality(image)
    if seen != trained:
        raise InputError(source, f"this scan looks like {seen} but the adapter was trained on {trained}: "
                                 "automatic adapters do not carry over between modalities; train one on "
                                 f"{seen} cases, or pass {override} {seen} to segment it anyway")
    return None


def segment_with_adapter(segmenter: AutoSegmenter2D, metadata: dict, volume: Volume, device: torch.device,
                         autocast: Optional[torch.dtype] = None,
                         progress: Optional[ProgressCallback] = None,
                         modality: Optional[str] = None) -> np.ndarray:
    """Label map (KJI, uint16) of a raw volume from an automatic adapter's model, normalised and sliced as the
    adapter was trained (its metadata: modality, CT window, slicing direction, geometry, structures' values).
    ``modality`` overrides the adapter's for the normalisation (a scan of another modality than the training's)."""
    window = metadata.get("window", "abdomen")
    image = normalize(volume, modality=modality or metadata.get("modality", "auto"),
                      window=tuple(window) if isinstance(window, list) else window)
    values = [structure["value"] for structure in metadata["structures"]]
    axis = anatomical_axes(volume.direction)[AXIS_NAMES[metadata.get("axis", "axial")]]
    geometry = SliceGeometry.from_metadata(metadata)
    if geometry is None or geometry.orientation != "LPS":
        return segment_volume_auto(segmenter, image, axis, volume.spacing, values, device, autocast,
                                   progress=progress, geometry=geometry)
    turn = Reorientation.of(volume.direction)
    labels = segment_volume_auto(segmenter, np.ascontiguousarray(turn.apply(image)), turn.axis(axis),
                                 turn.spacing(volume.spacing), values, device, autocast, progress=progress,
                                 geometry=geometry)
    return np.ascontiguousarray(turn.invert(labels))
