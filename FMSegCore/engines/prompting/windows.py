"""Square windows of a slice that a 2D model sees: the whole slice, or a crop around a box (square in mm).

A window is a rectangle of the slice in pixel coordinates (row, col), square in millimetres, resampled to the
model's ``size`` x ``size`` input. Boxes and points map into the window; logits map back onto the slice.
Pixel centres sit on whole numbers; the window covers ``[row0 - 0.5, row0 + rows - 0.5]`` and likewise in col.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SliceWindow:
    """A rectangle of a slice (pixel units, may reach outside it) resampled to ``size`` x ``size``."""

    row0: float
    col0: float
    rows: float
    cols: float
    size: int

    @property
    def key(self) -> tuple[float, float, float, float, int]:
        return (self.row0, self.col0, self.rows, self.cols, self.size)

    def to_window(self, rc: np.ndarray) -> np.ndarray:
        """Slice (row, col) coordinates -> window pixel coordinates (x, y) in [0, size)."""
        rc = np.atleast_2d(np.asarray(rc, dtype=float))
        y = (rc[:, 0] - self.row0 + 0.5) * self.size / self.rows - 0.5
        x = (rc[:, 1] - self.col0 + 0.5) * self.size / self.cols - 0.5
        return np.stack([x, y], axis=1)

    def box_to_window(self, box_rc: tuple[float, float, float, float]) -> np.ndarray:
        """A box (row0, col0, row1, col1) in slice pixels -> (x0, y0, x1, y1) in window pixels."""
        corners = self.to_window(np.array([[box_rc[0], box_rc[1]], [box_rc[2], box_rc[3]]]))
        return np.clip(corners.reshape(-1), 0, self.size - 1)


def _ladder(value: float, steps_per_octave: int = 4) -> float:
    """Round a positive size up to a geometric ladder, so that nearby boxes share windows (and embeddings)."""
    return 2 ** (math.ceil(math.log2(max(value, 1e-6)) * steps_per_octave) / steps_per_octave)


def full_window(shape: tuple[int, int], spacing_rc: tuple[float, float], size: int) -> SliceWindow:
    """The whole slice, padded to a square in millimetres (MedSAM's whole-image convention)."""
    height_mm, width_mm = shape[0] * spacing_rc[0], shape[1] * spacing_rc[1]
    side_mm = max(height_mm, width_mm)
    return SliceWindow(0.0, 0.0, side_mm / spacing_rc[0], side_mm / spacing_rc[1], size)


def box_window(box_rc: tuple[float, float, float, float], shape: tuple[int, int], spacing_rc: tuple[float, float],
               size: int, context: float = 2.0, min_side_mm: float = 48.0) -> SliceWindow:
    """A square crop (in mm) of ``context`` times the box's larger side, centred on the box.

    Side and centre are snapped to coarse steps so that nearby boxes (propagation, corrective clicks) reuse
    the same window and its cached embedding. The crop never exceeds the whole-slice window.
    """
    r0, c0, r1, c1 = box_rc
    side_mm = context * max((r1 - r0 + 1) * spacing_rc[0], (c1 - c0 + 1) * spacing_rc[1])
    whole = max(shape[0] * spacing_rc[0], shape[1] * spacing_rc[1])
    side_mm = min(_ladder(max(side_mm, min_side_mm)), whole)
    rows, cols = side_mm / spacing_rc[0], side_mm / spacing_rc[1]
    step_r, step_c = max(rows / 8, 1.0), max(cols / 8, 1.0)
    centre_r = round(((r0 + r1) / 2) / step_r) * step_r
    centre_c = round(((c0 + c1) / 2) / step_c) * step_c
    return SliceWindow(centre_r - rows / 2 + 0.5, centre_c - cols / 2 + 0.5, rows, cols, size)


def _affine(window: SliceWindow, shape: tuple[int, int]) -> torch.Tensor:
    """The affine grid (normalised, align_corners=False) sampling ``window`` from a slice of ``shape``."""
    height, width = shape
    scale_x = window.cols / width
    scale_y = window.rows / height
    # Window pixel u sits at slice column col0 - 0.5 + (u + 0.5) * cols / size; in normalised coordinates:
    shift_x = (2 * window.col0 + window.cols) / width - 1
    shift_y = (2 * window.row0 + window.rows) / height - 1
    return torch.tensor([[scale_x, 0.0, shift_x], [0.0, scale_y, shift_y]], dtype=torch.float32)


def extract(image: np.ndarray, window: SliceWindow) -> torch.Tensor:
    """Resample the window of a 2D slice to (size, size), bilinear, zero outside the slice."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    grid = F.affine_grid(_affine(window, image.shape)[None], [1, 1, window.size, window.size], align_corners=False)
    return F.grid_sample(tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]


def paste(logits: torch.Tensor, window: SliceWindow, shape: tuple[int, int], fill: float = -20.0) -> torch.Tensor:
    """Map (size, size) logits of a window back onto a slice of ``shape`` (bilinear; ``fill`` outside it)."""
    height, width = shape
    rows = (torch.arange(height, dtype=torch.float32) - window.row0 + 0.5) / window.rows * 2 - 1
    cols = (torch.arange(width, dtype=torch.float32) - window.col0 + 0.5) / window.cols * 2 - 1
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[None]
    sampled = F.grid_sample(logits.float()[None, None].cpu() - fill, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return sampled[0, 0] + fill
