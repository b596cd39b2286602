"""Learned 3-D refinement of a mask (:class:`~FMSegCore.models.interfaces.RefinementModel3D`): the geometry that
training and inference share.

A refinement works on one box of the volume around the structure (:func:`crop_for`): the bounding box of the
current mask (the *prior*) and of the include clicks, grown by a margin. The box is resampled to a cube of
``P`` voxels (:func:`inputs`): the image (trilinear, then standardised within the patch), the prior (trilinear,
as a fraction), and one map each for include and exclude clicks (a ball of about two patch voxels at each
click). The network's logits are resampled back onto the box and thresholded (:func:`paste`); nothing outside
the box changes to foreground. :func:`refine` does all of it in one call.

Arrays are KJI (as :class:`~FMSegCore.io.volume.Volume.array`); clicks are ``(k, j, i, include)`` in voxel
indices of that grid; ``spacing`` is in mm along I, J, K (as ``Volume.spacing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from FMSegCore.models.interfaces import RefinementModel3D

#: A click: voxel indices (k, j, i) and whether it includes (True) or excludes (False).
Click = tuple[float, float, float, bool]

#: Radius of a click's ball in patch voxels (the map is 1 inside, falling linearly to 0 one voxel further).
CLICK_RADIUS = 2.0


@dataclass(frozen=True)
class CropBox:
    """A box of the volume grid: ``start`` (inclusive) and ``stop`` (exclusive) voxel indices along K, J, I."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.start, self.stop))

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def to_patch(self, kji: Sequence[float], patch: int) -> np.ndarray:
        """Volume voxel indices (k, j, i) -> continuous patch voxel indices (voxel centres, as
        ``F.interpolate(..., align_corners=False)`` maps them)."""
        offset = np.asarray(kji, dtype=float) - np.asarray(self.start, dtype=float)
        return (offset + 0.5) * patch / np.asarray(self.shape, dtype=float) - 0.5


