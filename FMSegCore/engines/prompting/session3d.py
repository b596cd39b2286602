"""A promptable session for 3-D models (:class:`~FMSegCore.models.interfaces.PromptableModel3D`): each segment
is decoded in one 3-D crop around its prompts, at the model's spacing, and pasted back onto the volume grid.

The crop is centred on the segment's boxes (their union), else on its include points; it follows the volume's
own index axes, resampled to the model's spacing. A box larger than the crop is tiled: overlapping crops cover
it, each decoded with the part of the box inside it and the points inside it, and their masks are joined.
Crop embeddings are cached, so corrective clicks re-run only the decoder; a segment prompted again with more
points than before (same crop) also gets its previous logits as a mask prompt, SAM-Med3D's iterative
refinement. Scribbles and lassos are given as include (or exclude)
points sampled along them (they need not lie on one slice).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from FMSegCore.engines.prompting.embedding_cache import EmbeddingCache, SharedBudget
from FMSegCore.engines.prompting.session import Timings
from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume
from FMSegCore.models.interfaces import PromptableModel3D, PromptBatch3D
from FMSegCore.progress import Progress, ProgressCallback
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts

#: Curves become points about this many mm apart along them, at most this many per curve.
CURVE_STEP_MM = 5.0
CURVE_POINTS = 12

#: Logit given to volume voxels outside the crop when the crop's logits are pasted back.
_OUTSIDE = -1e4
#: A box is tiled when it spans more than this share of the crop along an axis; tiles cover this share each
#: (the rest is context around the structure, and the tiles' overlap).
TILE_FILL = 0.8


@dataclass(frozen=True)
class Crop:
    """A crop of the volume: its centre (continuous IJK), its voxel count (K, J, I) and its spacing (I, J, K)."""

    centre: tuple[float, float, float]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def scale(self, volume_spacing: Sequence[float]) -> np.ndarray:
        """Volume voxels per crop voxel along I, J, K."""
        return np.asarray(self.spacing) / np.asarray(volume_spacing, dtype=float)

    def half(self) -> np.ndarray:
        """The crop's half extent in crop voxels along I, J, K (from the first to the last voxel centre)."""
        return (np.asarray(self.shape[::-1], dtype=float) - 1.0) / 2.0

    def to_crop(self, ijk: np.ndarray, volume_spacing: Sequence[float]) -> np.ndarray:
        """Volume IJK (..., 3) -> crop IJK."""
        return (np.asarray(ijk, dtype=float) - self.centre) / self.scale(volume_spacing) + self.half()

    def to_volume(self, ijk: np.ndarray, volume_spacing: Sequence[float]) -> np.ndarray:
        """Crop IJK (..., 3) -> volume IJK."""
        return (np.asarray(ijk, dtype=float) - self.half()) * self.scale(volume_spacing) + self.centre


