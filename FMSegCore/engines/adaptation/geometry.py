"""Physical units for automatic adapters: slices in one anatomical orientation, at one pixel size, seen through
windows of one physical side, so an adapter trained on one scan reads another scan's slices at the same scale.

- Orientation: a volume's arrays are permuted and flipped (exactly invertible) so that I runs toward the
  patient's left, J toward posterior, K toward superior (LPS, from the direction matrix; oblique volumes go to
  the nearest such orientation). Axial slices then always show anterior at the top and the patient's right on
  the left, whatever the file's RAS/LAS/LPS storage.
- Scale: each slice is resampled (antialiased) to ``pixel_mm``; a window is ``size`` pixels, so
  ``size * pixel_mm`` millimetres. A slice smaller than that is padded; a larger one is tiled with overlap and
  the tiles' probabilities averaged.
- Region: only the body's in-plane bounding box (over the whole volume, plus a margin) is tiled, so a wide
  field of view full of air costs no extra windows.

Adapters record these settings in their metadata (``geometry``); adapters without it predate physical units and
keep the old whole-slice windows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from FMSegCore.engines.adaptation.cases import TrainingCase
from FMSegCore.engines.prompting.windows import SliceWindow
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.preprocessing.slicing import resize_2d

#: Normalised intensity above which a voxel counts as body (CT abdomen window: about -140 HU).
BODY_THRESHOLD = 0.05


@dataclass(frozen=True)
class SliceGeometry:
    """How an adapter sees slices: pixel size (mm), window size (pixels), tile overlap, orientation."""

    pixel_mm: float = 1.5
    size: int = 256
    overlap: float = 0.25
    #: "LPS": volumes are reoriented (I to the left, J posterior, K superior); "stored": as in the file
    orientation: str = "LPS"
    margin_mm: float = 10.0

    @property
    def window_mm(self) -> float:
        return self.pixel_mm * self.size

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"window_mm": self.window_mm}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Optional[SliceGeometry]:
        """The geometry an adapter was trained with; None for adapters from before physical units."""
        stored = metadata.get("geometry")
        if not isinstance(stored, dict):
            return None
        return cls(float(stored["pixel_mm"]), int(stored["size"]), float(stored.get("overlap", 0.25)),
                   str(stored.get("orientation", "LPS")), float(stored.get("margin_mm", 10.0)))


# ------------------------------------------------------------------------------------------------ orientation


@dataclass(frozen=True)
class Reorientation:
    """Permutation and flips taking a KJI array to canonical (LPS) KJI order, and back."""

    ijk_of: tuple[int, int, int]  # the stored IJK axis that becomes canonical I (L-R), J (A-P), K (S-I)
    flips: tuple[bool, bool, bool]  # whether that axis is reversed (it pointed right, anterior or inferior)

    @classmethod
    def of(cls, direction: np.ndarray) -> Reorientation:
        direction = np.asarray(direction, dtype=float)
        axes = anatomical_axes(direction)
        return cls(axes, tuple(bool(direction[row, axes[row]] < 0) for row in range(3)))

    def _kji_order(self) -> tuple[int, int, int]:
        # canonical KJI array axis n holds canonical IJK axis 2 - n, i.e. stored IJK axis ijk_of[2 - n],
        # which is stored array axis 2 - ijk_of[2 - n]
        return tuple(2 - self.ijk_of[2 - n] for n in range(3))  # type: ignore[return-value]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A stored KJI array in canonical KJI order (a view where possible)."""
        out = np.transpose(array, self._kji_order())
        flip_axes = tuple(2 - row for row in range(3) if self.flips[row])
        return np.flip(out, flip_axes) if flip_axes else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """A canonical KJI array back in the stored order."""
        flip_axes = tuple(2 - row for row in range(3) if self.flips[row])
        out = np.flip(array, flip_axes) if flip_axes else array
        return np.transpose(out, np.argsort(self._kji_order()))

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Voxel spacing (I, J, K) in canonical order."""
        return tuple(float(spacing[axis]) for axis in self.ijk_of)  # type: ignore[return-value]

    def axis(self, stored_axis: int) -> int:
        """The canonical IJK axis of a stored IJK axis."""
        return self.ijk_of.index(stored_axis)


def canonical_case(case: TrainingCase) -> TrainingCase:
    """A 3-D case with a known direction in canonical (LPS) order; other cases unchanged."""
    if case.direction is None or case.image.ndim != 3:
        return case
    turn = Reorientation.of(case.direction)
    return dataclasses.replace(case, image=np.ascontiguousarray(turn.apply(case.image)),
                               labels=np.ascontiguousarray(turn.apply(case.labels)), spacing=turn.spacing(case.spacing),
                               axis=turn.axis(case.axis), direction=np.eye(3))


# ------------------------------------------------------------------------------------------------ scale and tiles


def body_region(image: np.ndarray, axis: int, spacing_rc: tuple[float, float], margin_mm: float,
                threshold: float = BODY_THRESHOLD) -> tuple[slice, slice]:
    """The in-plane (rows, cols) bounding box of the body over all slices of a normalised volume, plus margin."""
    projection = np.any(image > threshold, axis=2 - axis) if image.ndim == 3 else image > threshold
    rows, cols = projection.shape
    if not projection.any():
        return slice(0, rows), slice(0, cols)
    found_r, found_c = np.flatnonzero(projection.any(axis=1)), np.flatnonzero(projection.any(axis=0))
    margin_r, margin_c = int(math.ceil(margin_mm / spacing_rc[0])), int(math.ceil(margin_mm / spacing_rc[1]))
    return (slice(max(0, found_r[0] - margin_r), min(rows, found_r[-1] + margin_r + 1)),
            slice(max(0, found_c[0] - margin_c), min(cols, found_c[-1] + margin_c + 1)))


def resampled_shape(shape: tuple[int, int], spacing_rc: tuple[float, float], pixel_mm: float) -> tuple[int, int]:
    """The (rows, cols) of a slice resampled to ``pixel_mm``."""
    return (max(1, int(round(shape[0] * spacing_rc[0] / pixel_mm))),
            max(1, int(round(shape[1] * spacing_rc[1] / pixel_mm))))


def to_pixel_size(image: np.ndarray, spacing_rc: tuple[float, float], pixel_mm: float,
                  mode: str = "antialias") -> np.ndarray:
    """A (rows, cols) or (C, rows, cols) slice resampled to ``pixel_mm`` (antialiased when shrinking)."""
    shape = resampled_shape(image.shape[-2:], spacing_rc, pixel_mm)
    return resize_2d(image, shape, mode) if shape != tuple(image.shape[-2:]) else np.asarray(image, np.float32)


def _starts(length: int, size: int, overlap: float) -> list[int]:
    """Window starts (whole pixels) along one axis: one centred window when it fits, else evenly spread
    windows overlapping by at least ``overlap``."""
    if length <= size:
        return [int(math.floor((length - size) / 2.0))]
    count = int(math.ceil((length - size) / (size * (1.0 - overlap)))) + 1
    return [int(round(v)) for v in np.linspace(0, length - size, count)]


def tile_windows(shape: tuple[int, int], geometry: SliceGeometry) -> list[SliceWindow]:
    """Windows of ``geometry.size`` pixels covering a slice already at the geometry's pixel size."""
    size = geometry.size
    return [SliceWindow(r, c, float(size), float(size), size)
            for r in _starts(shape[0], size, geometry.overlap) for c in _starts(shape[1], size, geometry.overlap)]
