"""Training views in physical units: a case's slice at the adapter's pixel size, randomly placed, scaled, rotated
and changed in contrast (MONAI random transforms), as one model input with its targets.

A learner draws a fixed number of views (``views``), the same number for each structure it learns, spread over
the slices that show that structure (:func:`balanced_views`), so the cost of encoding them does not grow with
the number of labelled slices (the frozen encoder stages run once per view) and a small structure is seen as
often as a large one.
No flips: with slices in one anatomical orientation, a left-right flip would teach the left kidney as the right.
Intensity scaling and shifting are left out too: the model's input is min-max scaled per window, which undoes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from FMSegCore.engines.adaptation.cases import Structure, TrainingCase, case_targets
from FMSegCore.engines.adaptation.geometry import SliceGeometry, body_region, to_pixel_size
from FMSegCore.engines.adaptation.slice_inputs import WindowedSlice
from FMSegCore.engines.prompting.windows import SliceWindow


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random changes a training view gets (all off: the centred slice, as at inference)."""

    rotate_deg: float = 12.0
    scale: float = 0.15
    shift_px: float = 24.0
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_probability: float = 0.5
    noise_std: float = 0.03
    noise_probability: float = 0.3
    blur_probability: float = 0.2

    @classmethod
    def none(cls) -> Augmentation:
        return cls(0.0, 0.0, 0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0)


def _transforms(augmentation: Augmentation, size: int, slack: tuple[float, float], seed: int):
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandGaussianSmoothd,
    )

    a = augmentation
    shift = [s + a.shift_px for s in slack]
    chain = Compose([
        RandAffined(("image", "label"), spatial_size=(size, size), prob=1.0, rotate_range=np.deg2rad(a.rotate_deg),
                    scale_range=(a.scale, a.scale), translate_range=shift, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandAdjustContrastd("image", prob=a.gamma_probability, gamma=a.gamma),
        RandGaussianSmoothd("image", sigma_x=(0.4, 1.0), sigma_y=(0.4, 1.0), prob=a.blur_probability),
        RandGaussianNoised("image", prob=a.noise_probability, std=a.noise_std),
    ])
    chain.set_random_state(seed=seed)
    return chain


class ViewMaker:
    """Views of cases' slices in physical units (cases already in canonical orientation)."""

    def __init__(self, geometry: SliceGeometry, structures: Sequence[Structure],
                 preprocess: Callable[[np.ndarray], torch.Tensor], augmentation: Optional[Augmentation] = None,
                 seed: int = 0) -> None:
        self.geometry, self.structures, self.preprocess = geometry, list(structures), preprocess
        self.augmentation = augmentation or Augmentation()
        self.seed = seed
        self._regions: dict[int, tuple[TrainingCase, tuple[slice, slice]]] = {}

    def region(self, case: TrainingCase) -> tuple[slice, slice]:
        """The case's body region in its slices (computed once per case; the case is kept with its region, so a
        later case that gets a freed case's ``id`` is not given that case's region)."""
        kept = self._regions.get(id(case))
        if kept is None or kept[0] is not case:
            kept = (case, body_region(case.image, case.axis, case.spacing_rc(), self.geometry.margin_mm))
            self._regions[id(case)] = kept
        return kept[1]

    def view(self, case: TrainingCase, index: int, number: int) -> WindowedSlice:
        """View ``number`` of slice ``index``: model input (3, S, S), targets (K, S, S), known (K,)."""
        image, labels = case.slice(index)
        rows, cols = self.region(case)
        image, labels = image[rows, cols], labels[rows, cols]
        masks, known = case_targets(case, labels, self.structures)
        spacing = case.spacing_rc()
        image = to_pixel_size(image, spacing, self.geometry.pixel_mm)
        masks = to_pixel_size(masks.astype(np.float32), spacing, self.geometry.pixel_mm) > 0.5
        size = self.geometry.size
        slack = (max(0.0, (image.shape[0] - size) / 2), max(0.0, (image.shape[1] - size) / 2))
        chain = _transforms(self.augmentation, size, slack, self.seed * 100_003 + number)
        out = chain({"image": image[None].astype(np.float32), "label": masks.astype(np.float32)})
        pixels = np.asarray(out["image"][0], dtype=np.float32).clip(0.0, 1.0)
        targets = torch.as_tensor(np.asarray(out["label"]) > 0.5)
        window = SliceWindow(0.0, 0.0, float(size), float(size), size)
        return WindowedSlice(self.preprocess(pixels), targets, torch.from_numpy(known), window)


def spread_views(slices: Sequence[tuple[int, int]], views: int) -> list[tuple[int, int]]:
    """``views`` (case, slice) pairs spread evenly over the annotated slices (repeating them when fewer)."""
    if not slices:
        return []
    positions = (np.arange(views) + 0.5) * len(slices) / views
    return [slices[min(len(slices) - 1, int(p))] for p in positions]


def structure_slices(case: TrainingCase, structure: Structure) -> list[int]:
    """Indices of the case's slices that show ``structure`` (none when the case does not label it)."""
    value = case.value_of(structure.name)
    if value is None:
        return []
    if case.labels.ndim == 2:
        return [0] if np.any(case.labels == value) else []
    other = tuple(a for a in range(3) if a != 2 - case.axis)
    return np.flatnonzero(np.any(case.labels == value, axis=other)).tolist()


def balanced_views(cases: Sequence[TrainingCase], structures: Sequence[Structure],
                   views: int) -> list[tuple[int, int]]:
    """``views`` (case, slice) pairs, the same number for each structure, each structure's spread evenly over
    the slices that show it, interleaved: a kidney is seen as often as the liver, and slices that show none of
    the structures (a pelvis labelled for other organs) are not drawn."""
    per_structure = [slices for structure in structures
                     if (slices := [(c, i) for c, case in enumerate(cases) for i in structure_slices(case, structure)])]
    if not per_structure:
        return spread_views([(c, i) for c, case in enumerate(cases) for i in case.annotated_slices()], views)
    count = len(per_structure)
    picks = [spread_views(slices, views // count + (k < views % count)) for k, slices in enumerate(per_structure)]
    return [pick[n] for n in range(max(map(len, picks))) for pick in picks if n < len(pick)]