class PromptSession3D:
    """Holds a volume and a promptable 3-D model; segments named structures from boxes and points in 3-D."""

    def __init__(self, volume: Volume, model: PromptableModel3D, device: torch.device | str | None = None, *,
                 cache_bytes: int = 2 << 30, autocast_dtype: Optional[torch.dtype] = None,
                 budget: Optional[SharedBudget] = None) -> None:
        self.volume = volume
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.cache = EmbeddingCache(cache_bytes, budget)
        self.timings = Timings()
        self.results: dict[str, np.ndarray] = {}
        self._intensities = volume.array.astype(np.float32, copy=False)
        self._last: dict[str, list[tuple[Crop, tuple, torch.Tensor]]] = {}

    # ------------------------------------------------------------------ geometry
    def crop_for(self, prompts: SegmentPrompts) -> Crop:
        """The crop a segment's prompts are decoded in."""
        if prompts.boxes:
            centre = np.mean(prompts.box_bounds(), axis=0)
        else:
            centre = np.mean([point.ijk for point in prompts.include_points], axis=0)
        spacing = self.model.crop_spacing_mm or tuple(float(s) for s in self.volume.spacing)
        return Crop(tuple(float(round(c, 3)) for c in centre), tuple(self.model.crop_shape),
                    tuple(float(s) for s in spacing))

    def tiles_for(self, prompts: SegmentPrompts) -> list[tuple[Crop, SegmentPrompts]]:
        """The crops a segment is decoded in, each with its prompts: one crop (:meth:`crop_for`), or, for boxes
        spanning more than :data:`TILE_FILL` of the crop along an axis, a grid of overlapping crops over the box,
        each with the box clipped to its share and the points that fall inside it."""
        crop = self.crop_for(prompts)
        if not prompts.boxes:
            return [(crop, prompts)]
        lo, hi = (np.asarray(corner, dtype=float) for corner in prompts.box_bounds())
        share = crop.half() * crop.scale(self.volume.spacing) * 2.0 * TILE_FILL  # volume voxels per tile, I J K
        counts = np.maximum(np.ceil((hi - lo) / share - 1e-9), 1).astype(int)
        if np.all(counts == 1):
            return [(crop, prompts)]
        axes = [np.linspace(lo[a] + share[a] / 2, hi[a] - share[a] / 2, counts[a]) if counts[a] > 1
                else np.array([(lo[a] + hi[a]) / 2]) for a in range(3)]
        reach = crop.half() * crop.scale(self.volume.spacing)
        tiles = []
        for centre in (np.array(c) for c in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)):
            tile = Crop(tuple(float(round(c, 3)) for c in centre), crop.shape, crop.spacing)
            low, high = np.maximum(lo, centre - share / 2), np.minimum(hi, centre + share / 2)
            boxes = [BoxPrompt(tuple(float(v) for v in low), tuple(float(v) for v in high))]
            points = [p for p in prompts.points if np.all(np.abs(np.asarray(p.ijk) - centre) <= reach)]
            tiles.append((tile, SegmentPrompts(prompts.name, boxes, points, prompts.color)))
        return tiles

    def _crop_coordinates(self, crop: Crop) -> np.ndarray:
        """Volume KJI coordinates (3, K, J, I) of every crop voxel centre."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in crop.shape), indexing="ij")
        ijk = crop.to_volume(np.stack([i, j, k], axis=-1), self.volume.spacing)
        return np.moveaxis(ijk[..., ::-1], -1, 0)

    def extract(self, crop: Crop) -> np.ndarray:
        """The crop's raw intensities (K, J, I), linearly interpolated (edge values beyond the volume)."""
        return ndimage.map_coordinates(self._intensities, self._crop_coordinates(crop), order=1, mode="nearest")

    def paste(self, crop: Crop, logits: np.ndarray) -> np.ndarray:
        """Crop logits (K, J, I) -> a boolean KJI mask on the volume grid (nothing outside the crop)."""
        shape = self.volume.array.shape
        reach = crop.half() * crop.scale(self.volume.spacing)
        low = np.maximum(np.floor(np.asarray(crop.centre) - reach), 0).astype(int)
        high = np.minimum(np.ceil(np.asarray(crop.centre) + reach), np.asarray(shape[::-1]) - 1).astype(int)
        mask = np.zeros(shape, dtype=bool)
        if np.any(high < low):
            return mask
        k, j, i = np.meshgrid(*(np.arange(low[a], high[a] + 1, dtype=float) for a in (2, 1, 0)), indexing="ij")
        inside = crop.to_crop(np.stack([i, j, k], axis=-1), self.volume.spacing)
        values = ndimage.map_coordinates(logits, np.moveaxis(inside[..., ::-1], -1, 0), order=1, mode="constant",
                                         cval=_OUTSIDE)
        mask[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1] = values > 0
        return mask

    # ------------------------------------------------------------------ model calls
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def embedding(self, crop: Crop) -> torch.Tensor:
        """The crop's embedding, encoded once and cached."""
        key = ("3d", crop)
        if key not in self.cache:
            batch = self.model.preprocess(self.extract(crop))[None].to(self.device)
            began = time.perf_counter()
            with torch.inference_mode(), self._autocast():
                embedding = self.model.encode(batch)[0]
            self.timings.encode_seconds += time.perf_counter() - began
            self.timings.encoded += 1
            self.cache.put(key, embedding)
        return self.cache.get(key)

    def _prompt_batch(self, prompts: SegmentPrompts, crop: Crop, previous: Optional[torch.Tensor]) -> PromptBatch3D:
        spacing = self.volume.spacing
        batch = PromptBatch3D(embedding_index=torch.zeros(1, dtype=torch.long, device=self.device))
        if prompts.points:
            points = crop.to_crop(np.array([p.ijk for p in prompts.points]), spacing)
            batch.points = torch.as_tensor(points, dtype=torch.float32, device=self.device)[None]
            batch.point_labels = torch.tensor([[1 if p.include else 0 for p in prompts.points]], device=self.device)
        if prompts.boxes:
            lo, hi = (crop.to_crop(corner, spacing) for corner in prompts.box_bounds())
            batch.boxes = torch.as_tensor(np.r_[lo, hi], dtype=torch.float32, device=self.device)[None]
        batch.mask_logits = previous
        return batch

    # ------------------------------------------------------------------ segmentation
    def curve_points(self, prompts: SegmentPrompts) -> SegmentPrompts:
        """The prompts with each curve (scribble or lasso) as points sampled along it, before the clicks."""
        if not prompts.curves:
            return prompts
        sampled: list[PointPrompt] = []
        for curve in prompts.curves:
            sampled += curve.sample(self.volume.spacing, CURVE_STEP_MM, CURVE_POINTS)
        return SegmentPrompts(prompts.name, prompts.boxes, sampled + prompts.points, prompts.color)

    def segment(self, prompts: SegmentPrompts, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        """A boolean KJI mask of one structure from its prompts (the union of its tiles' masks); remembered under
        its name."""
        if prompts.is_empty():
            raise InputError(None, f"segment '{prompts.name}' has no box and no include point")
        prompts = self.curve_points(prompts)
        tiles = self.tiles_for(prompts)
        mask = np.zeros(self.volume.array.shape, dtype=bool)
        last = self._last.get(prompts.name, [])
        remembered = []
        for number, (crop, tile_prompts) in enumerate(tiles):
            if progress:
                progress(Progress(number, len(tiles), f"{prompts.name}: encoding crop {number + 1} of {len(tiles)}"))
            embedding = self.embedding(crop)
            points = tuple(tile_prompts.points)
            previous = next((logits for seen, before, logits in last if seen == crop and len(before) < len(points)
                             and points[:len(before)] == before), None)
            began = time.perf_counter()
            with torch.inference_mode(), self._autocast():
                logits, _quality = self.model.decode(embedding[None], self._prompt_batch(tile_prompts, crop, previous))
            logits = logits.float()
            self.timings.decode_seconds += time.perf_counter() - began
            self.timings.decoded += 1
            remembered.append((crop, points, logits))
            full = torch.nn.functional.interpolate(logits, size=crop.shape, mode="trilinear", align_corners=False)
            mask |= self.paste(crop, full[0, 0].cpu().numpy())
        self._last[prompts.name] = remembered
        self.results[prompts.name] = mask
        if progress:
            progress(Progress(len(tiles), len(tiles), f"{prompts.name}: done"))
        return mask

    def run(self, segments: Sequence[SegmentPrompts],
            progress: Optional[ProgressCallback] = None) -> tuple[np.ndarray, list[str]]:
        """One multi-label map (values 1..N in the order given; later segments win on overlap) and the names."""
        labels = np.zeros(self.volume.array.shape, dtype=np.uint16)
        for value, prompts in enumerate(segments, start=1):
            labels[self.segment(prompts, progress)] = value
        return labels, [s.name for s in segments]
