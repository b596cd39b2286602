"""Slices of KJI volumes, 2D resizing to a model's square input and back, resampling, bounding boxes.

Axes are named by IJK index: 0 = I ("sagittal"), 1 = J ("coronal"), 2 = K ("axial"); the names assume an
image acquired roughly along the patient axes. A slice perpendicular to one axis is returned as a 2D
(row, col) array whose rows run along the larger remaining IJK axis and columns along the smaller one:

- axis 2 (K): ``array[k]`` -> (J, I)
- axis 1 (J): ``array[:, j, :]`` -> (K, I)
- axis 0 (I): ``array[:, :, i]`` -> (K, J)

No flips are applied: orienting a slice for display is the viewer's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume
from FMSegCore.options import AXIS_INDEX
from FMSegCore.prompts import in_plane

#: Slicing directions by name: the anatomical axis (L-R, A-P, S-I) slices are across (FMSegCore.options').
AXIS_NAMES = AXIS_INDEX
Axis = Union[int, str]
Box2D = tuple[tuple[int, int], tuple[int, int]]


def axis_index(axis: Axis) -> int:
    """IJK axis number (0, 1, 2) of an axis given by number or by name (sagittal, coronal, axial)."""
    if isinstance(axis, str):
        if axis.lower() not in AXIS_NAMES:
            raise InputError(None, f"unknown axis {axis!r} (use 0, 1, 2 or {', '.join(AXIS_NAMES)})")
        return AXIS_NAMES[axis.lower()]
    if axis not in (0, 1, 2):
        raise InputError(None, f"axis must be 0 (I), 1 (J) or 2 (K), got {axis!r}")
    return int(axis)


def in_plane_axes(axis: Axis) -> tuple[int, int]:
    """The IJK axes along the rows and the columns of a slice perpendicular to ``axis`` (by name or index; the
    rule is :func:`FMSegCore.prompts.in_plane`'s)."""
    return in_plane(axis_index(axis))


def _index(axis: Axis, index: int) -> tuple:
    """Index expression into a KJI array selecting one slice perpendicular to the IJK ``axis``."""
    selection: list = [slice(None)] * 3
    selection[2 - axis_index(axis)] = index
    return tuple(selection)


def get_slice(array: np.ndarray, axis: Axis, index: int) -> np.ndarray:
    """The 2D (row, col) slice of a KJI array at ``index`` along the IJK ``axis`` (a view, not a copy)."""
    size = array.shape[2 - axis_index(axis)]
    if not 0 <= index < size:
        raise IndexError(f"slice {index} is outside 0..{size - 1} along axis {axis}")
    return array[_index(axis, index)]


def put_slice(array: np.ndarray, axis: Axis, index: int, image: np.ndarray) -> np.ndarray:
    """Write a 2D (row, col) slice back into a KJI array in place (the inverse of :func:`get_slice`)."""
    target = get_slice(array, axis, index)
    if target.shape != np.shape(image):
        raise ValueError(f"slice shape {np.shape(image)} does not fit {target.shape} along axis {axis}")
    array[_index(axis, index)] = image
    return array


# ----------------------------------------------------------------------------------------------- 2D resizing


def resize_2d(image: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize a (H, W) or (C, H, W) array to ``size`` = (rows, cols) with ``F.interpolate``.

    ``mode="bilinear"`` for images (float32 result), ``"nearest"`` for masks (dtype kept; PyTorch's
    ``nearest-exact``, which samples pixel centres, so enlarging then shrinking back restores a mask exactly),
    ``"antialias"``: bilinear that averages when shrinking (images and soft masks, float32 result).
    """
    if mode not in ("bilinear", "nearest", "antialias"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'antialias', got {mode!r}")
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a (H, W) or (C, H, W) array, got shape {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    batch = tensor.reshape((1, -1) + tensor.shape[-2:])
    if mode in ("bilinear", "antialias"):
        out = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False,
                            antialias=mode == "antialias")
        return out.reshape(array.shape[:-2] + tuple(size)).numpy()
    out = F.interpolate(batch, size=tuple(size), mode="nearest-exact")
    return out.reshape(array.shape[:-2] + tuple(size)).numpy().astype(array.dtype)


def pad_to_square(image: np.ndarray, value: float = 0) -> np.ndarray:
    """Pad the last two axes at the bottom and right to a square of the larger side."""
    array = np.asarray(image)
    rows, cols = array.shape[-2:]
    side = max(rows, cols)
    padding = [(0, 0)] * (array.ndim - 2) + [(0, side - rows), (0, side - cols)]
    return np.pad(array, padding, constant_values=value)


@dataclass(frozen=True)
class SquareFit:
    """How a slice was fitted into a square model input: scaled so its longer side is ``size``, then padded."""

    original_shape: tuple[int, int]
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.original_shape)

    @property
    def scaled_shape(self) -> tuple[int, int]:
        return tuple(max(1, int(round(n * self.scale))) for n in self.original_shape)  # type: ignore[return-value]

    def to_square(self, points_rc: np.ndarray) -> np.ndarray:
        """(row, col) positions (pixel centres at whole numbers) mapped into the square input."""
        factors = np.asarray(self.scaled_shape, dtype=float) / np.asarray(self.original_shape)
        return (np.asarray(points_rc, dtype=float) + 0.5) * factors - 0.5


def fit_square(image: np.ndarray, size: int, mode: str = "bilinear", value: float = 0) -> tuple[np.ndarray, SquareFit]:
    """Resize so the longer side is ``size`` (aspect kept), then pad bottom/right to ``size`` x ``size``."""
    fit = SquareFit(tuple(np.shape(image)[-2:]), int(size))
    return pad_to_square(resize_2d(image, fit.scaled_shape, mode), value), fit


def unfit_square(image: np.ndarray, fit: SquareFit, mode: str = "nearest") -> np.ndarray:
    """Inverse of :func:`fit_square`: crop the padding and resize back to the original shape."""
    rows, cols = fit.scaled_shape
    return resize_2d(np.asarray(image)[..., :rows, :cols], fit.original_shape, mode)


# ----------------------------------------------------------------------------------------------- resampling


def resample_volume(volume: Volume, spacing: tuple[float, float, float], interpolation: str = "linear") -> Volume:
    """Resample onto a grid with new ``spacing`` (I, J, K order) covering the same extent; origin and
    direction kept. ``"linear"`` for images (float32 result), ``"nearest"`` for label maps (dtype kept)."""
    import SimpleITK as sitk  # imported when used: the rest works without it
    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in interpolators:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    new_spacing = np.asarray(spacing, dtype=float)
    if new_spacing.shape != (3,) or np.any(new_spacing <= 0):
        raise InputError(volume.path, f"spacing must be three positive numbers, got {spacing}")
    size = np.maximum(1, np.round(np.asarray(volume.shape_ijk) * np.asarray(volume.spacing) / new_spacing))
    image = volume.to_sitk()
    pixel = sitk.sitkFloat32 if interpolation == "linear" else image.GetPixelID()
    resampled = sitk.Resample(
        sitk.Cast(image, pixel), [int(n) for n in size], sitk.Transform(), interpolators[interpolation],
        image.GetOrigin(), [float(s) for s in new_spacing], image.GetDirection(), 0, pixel, True,
    )
    return Volume.from_sitk(resampled, path=volume.path)


# -------------------------------------------------------------------------------------------- bounding boxes


def _bounding_box(mask: np.ndarray, ndim: int) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    mask = np.asarray(mask)
    if mask.ndim != ndim:
        raise ValueError(f"expected a {ndim}D mask, got shape {mask.shape}")
    found = np.argwhere(mask)
    if found.size == 0:
        return None
    return tuple(int(v) for v in found.min(axis=0)), tuple(int(v) for v in found.max(axis=0))


def bounding_box_2d(mask: np.ndarray) -> Optional[Box2D]:
    """((row_min, col_min), (row_max, col_max)) of the nonzero pixels, inclusive; None for an empty mask."""
    return _bounding_box(mask, 2)  # type: ignore[return-value]


def mask_box_rc(mask: np.ndarray) -> Optional[tuple[float, float, float, float]]:
    """(row0, col0, row1, col1) of a slice mask's nonzero pixels, inclusive; None for an empty mask."""
    box = bounding_box_2d(mask)
    return None if box is None else (float(box[0][0]), float(box[0][1]), float(box[1][0]), float(box[1][1]))


def bounding_box_3d(mask: np.ndarray) -> Optional[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """((k_min, j_min, i_min), (k_max, j_max, i_max)) of the nonzero voxels of a KJI mask, inclusive
    (array axis order); None for an empty mask."""
    return _bounding_box(mask, 3)  # type: ignore[return-value]