def crop_for(prior: np.ndarray, clicks: Sequence[Click], shape: Sequence[int], spacing: Sequence[float], *,
             margin: float = 0.25, min_margin_mm: float = 10.0, min_side_mm: float = 40.0,
             empty_side_mm: float = 80.0, max_aspect: float = 2.0) -> CropBox:
    """The box a refinement works in.

    Around the prior and the include clicks: their bounding box grown on each side by ``margin`` of its size
    (at least ``min_margin_mm``), each side at least ``min_side_mm`` and at least 1 / ``max_aspect`` of the
    longest side (so the patch is not stretched much more along one axis than another). With an empty prior, a
    cube of ``empty_side_mm`` around the include clicks. A box that runs out of the volume is shifted back
    inside, then clipped. Raises ``ValueError`` when there is nothing to crop around (empty prior, no include).
    """
    size_kji = np.asarray(spacing, dtype=float)[::-1]
    includes = np.array([c[:3] for c in clicks if c[3]], dtype=float).reshape(-1, 3)
    if prior.any():
        nonzero = [np.flatnonzero(prior.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        low = np.array([n[0] for n in nonzero], dtype=float)
        high = np.array([n[-1] for n in nonzero], dtype=float)
        if len(includes):
            low, high = np.minimum(low, includes.min(0)), np.maximum(high, includes.max(0))
        extent_mm = (high - low + 1) * size_kji
        side_mm = extent_mm + 2 * np.maximum(margin * extent_mm, min_margin_mm)
        side_mm = np.maximum(side_mm, min_side_mm)
        side_mm = np.maximum(side_mm, side_mm.max() / max_aspect)
    elif len(includes):
        low, high = includes.min(0), includes.max(0)
        extent_mm = (high - low + 1) * size_kji
        side_mm = np.maximum(extent_mm + 2 * min_margin_mm, empty_side_mm)
    else:
        raise ValueError("nothing to refine: the mask is empty and there is no include click")
    count = np.ceil(side_mm / size_kji - 1e-6).astype(int)
    start = np.floor((low + high) / 2 - (count - 1) / 2 + 0.5).astype(int)
    stop = start + count
    shape = np.asarray(shape, dtype=int)
    for axis in range(3):  # shift back inside, then clip
        if start[axis] < 0:
            stop[axis] -= start[axis]
            start[axis] = 0
        if stop[axis] > shape[axis]:
            start[axis] -= stop[axis] - shape[axis]
            stop[axis] = shape[axis]
    start, stop = np.maximum(start, 0), np.minimum(stop, shape)
    stop = np.maximum(stop, start + 1)
    return CropBox(tuple(int(v) for v in start), tuple(int(v) for v in stop))


def _resample(array: torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """A (D, H, W) float tensor resized to ``size`` (voxel centres aligned, as :meth:`CropBox.to_patch`)."""
    if tuple(array.shape) == tuple(size):
        return array
    return F.interpolate(array[None, None], size=tuple(int(s) for s in size), mode=mode,
                         align_corners=False)[0, 0]


def resample_mask(mask: np.ndarray, crop: CropBox, patch: int) -> torch.Tensor:
    """The mask's box as a (P, P, P) float tensor in [0, 1] (trilinear: partial voxels are fractions)."""
    box = torch.from_numpy(np.ascontiguousarray(mask[crop.slices()], dtype=np.float32))
    return _resample(box, (patch,) * 3)


def click_maps(clicks: Sequence[Click], crop: CropBox, patch: int,
               radius: float = CLICK_RADIUS) -> torch.Tensor:
    """(2, P, P, P): include and exclude maps, a ball of ``radius`` patch voxels at each click inside the box
    (1 inside, falling linearly to 0 one voxel further); clicks outside the box are left out."""
    maps = torch.zeros(2, patch, patch, patch)
    grid = torch.arange(patch, dtype=torch.float32)
    for click in clicks:
        position = crop.to_patch(click[:3], patch)
        if np.any(position < -0.5) or np.any(position > patch - 0.5):
            continue
        dk, dj, di = ((grid - float(p)) ** 2 for p in position)
        distance = torch.sqrt(dk[:, None, None] + dj[None, :, None] + di[None, None, :])
        ball = (radius + 1 - distance).clamp(0, 1)
        channel = 0 if click[3] else 1
        maps[channel] = torch.maximum(maps[channel], ball)
    return maps


def standardise(patch: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation within the patch (clipped to +-5): windowing and scanner scale drop
    out, only contrast within the crop is left."""
    centred = patch - patch.mean()
    return (centred / (centred.std() + 1e-3)).clamp(-5, 5)


def inputs(image: np.ndarray, prior: np.ndarray, clicks: Sequence[Click], crop: CropBox,
           patch: int) -> torch.Tensor:
    """The network's input (4, P, P, P): image, prior, include map, exclude map. ``image`` is KJI float (a
    [0, 1] window), ``prior`` KJI bool."""
    box = torch.from_numpy(np.ascontiguousarray(image[crop.slices()], dtype=np.float32))
    channels = [standardise(_resample(box, (patch,) * 3)), resample_mask(prior, crop, patch)]
    return torch.cat([torch.stack(channels), click_maps(clicks, crop, patch)])


def paste(logits: Union[torch.Tensor, np.ndarray], crop: CropBox, shape: Sequence[int],
          threshold: float = 0.0) -> np.ndarray:
    """Patch logits (P, P, P) resampled back onto the box (trilinear), thresholded, on the full KJI grid
    (background outside the box)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    mask[crop.slices()] = (_resample(logits, crop.shape) > threshold).numpy()
    return mask


def refine(model: RefinementModel3D, image: np.ndarray, prior: np.ndarray, clicks: Sequence[Click],
           spacing: Sequence[float], device: Optional[Union[str, torch.device]] = None, **crop_options) -> np.ndarray:
    """A refined KJI bool mask of the whole grid from the prior and the clicks (an empty prior and no include
    click give an empty mask). ``crop_options`` go to :func:`crop_for`."""
    prior = np.asarray(prior, dtype=bool)
    if not prior.any() and not any(c[3] for c in clicks):
        return np.zeros(prior.shape, dtype=bool)
    if device is None:
        parameters = getattr(model, "parameters", None)
        device = next(parameters()).device if parameters is not None else torch.device("cpu")
    crop = crop_for(prior, clicks, image.shape, spacing, **crop_options)
    x = inputs(image, prior, clicks, crop, model.patch_size)[None].to(device)
    with torch.inference_mode():
        logits = model(x)[0, 0].float().cpu()
    return paste(logits, crop, image.shape)
