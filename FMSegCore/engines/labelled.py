"""The one labelled-case type: an adaptation's training case and an in-context support example alike.

A normalised image (a 2-D slice or a 3-D KJI volume) with its integer label map on the same grid, the names of
its labels, where it came from and, when known, its geometry: what training reads slice by slice and what
in-context segmentation takes its support slices from. (``adaptation.cases`` and ``incontext.support`` read
them, each with its own rules for label names.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.preprocessing.slicing import get_slice, in_plane_axes


@dataclass
class LabelledCase:
    """One labelled case: normalised image in [0, 1] and labels (KJI arrays, or 2-D), with their names."""

    image: np.ndarray
    labels: np.ndarray
    segments: list[SegmentInfo]
    source: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # i, j, k (mm)
    axis: int = 2  # the ijk axis slices are taken across
    digest: str = ""
    modality: str = "CT"  # how the image was normalised (CT window or MR percentiles)
    #: the volume's direction matrix (columns: I, J, K in LPS); None: unknown (a 2-D case, or arrays only)
    direction: Optional[np.ndarray] = None

    @property
    def is_volume(self) -> bool:
        return self.image.ndim == 3

    def value_of(self, name: str) -> Optional[int]:
        """The label value this case gives the structure ``name`` (None: not in its label set)."""
        for segment in self.segments:
            if segment.name.lower() == name.lower():
                return segment.value
        return None

    def annotated_slices(self) -> list[int]:
        """Indices of slices with at least one labelled pixel (a 2-D case: [0])."""
        if self.labels.ndim == 2:
            return [0]
        return [index for index in range(self.labels.shape[2 - self.axis])
                if np.any(get_slice(self.labels, self.axis, index))]

    def slice(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, labels) of one slice."""
        if self.image.ndim == 2:
            return self.image, self.labels
        return get_slice(self.image, self.axis, index), get_slice(self.labels, self.axis, index)

    def spacing_rc(self) -> tuple[float, float]:
        """In-plane pixel spacing (rows, cols) of the slices."""
        if self.image.ndim == 2:
            return (float(self.spacing[1]), float(self.spacing[0]))
        rows, cols = in_plane_axes(self.axis)
        return (float(self.spacing[rows]), float(self.spacing[cols]))
