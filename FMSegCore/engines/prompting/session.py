"""A promptable segmentation session: one volume, one 2D promptable model, cached embeddings, named segments.

A 2D box on one slice, or include points alone, segment a structure in 3D by propagating slice to slice
(each slice prompted with the box of its neighbour's mask) until the structure ends. A 3D ROI segments the
slices it spans the same way, starting from its middle slice and staying inside it. Boxes on several slices
each seed their own slice. Points refine the slice they lie on (include/exclude clicks), and the corrected
slice prompts its neighbours again, so a click changes the 3D result. Optionally (``planes=3``) the structure
is also propagated along the two other axes and the three planes vote. Where segments overlap, the model's
logits decide.

Image embeddings are cached per (axis, slice, window): a new prompt re-runs only the decoder unless it needs
a slice or window not yet encoded.

Curves: a scribble becomes include (or exclude) points sampled along it, applied together; an include lasso a
2D box around it on its slice, plus the filled lasso as a mask prompt where the model takes one, and the result
on that slice stays within the lasso; an exclude lasso removes what it encloses on its slice. Curves must lie
on one slice of the axis the segment is sliced along (an :class:`InputError` naming their file says so).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from FMSegCore.engines.prompting.clicks import apply_clicks, refine_with_clicks
from FMSegCore.engines.prompting.embedding_cache import EmbeddingCache, SharedBudget
from FMSegCore.engines.prompting.windows import SliceWindow, box_window, extract, full_window, paste
from FMSegCore.errors import InputError
from FMSegCore.io.volume import Volume
from FMSegCore.models.interfaces import PromptableModel2D, PromptBatch2D
from FMSegCore.preprocessing.intensity import guess_modality, normalize
from FMSegCore.preprocessing.overlap import dice
from FMSegCore.preprocessing.slicing import get_slice, in_plane_axes, mask_box_rc
from FMSegCore.progress import ProgressCallback, ProgressClock
from FMSegCore.prompts import (
    BoxPrompt,
    CurvePrompt,
    PointPrompt,
    SegmentPrompts,
    off_slice_problem,
    rasterise_curve,
    slicing_axis,
)

BoxRC = tuple[float, float, float, float]  # row0, col0, row1, col1 (inclusive pixel centres)


@dataclass
class PropagationSettings:
    """When propagation stops, and how each next slice's box is made."""

    #: stop when the predicted mask is smaller than this many mm^2
    min_area_mm2: float = 10.0
    #: with the ``auto`` CT window, the share of air (below -500 HU) in the prompted region above which the
    #: lung window is tried too (chosen on the bundled chest CT's lungs and a gas-filled copy of the stomach)
    air_fraction_for_lung_window: float = 0.2
    #: stop when the mask shrinks below this fraction of the previous slice's
    min_area_ratio: float = 0.15
    #: stop when the model's own quality estimate (predicted IoU) falls below this
    min_quality: float = 0.5
    #: margin added around the previous slice's mask box: in mm, plus a fraction of the box's size
    box_margin_mm: float = 3.0
    box_margin_ratio: float = 0.1
    #: stop when the mean intensity inside the mask drifts this many standard deviations from the seed's
    max_intensity_drift: float = 2.5
    #: sides (mm) of the candidate boxes tried around include points given without a box
    point_box_sizes_mm: tuple[float, ...] = (20.0, 40.0, 80.0, 160.0)
    #: how many slices on each side of a corrected slice are prompted again from it (0: only the clicked slice)
    click_reach_slices: int = 8
    #: an include click outside a slice's mask also tries the boxes tried around points given alone
    click_box_search: bool = True
    #: an include click's correction stops carrying where a neighbour's answer would be this many times the
    #: area of the slice it was carried from (a leak into a neighbouring structure)
    max_carried_growth: float = 1.5
    #: how many slices on each side an include click on a slice nothing reached may grow into (None: as far
    #: as the structure goes, by the stop rules). On the development CT's pancreas, 2 (FMSeg before issue 13)
    #: and None grew into the neighbouring bowel once the clicked slices next to it had been corrected
    click_growth_slices: Optional[int] = 1
    #: without a box, whether every include point seeds a propagation of its own (FMSeg before issue 13: a
    #: corrective include click started the segment again) rather than only the points on the first one's slice
    include_points_seed: bool = False
    #: a scribble gives points about this many mm apart along it, at most ``scribble_points`` of them
    scribble_step_mm: float = 5.0
    scribble_points: int = 12
    #: an include lasso also prompts the model with its filled outline as mask logits (models that take them)
    lasso_mask_prompt: bool = True


#: The mask-prompt logit inside (+) and outside (-) a lasso.
LASSO_LOGIT = 8.0


@dataclass
class Timings:
    """Counters for benchmarks: encoder and decoder calls and their seconds."""

    encoded: int = 0
    encode_seconds: float = 0.0
    decoded: int = 0
    decode_seconds: float = 0.0


@dataclass
class SliceSeed:
    """A slice where segmentation starts: a box and/or points, and the slice range it may propagate in."""

    index: int
    box: Optional[BoxRC]
    points: list[PointPrompt] = field(default_factory=list)
    limits: Optional[tuple[int, int]] = None  # slice range (inclusive) or None for unbounded
    clip: Optional[BoxRC] = None  # in-plane bounds every propagated box is clipped to (a ROI)
    clips: Optional[dict[int, BoxRC]] = None  # per-slice bounds instead (an oriented ROI's sections)
    stops: bool = True  # whether propagation stops where the structure seems to end (else: fills the limits)
    one_window: bool = False  # points alone, on large slices: every box tried shares the largest one's window
    lasso: Optional[np.ndarray] = None  # an include lasso filled on this slice: mask prompt and bounds


@dataclass
class SliceRecord:
    """One slice of a segment: its mask, the box that prompted it, and the propagation it came from."""

    mask: np.ndarray
    box: BoxRC
    seed: int
    step: int  # +1 / -1: reached by propagation in that direction; 0: a seed slice
    clip: Optional[BoxRC] = None  # in-plane bounds a ROI gives this slice (corrections stay inside them)


@dataclass
class PlaneResult:
    """How a segment was made along one slicing axis: the window, the slices' records and the clicks."""

    axis: int
    window: str
    records: dict[int, SliceRecord]
    clicks: list[PointPrompt]


class PromptSession:
    """Holds a volume, a promptable 2D model and its embedding cache; segments named structures from prompts."""

    def __init__(self, volume: Volume, model: PromptableModel2D, device: torch.device | str | None = None, *,
                 axis: int = 2, context: str = "auto", modality: str = "auto", window: str = "auto",
                 cache_bytes: int = 2 << 30, autocast_dtype: Optional[torch.dtype] = None,
                 settings: Optional[PropagationSettings] = None, budget: Optional[SharedBudget] = None,
                 planes: int = 1) -> None:
        if context not in ("auto", "crop", "full"):
            raise ValueError("context must be 'auto', 'crop' or 'full'")
        if planes not in (1, 3):
            raise ValueError("planes must be 1 or 3")
        self.planes = planes
        self.volume = volume
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.axis = axis
        self.context = context
        self.autocast_dtype = autocast_dtype
        self.settings = settings or PropagationSettings()
        self.modality = guess_modality(volume) if modality == "auto" else modality.upper()
        self.window = window
        self._images: dict[str, np.ndarray] = {}
        self.use_window(window if window != "auto" else "abdomen")
        self.cache = EmbeddingCache(cache_bytes, budget)
        self.timings = Timings()
        self.results: dict[str, np.ndarray] = {}
        self._propagations: dict[tuple, dict[int, SliceRecord]] = {}
        #: per prompt, the last corrected result: (settings, clicks applied, records)
        self._corrections: dict[tuple, tuple[tuple, tuple[PointPrompt, ...], dict[int, SliceRecord]]] = {}
        self._window_choices: dict[tuple, str] = {}
        self._planes: dict[str, list[PlaneResult]] = {}
        self._crossings: dict[tuple, dict[int, dict[int, SliceRecord]]] = {}

    # ------------------------------------------------------------------ intensities
    def use_window(self, window: str) -> None:
        """Make ``self.image`` the volume normalised with this CT window (MR: percentiles; window ignored)."""
        name = window if self.modality == "CT" else "MR"
        if name not in self._images:
            self._images[name] = normalize(self.volume, modality=self.modality, window=window)
        self.image = self._images[name]
        self._image_key = name

    def candidate_windows(self, prompts: SegmentPrompts) -> list[str]:
        """The CT windows a segment may use: the one asked for; with ``auto``, the soft-tissue window, and also
        the lung window where much of the prompted region is air (below -500 HU): lung, but also a gas-filled
        stomach or bowel, which the lung window would hide. :meth:`choose_window` decides between them."""
        if self.window != "auto" or self.modality != "CT":
            return [self.window if self.window != "auto" else "abdomen"]
        region = _prompt_region(prompts, self.volume.array.shape)
        values = self.volume.array[region]
        air = float(np.mean(values < -500)) if values.size else 0.0
        return ["abdomen", "lung"] if air > self.settings.air_fraction_for_lung_window else ["abdomen"]

    def choose_window(self, prompts: SegmentPrompts, axis: int) -> str:
        """``auto`` window per segment: of the candidate windows, the one whose answer on the first seed slice
        the model is most confident about (its predicted IoU); soft tissue when there is no choice."""
        candidates = self.candidate_windows(prompts)
        if len(candidates) == 1:
            return candidates[0]
        seeding = SegmentPrompts(prompts.name, prompts.boxes, [] if prompts.boxes else prompts.include_points)
        scores = []
        for window in candidates:
            self.use_window(window)
            seeds = self._seeds(seeding, axis)
            found = self._seed_slice(seeds[0], axis) if seeds else None
            scores.append(found[1] if found is not None else -1.0)
        return candidates[int(np.argmax(scores))]

    # ------------------------------------------------------------------ geometry
    def num_slices(self, axis: Optional[int] = None) -> int:
        return self.image.shape[2 - (self.axis if axis is None else axis)]

    def slice_shape(self, axis: Optional[int] = None) -> tuple[int, int]:
        rows, cols = in_plane_axes(self.axis if axis is None else axis)
        size_ijk = self.image.shape[::-1]
        return (size_ijk[rows], size_ijk[cols])

    def spacing_rc(self, axis: Optional[int] = None) -> tuple[float, float]:
        rows, cols = in_plane_axes(self.axis if axis is None else axis)
        return (float(self.volume.spacing[rows]), float(self.volume.spacing[cols]))

    def _to_slice(self, ijk: Sequence[float], axis: int) -> tuple[float, float, float]:
        """(i, j, k) -> (slice index, row, col) for slices perpendicular to ``axis``."""
        rows, cols = in_plane_axes(axis)
        return (float(ijk[axis]), float(ijk[rows]), float(ijk[cols]))

    def context_for(self, axis: int) -> str:
        """``auto``: crops around the prompt on slices much larger than the model's input (e.g. 512x512 CT,
        where they recover small structures), the whole slice otherwise (crops of a coarse slice lose context)."""
        if self.context != "auto":
            return self.context
        return "crop" if max(self.slice_shape(axis)) > 1.5 * self.model.input_size else "full"

    def _window(self, box: Optional[BoxRC], axis: int) -> SliceWindow:
        size = self.model.input_size
        if self.context_for(axis) == "full" or box is None:
            return full_window(self.slice_shape(axis), self.spacing_rc(axis), size)
        return box_window(box, self.slice_shape(axis), self.spacing_rc(axis), size)

    def _cached_window(self, box: BoxRC, axis: int, index: int) -> Optional[SliceWindow]:
        """For a correction on large slices (crop context): the smallest window of this slice already encoded
        that holds the box an eighth of its side from every edge and is at most four times the box's larger
        side (so a click costs decoder calls, no encoder call); None when there is none, or with whole-slice
        context (one window per slice anyway)."""
        if self.context_for(axis) == "full":
            return None
        side = max(box[2] - box[0] + 1, (box[3] - box[1] + 1) * self.spacing_rc(axis)[1] / self.spacing_rc(axis)[0])
        best: Optional[SliceWindow] = None
        for key in self.cache.keys():
            if key[:3] != (self._image_key, axis, index):
                continue
            window = key[3]
            top, left = window.row0 - 0.5 + window.rows / 8, window.col0 - 0.5 + window.cols / 8
            bottom, right = window.row0 - 0.5 + window.rows * 7 / 8, window.col0 - 0.5 + window.cols * 7 / 8
            if (top <= box[0] and box[2] <= bottom and left <= box[1] and box[3] <= right
                    and window.rows <= 4 * side and (best is None or window.rows < best.rows)):
                best = window
        return best

    # ------------------------------------------------------------------ model calls
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode(self, requests: Iterable[tuple[str, int, int, SliceWindow]], batch_size: Optional[int] = None) -> None:
        """Encode (intensity window, axis, slice, slice window) keys not yet cached, in batches (on CPU one
        slice at a time: larger batches only add memory traffic there)."""
        batch_size = batch_size or (1 if self.device.type == "cpu" else 8)
        missing = []
        for key in requests:
            if key not in self.cache and key not in missing:
                missing.append(key)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            images = [self.model.preprocess(extract(get_slice(self._images[name], axis, index), window).numpy())
                      for name, axis, index, window in chunk]
            batch = torch.stack(images).to(self.device).contiguous(memory_format=torch.channels_last)
            began = time.perf_counter()
            with torch.inference_mode(), self._autocast():
                embeddings = self.model.encode(batch)
            self.timings.encode_seconds += time.perf_counter() - began
            self.timings.encoded += len(chunk)
            for key, embedding in zip(chunk, embeddings):
                self.cache.put(key, embedding)  # kept in the encoder's dtype (bf16 halves the cache)

    def decode_logits(self, axis: int, index: int, box: Optional[BoxRC], points: Sequence[PointPrompt] = (),
                      window: Optional[SliceWindow] = None,
                      mask_prompt: Optional[np.ndarray] = None) -> tuple[torch.Tensor, float, SliceWindow]:
        """The model's logits on one slice for a box and/or points (and a slice mask given as mask logits), its
        quality estimate and the window used."""
        if window is None:
            window = self._window(box if box is not None else self._points_box(points, axis), axis)
        key = (self._image_key, axis, index, window)
        self.encode([key])
        embedding = self.cache.get(key)
        prompts = PromptBatch2D(embedding_index=torch.zeros(1, dtype=torch.long, device=self.device))
        if box is not None:
            prompts.boxes = torch.tensor(window.box_to_window(box), dtype=torch.float32, device=self.device)[None]
        if points:
            rc = np.array([self._to_slice(p.ijk, axis)[1:] for p in points])
            prompts.points = torch.tensor(window.to_window(rc), dtype=torch.float32, device=self.device)[None]
            prompts.point_labels = torch.tensor([[1 if p.include else 0 for p in points]], device=self.device)
        if mask_prompt is not None:
            prompts.mask_logits = self._mask_logits(mask_prompt, window)
        began = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            logits, quality = self.model.decode(embedding[None], prompts)
        self.timings.decode_seconds += time.perf_counter() - began
        self.timings.decoded += 1
        return paste(logits[0, 0].float(), window, self.slice_shape(axis)), float(quality[0]), window

    def _mask_logits(self, mask: np.ndarray, window: SliceWindow) -> torch.Tensor:
        """A slice mask as the model's low-resolution mask logits (1, 1, mask_size, mask_size) over ``window``."""
        inside = extract(mask.astype(np.float32), window)[None, None]
        size = int(getattr(self.model, "mask_size", window.size))
        if inside.shape[-1] != size:
            inside = torch.nn.functional.interpolate(inside, size=(size, size), mode="bilinear", align_corners=False)
        return ((inside * 2.0 - 1.0) * LASSO_LOGIT).to(self.device)

    def takes_mask_prompt(self) -> bool:
        """Whether lassos also prompt the model with a mask: the setting, unless the model says its decoder
        ignores ``mask_logits`` (``accepts_mask_logits = False``)."""
        return self.settings.lasso_mask_prompt and bool(getattr(self.model, "accepts_mask_logits", True))

    def decode_slice(self, axis: int, index: int, box: Optional[BoxRC], points: Sequence[PointPrompt] = (),
                     window: Optional[SliceWindow] = None,
                     mask_prompt: Optional[np.ndarray] = None) -> tuple[np.ndarray, float, SliceWindow]:
        """Segment one slice from a box and/or points: (mask on the slice, model quality, window used)."""
        logits, quality, window = self.decode_logits(axis, index, box, points, window, mask_prompt)
        mask = apply_clicks(logits.numpy() > 0, [self._to_slice(p.ijk, axis)[1:] + (p.include,) for p in points])
        return mask, quality, window

    # ------------------------------------------------------------------ segmentation
    def segment(self, prompts: SegmentPrompts, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        """A boolean KJI mask of one structure from its prompts; remembered under its name.

        Boxes (and points given alone) are propagated; the propagation is kept per prompt set, so corrective
        clicks added afterwards re-decode only the slices they lie on and the neighbours they carry to. An
        exclude click that empties a slice ends the propagation there; an include click on a slice nothing
        reached seeds it and grows outward into slices not yet segmented.
        """
        if prompts.is_empty():
            raise InputError(None, f"segment '{prompts.name}' has no box and no include point")
        axis = slicing_axis(prompts, self.axis)
        for curve in prompts.curves:
            problem = off_slice_problem(curve, axis)
            if problem:
                raise InputError(curve.source, f"segment '{prompts.name}': {problem}")
        curves = prompts.curves
        prompts, groups = self._expand(prompts, axis)
        lassos = tuple(c for c in curves if c.closed and c.include)
        seeding_points = [] if prompts.boxes else self._seeding_points(prompts.include_points, axis, groups,
                                                                      prompts.points)
        pending = [(p, g) for p, g in zip(prompts.points, groups) if p not in seeding_points]
        corrections = [p for p, _ in pending]
        # A scribble's points are applied together: one correction ends at its last point.
        ends = [n + 1 for n, (_, g) in enumerate(pending)
                if g is None or n + 1 == len(pending) or pending[n + 1][1] != g]
        choice_key = (axis, tuple(prompts.boxes), tuple(seeding_points), lassos)
        if choice_key not in self._window_choices:  # corrective clicks keep the window their prompt chose
            self._window_choices[choice_key] = self.choose_window(prompts, axis)
        self.use_window(self._window_choices[choice_key])
        base_key = (self._image_key, axis, tuple(prompts.boxes), tuple(seeding_points), lassos)
        if base_key not in self._propagations:
            seeds = self._seeds(SegmentPrompts(prompts.name, prompts.boxes, seeding_points), axis)
            fills = self._fills(lassos, axis)
            for seed in seeds:
                seed.lasso = fills.get(seed.index)
            # Seed slices with boxes are known in advance: encode them together (batches on a GPU).
            self.encode([(self._image_key, axis, seed.index, self._window(seed.box, axis))
                         for seed in seeds if seed.box is not None])
            records: dict[int, SliceRecord] = {}
            seed_slices = {seed.index for seed in seeds}
            clock = ProgressClock(progress, len(seeds), prompts.name)
            for number, seed in enumerate(seeds):
                clock(number)  # seeds propagated so far: the message names the segment before its slices
                self._grow(seed, axis, records, stop_at=seed_slices)
            self._propagations[base_key] = records
        propagated = self._propagations[base_key]
        records = self._corrected(base_key, propagated, corrections, axis, ends)
        window = self._window_choices[choice_key]
        planes = [PlaneResult(axis, window, records, list(prompts.points))]
        mask = _assemble(records, axis, self.image.shape)
        if self.planes == 3:
            if base_key not in self._crossings:
                self._crossings[base_key] = self._crossing_planes(prompts, seeding_points, propagated, axis)
            crossings = self._crossings[base_key]
            if crossings:
                votes = mask.astype(np.uint8)
                for other, crossing in crossings.items():
                    votes += _assemble(crossing, other, self.image.shape)
                    planes.append(PlaneResult(other, window, crossing, []))
                voted = votes >= 2
                # Slices the corrective clicks changed (directly or carried over) keep what the clicks made.
                for index in set(records) | set(propagated):
                    if records.get(index) is not propagated.get(index):
                        get_slice(voted, axis, index)[...] = get_slice(mask, axis, index)
                mask = voted
        for index, fill in self._fills([c for c in curves if c.closed and not c.include], axis).items():
            get_slice(mask, axis, index)[fill] = False  # an exclude lasso: nothing of the segment inside it
        self.results[prompts.name] = mask
        self._planes[prompts.name] = planes
        return mask

    def _expand(self, prompts: SegmentPrompts, axis: int) -> tuple[SegmentPrompts, list[Optional[int]]]:
        """The prompts with curves as what this model takes: each scribble's points (first, in the curves' order;
        then the clicks) and a 2D box around each include lasso; and, per point, the number of the scribble it
        comes from (None: a click)."""
        points: list[PointPrompt] = []
        groups: list[Optional[int]] = []
        boxes = list(prompts.boxes)
        for number, curve in enumerate(prompts.curves):
            index = curve.slice_index(axis)
            if curve.closed:
                if curve.include:
                    lo, hi = curve.array().min(axis=0), curve.array().max(axis=0)
                    lo[axis] = hi[axis] = index
                    boxes.append(BoxPrompt(tuple(lo.tolist()), tuple(hi.tolist())))
                continue
            for point in curve.sample(self.volume.spacing, self.settings.scribble_step_mm,
                                      self.settings.scribble_points):
                ijk = list(point.ijk)
                ijk[axis] = float(index)  # on the curve's slice exactly
                points.append(PointPrompt((ijk[0], ijk[1], ijk[2]), point.include))
                groups.append(number)
        points += prompts.points
        groups += [None] * len(prompts.points)
        return SegmentPrompts(prompts.name, boxes, points, prompts.color), groups

    def _fills(self, lassos: Sequence[CurvePrompt], axis: int) -> dict[int, np.ndarray]:
        """Lassos filled on their slices (several on one slice: their union)."""
        fills: dict[int, np.ndarray] = {}
        for curve in lassos:
            index = curve.slice_index(axis)
            if index is None or not 0 <= index < self.num_slices(axis):
                continue
            fill = rasterise_curve(curve, axis, self.slice_shape(axis))
            fills[index] = fills[index] | fill if index in fills else fill
        return fills

    def _crossing_planes(self, prompts: SegmentPrompts, seeding_points: list[PointPrompt],
                         primary: dict[int, SliceRecord], axis: int) -> dict[int, dict[int, SliceRecord]]:
        """The structure segmented again along the two other axes, for a vote of three planes: a 3-D ROI
        prompts them directly; a 2-D box or clicks on one slice prompt them through the section of that
        slice's mask (its extent across the slice is known; along the slicing axis, of a few heights tried,
        the one the model is surest of). Empty when the prompts seed several slices (the user gave them)."""
        seeds = [index for index, record in primary.items() if record.step == 0]
        flat = [box for box in prompts.boxes if box.slice_axis() is not None]
        if len(seeds) != 1 or len(prompts.boxes) > 1 or (flat and seeding_points):
            return {}
        crossings: dict[int, dict[int, SliceRecord]] = {}
        for other in (a for a in (0, 1, 2) if a != axis):
            if prompts.boxes and not flat:
                records: dict[int, SliceRecord] = {}
                for seed in self._seeds(SegmentPrompts(prompts.name, prompts.boxes), other):
                    self._grow(seed, other, records)
            else:
                records = self._crossing_from_slice(primary[seeds[0]].mask, axis, seeds[0], other)
            if not records:
                return {}
            crossings[other] = records
        return crossings

    def _crossing_from_slice(self, seed_mask: np.ndarray, axis: int, index: int, other: int,
                             heights: tuple[float, ...] = (0.5, 1.0, 2.0)) -> dict[int, SliceRecord]:
        """Propagation along ``other`` from the slice through the middle of a seed slice's mask, prompted with
        a box across the mask's section there and a height of ``heights`` times that section's length."""
        rows, cols = in_plane_axes(axis)
        rr, cc = np.nonzero(seed_mask)
        ijk = np.zeros((rr.size, 3))
        ijk[:, axis], ijk[:, rows], ijk[:, cols] = index, rr, cc
        centre = int(round(float(np.median(ijk[:, other]))))
        line = ijk[np.round(ijk[:, other]) == centre]
        third = 3 - axis - other
        low, high = line[:, third].min(), line[:, third].max()
        length_mm = (high - low + 1) * self.volume.spacing[third]
        other_rows, other_cols = in_plane_axes(other)
        line_rc = np.stack([line[:, other_rows], line[:, other_cols]], axis=1)[:: max(len(line) // 5, 1)]
        best: Optional[tuple[float, BoxRC]] = None
        for height in heights:
            half = max(height * length_mm / self.volume.spacing[axis] / 2, 2.0)
            lo, hi = np.zeros(3), np.zeros(3)
            lo[third], hi[third] = low - 1, high + 1
            lo[axis], hi[axis] = index - half, index + half
            lo[other] = hi[other] = centre
            box = self._padded((lo[other_rows], lo[other_cols], hi[other_rows], hi[other_cols]), other, None,
                               margin=False)
            mask, quality, _ = self.decode_slice(other, centre, box)
            if _regions_at(mask, line_rc).sum() >= 4 and (best is None or quality > best[0]):
                best = (quality, box)
        records: dict[int, SliceRecord] = {}
        if best is not None:
            box = self._stretch(best[1], other, centre, line_rc, along=0 if other_rows == axis else 1)
            self._grow(SliceSeed(centre, box), other, records)
        return records

    def _stretch(self, box: BoxRC, axis: int, index: int, line_rc: np.ndarray, along: int,
                 steps: int = 4) -> BoxRC:
        """Lengthen a crossing slice's box along the first slicing direction (``along``: 0 rows, 1 columns)
        while the structure touches its ends (a vessel or a muscle runs on beyond any guessed height)."""
        rows, cols = self.slice_shape(axis)
        limit = (rows - 1.0, cols - 1.0)[along]
        for _ in range(steps):
            mask, _, _ = self.decode_slice(axis, index, box)
            mask = _regions_at(mask, line_rc)
            if not mask.any():
                break
            extent = np.flatnonzero(mask.any(axis=1 - along))
            length = box[along + 2] - box[along]
            low = box[along] > 0 and extent[0] <= box[along] + 1
            high = box[along + 2] < limit and extent[-1] >= box[along + 2] - 1
            if not (low or high):
                break
            grown = list(box)
            if low:
                grown[along] = max(box[along] - length / 2, 0.0)
            if high:
                grown[along + 2] = min(box[along + 2] + length / 2, limit)
            box = (grown[0], grown[1], grown[2], grown[3])
        return box

    def run(self, segments: Sequence[SegmentPrompts],
            progress: Optional[ProgressCallback] = None) -> tuple[np.ndarray, list[str]]:
        """One multi-label map (values 1..N in the order given) and the names. Where two segments overlap, the
        voxel goes to the one the model is more confident about there (its logits), not to the later one."""
        names = [prompts.name for prompts in segments]
        for prompts in segments:
            self.segment(prompts, progress)
        labels = np.zeros(self.image.shape, dtype=np.uint16)
        for value, name in enumerate(names, start=1):
            labels[self.without_contested(name, names[:value - 1])] = value
        return labels, names

    def without_contested(self, name: str, earlier: Optional[Sequence[str]] = None) -> np.ndarray:
        """Segment ``name``'s mask without the voxels an ``earlier`` segment (default: those first segmented
        before it) claims with more confidence. Written in order, later over earlier, such masks give every
        contested voxel to its most confident segment: so the worker's masks, written one by one into a Slicer
        segmentation, and :meth:`run`'s label map agree voxel for voxel."""
        order = list(self.results)
        earlier = order[:order.index(name)] if earlier is None else earlier
        mask = self.results[name]
        kept = mask.copy()
        for other in earlier:
            contested = mask & self.results[other]
            if contested.any():
                loses = self.confidence(other, contested) > self.confidence(name, contested)
                kept[tuple(index[loses] for index in np.nonzero(contested))] = False
        return kept

    def confidence(self, name: str, where: np.ndarray) -> np.ndarray:
        """The model's logits for segment ``name`` at the voxels ``where`` (a KJI mask): each slice holding
        them is decoded again with the prompt that made it (embeddings are cached, so only the decoder runs);
        the mean over the planes that segmented it; its include clicks are binding (+1000)."""
        voxels = np.nonzero(where)
        total = np.zeros(len(voxels[0]), dtype=np.float32)
        planes = self._planes[name]
        for plane in planes:
            self.use_window(plane.window)
            rows, cols = in_plane_axes(plane.axis)
            along, row_of, col_of = voxels[2 - plane.axis], voxels[2 - rows], voxels[2 - cols]
            values = np.full(len(along), -20.0, dtype=np.float32)
            for index in np.unique(along):
                record = plane.records.get(int(index))
                if record is None or not record.mask.any():
                    continue
                clicks = [p for p in plane.clicks if self._slice_of(p, plane.axis) == index]
                logits = self.decode_logits(plane.axis, int(index), record.box, clicks)[0].numpy()
                chosen = along == index
                values[chosen] = logits[row_of[chosen], col_of[chosen]]
            total += values
        total /= max(len(planes), 1)
        for click in (p for p in (planes[0].clicks if planes else []) if p.include):
            i, j, k = (int(round(v)) for v in click.ijk)
            total[(voxels[0] == k) & (voxels[1] == j) & (voxels[2] == i)] = 1000.0
        return total

    def _seeds(self, prompts: SegmentPrompts, axis: int) -> list[SliceSeed]:
        seeds: dict[int, SliceSeed] = {}
        last = self.num_slices(axis) - 1
        for box in prompts.boxes:
            lo = self._to_slice(box.lo, axis)
            hi = self._to_slice(box.hi, axis)
            in_plane: BoxRC = (lo[1], lo[2], hi[1], hi[2])
            if box.slice_axis() == axis:
                index = int(np.clip(round((lo[0] + hi[0]) / 2), 0, last))
                seeds[index] = SliceSeed(index, in_plane)
            else:
                first, stop = box.voxel_range(axis)
                first, stop = max(first, 0), min(stop, last)
                clips = self._sections(box, axis, first, stop) if box.corners is not None else None
                if clips:
                    first, stop = min(clips), max(clips)
                index = self._best_roi_slice(axis, first, stop, in_plane, clips)
                # Inside a ROI the user gave the slice range: fill it (stop rules there cost more than they
                # save: measured on the bundled cases, they cut vertebrae and pancreas short).
                seeds[index] = SliceSeed(index, clips[index] if clips else in_plane, limits=(first, stop),
                                         clip=in_plane, clips=clips, stops=False)
        for point in prompts.include_points:
            index = self._slice_of(point, axis)
            if index in seeds:
                seeds[index].points.append(point)
            else:
                seeds[index] = SliceSeed(index, None, [point])
        return [seeds[k] for k in sorted(seeds)]

    def _best_roi_slice(self, axis: int, first: int, last: int, box: BoxRC,
                        clips: Optional[dict[int, BoxRC]] = None) -> int:
        """The slice a ROI starts from: of a few candidates inside it, the one where the model is most confident
        (a ROI's box is the structure's extent over all its slices, so it fits some slices far better)."""
        candidates = sorted({int(round(first + f * (last - first))) for f in (0.3, 0.5, 0.7)})
        if clips:
            candidates = [index for index in candidates if index in clips] or [min(clips)]
        if len(candidates) == 1:
            return candidates[0]
        scores = [self.decode_slice(axis, index, clips[index] if clips else box)[1] for index in candidates]
        return candidates[int(np.argmax(scores))]

    def _sections(self, box: BoxPrompt, axis: int, first: int, last: int) -> dict[int, BoxRC]:
        """An oriented ROI's in-plane bounds on each slice it reaches (clipped to the slice)."""
        rows, cols = self.slice_shape(axis)
        sections: dict[int, BoxRC] = {}
        for index in range(first, last + 1):
            bounds = box.section(axis, index)
            if bounds is None:
                continue
            lo, hi = self._to_slice(bounds[0], axis), self._to_slice(bounds[1], axis)
            r0, c0 = max(lo[1], 0.0), max(lo[2], 0.0)
            r1, c1 = min(hi[1], rows - 1.0), min(hi[2], cols - 1.0)
            if r0 <= r1 and c0 <= c1:
                sections[index] = (r0, c0, r1, c1)
        return sections

    def _slice_of(self, point: PointPrompt, axis: int) -> int:
        return int(np.clip(round(self._to_slice(point.ijk, axis)[0]), 0, self.num_slices(axis) - 1))

    def _seed_slice(self, seed: SliceSeed, axis: int, cached_only: bool = False) -> Optional[tuple[SliceRecord, float]]:
        """Segment a seed's own slice (points alone first give a mask whose box then prompts the model): the
        slice's record and the model's quality estimate, or None where the points found nothing. With
        ``cached_only`` (a correction), on large slices only boxes an encoded window holds are tried."""
        if seed.box is not None:
            prompt = seed.lasso if seed.lasso is not None and self.takes_mask_prompt() else None
            mask, quality, _ = self.decode_slice(axis, seed.index, seed.box, seed.points, mask_prompt=prompt)
            if seed.lasso is not None:  # the user drew the structure's outline: nothing beyond it (2 pixels)
                mask = mask & ndimage.binary_dilation(seed.lasso, iterations=2)
            return SliceRecord(mask, seed.box, seed.index, 0), quality
        # Points alone: LiteMedSAM was trained with boxes, so try boxes of a few sizes around the points and
        # keep the answer the model is most confident about (as SAM picks among its multi-mask outputs).
        rc = np.array(self._points_rc(seed.points, axis))
        centre, spread = rc.mean(axis=0), rc.max(axis=0) - rc.min(axis=0)
        best: Optional[tuple[float, np.ndarray, BoxRC]] = None
        boxes = [self._padded((*(centre - half), *(centre + half)), axis, None, margin=False)
                 for half in (np.maximum(side / np.array(self.spacing_rc(axis)), spread + 2) / 2
                              for side in self.settings.point_box_sizes_mm)]
        shared = self._window(boxes[-1], axis) if seed.one_window else None
        for box in boxes:
            window = self._cached_window(box, axis, seed.index) if cached_only else shared
            if cached_only and window is None and self.context_for(axis) != "full":
                continue
            mask, quality, _ = self.decode_slice(axis, seed.index, box, seed.points, window)
            mask = _regions_at(mask, rc)  # an answer elsewhere than the clicks is not what they asked for
            if mask.sum() >= 4 and (best is None or quality > best[0]):
                best = (quality, mask, box)
        if best is None:
            return None
        quality, mask, box = best
        return SliceRecord(mask, box, seed.index, 0), quality

    def _grow(self, seed: SliceSeed, axis: int, records: dict[int, SliceRecord], only_empty: bool = False,
              stop_at: frozenset[int] | set[int] = frozenset()) -> None:
        """Segment a seed's slice, then propagate both ways while the structure goes on (or within a ROI),
        never into another seed's slice (that seed covers its side)."""
        found = self._seed_slice(seed, axis)
        if found is None:
            return
        record = found[0]
        record.clip = seed.clips.get(seed.index) if seed.clips else seed.clip
        records[seed.index] = _merge(records.get(seed.index), record)
        mask = record.mask
        if not mask.any():
            return
        last = self.num_slices(axis) - 1
        low, high = (max(seed.limits[0], 0), min(seed.limits[1], last)) if seed.limits else (0, last)
        pixel_area = float(np.prod(self.spacing_rc(axis)))
        seed_values = get_slice(self.image, axis, seed.index)[mask]
        mean, spread = float(seed_values.mean()), max(float(seed_values.std()), 0.02)
        for step in (1, -1):
            previous = mask
            index = seed.index + step
            while low <= index <= high and index not in stop_at and not (only_empty and index in records):
                clip = seed.clips.get(index) if seed.clips else seed.clip
                if seed.clips and clip is None:
                    break
                box = self._padded(mask_box_rc(previous), axis, clip)
                if box[0] > box[2] or box[1] > box[3]:  # the structure left this slice's part of the ROI
                    box = self._padded(clip, axis, None, margin=False)
                current, quality, _ = self.decode_slice(axis, index, box)
                area = current.sum()
                if not area:
                    break
                drift = abs(float(get_slice(self.image, axis, index)[current].mean()) - mean) / spread
                if seed.stops and (
                        area * pixel_area < self.settings.min_area_mm2
                        or area < self.settings.min_area_ratio * previous.sum()
                        or quality < self.settings.min_quality
                        or drift > self.settings.max_intensity_drift):
                    break
                records[index] = _merge(records.get(index), SliceRecord(current, box, seed.index, step, clip))
                previous = current
                index += step

    def _corrected(self, base_key: tuple, propagated: dict[int, SliceRecord], corrections: Sequence[PointPrompt],
                   axis: int, ends: Optional[Sequence[int]] = None) -> dict[int, SliceRecord]:
        """The propagation with the corrective clicks applied one by one, in the order given (``ends``: where
        each correction ends, a scribble's points being one; default: every click is one). The last result
        per prompt is kept, so a click added to it applies only that click: its cost does not grow with the
        clicks before it, and the result equals applying all of them at once from the propagation."""
        settings = astuple(self.settings)
        applied: tuple[PointPrompt, ...] = ()
        records = propagated
        cached = self._corrections.get(base_key)
        if cached is not None and cached[0] == settings and tuple(corrections[:len(cached[1])]) == cached[1]:
            _, applied, records = cached
        records = dict(records)  # the cached records are not changed in place
        for end in range(1, len(corrections) + 1) if ends is None else ends:
            if end > len(applied):
                self._correct(records, corrections[:end], axis)
        self._corrections[base_key] = (settings, tuple(corrections), records)
        return records

    def _correct(self, records: dict[int, SliceRecord], clicks: Sequence[PointPrompt], axis: int) -> None:
        """Apply the last of ``clicks`` (the ones before it already applied) on its slice, in place: an include
        click on a slice nothing reached seeds it and grows a little; the clicked slice is refined with every
        click it holds, then prompts its neighbours again (:meth:`_carry_correction`)."""
        index = self._slice_of(clicks[-1], axis)
        clicked = {self._slice_of(click, axis) for click in clicks}
        points = [click for click in clicks if self._slice_of(click, axis) == index]
        record = records.get(index)
        if (record is None or not record.mask.any()) and clicks[-1].include:
            box = self._neighbour_box(records, index, points, axis)
            reach = self.settings.click_growth_slices
            limits = None if reach is None else (index - reach, index + reach)
            seed = SliceSeed(index, box, points, limits=limits, stops=reach is None, one_window=True)
            self._grow(seed, axis, records, only_empty=True)
            record = records.get(index)
        if record is None or not record.mask.any():
            return
        box = _union_box(record.box, self._points_rc([p for p in points if p.include], axis))
        proposal, quality, _ = self.decode_slice(axis, index, box, points, self._cached_window(box, axis, index))
        clicks_rc = [(*self._to_slice(p.ijk, axis)[1:], p.include) for p in points]
        row, col = (int(round(v)) for v in clicks_rc[-1][:2])
        on_mask = 0 <= row < record.mask.shape[0] and 0 <= col < record.mask.shape[1] and record.mask[row, col]
        if self.settings.click_box_search and clicks[-1].include and not on_mask:
            # A missed part: the clicks alone may say more than the old box (too small, or elsewhere), so
            # the boxes tried around points are tried too, and the more confident answer is kept.
            found = self._seed_slice(SliceSeed(index, None, points), axis, cached_only=True)
            if found is not None and found[1] > quality:
                proposal = _inside(found[0].mask, record.clip)
                box = _union_box(found[0].box, [box[:2], box[2:]], margin=0.0)
        mask = refine_with_clicks(record.mask, proposal, clicks_rc)
        records[index] = SliceRecord(mask, box, record.seed, record.step, record.clip)
        if not mask.any() and record.step:
            # The user says the structure ended before this slice: drop what propagation added beyond it
            # (slices with clicks of their own keep them).
            for other, rec in list(records.items()):
                if (rec.seed == record.seed and rec.step == record.step and (other - index) * record.step > 0
                        and other not in clicked):
                    del records[other]
        elif mask.any():
            self._carry_correction(records, index, axis, clicked, grow=clicks[-1].include)

    def _carry_correction(self, records: dict[int, SliceRecord], index: int, axis: int, clicked: set[int],
                          grow: bool = False) -> None:
        """A corrected slice prompts its neighbours again (the box of its mask), outward, until a neighbour's
        answer agrees with what it had (Dice >= 0.95), comes back empty (that neighbour keeps what it had),
        or ``click_reach_slices`` is reached; slices with clicks or a prompt of their own keep them. So a click
        changes the 3-D result, not one slice. A neighbour's new box stays within its old one (with the
        propagation margin) unless ``grow`` (an include click: the structure is larger than found); it always
        stays within a ROI."""
        for step in (1, -1):
            previous = records[index].mask
            other = index + step
            for _ in range(self.settings.click_reach_slices):
                if other not in records or other in clicked or records[other].step == 0:
                    break  # a slice with clicks or a prompt of its own keeps them
                old = records[other]
                box = self._padded(mask_box_rc(previous), axis, old.clip if grow else self._padded(old.box, axis, None))
                current, _, _ = self.decode_slice(axis, other, box, (), self._cached_window(box, axis, other))
                if not current.any() or dice(current, old.mask) >= 0.95:
                    break  # an empty answer is no evidence the structure ends: stop carrying, delete nothing
                if grow and current.sum() > self.settings.max_carried_growth * previous.sum():
                    break  # far larger than the corrected slice next to it: a leak into a neighbour
                records[other] = SliceRecord(current, box, old.seed, old.step, old.clip)
                previous, other = current, other + step

    def _seeding_points(self, include: list[PointPrompt], axis: int, groups: Sequence[Optional[int]] = (),
                        points: Sequence[PointPrompt] = ()) -> list[PointPrompt]:
        """The include points that start a segment given without a box: those of its first include scribble
        (clicks then correct it, even on that slice), else the points on the first include point's slice (the
        later ones correct it); all of them with ``include_points_seed``. ``groups``: the scribble each of
        ``points`` comes from (None: a click)."""
        if self.settings.include_points_seed or not include:
            return include
        scribbles = [g for p, g in zip(points, groups) if g is not None and p.include]
        if scribbles:
            return [p for p, g in zip(points, groups) if g == scribbles[0]]
        first = self._slice_of(include[0], axis)
        return [point for point in include if self._slice_of(point, axis) == first]

    def _neighbour_box(self, records: dict[int, SliceRecord], index: int, points: Sequence[PointPrompt],
                       axis: int, reach: int = 3) -> Optional[BoxRC]:
        """For a click on a slice nothing reached: the box of the nearest segmented slice within ``reach``
        slices, grown to hold the include clicks (None: no such slice, the clicks alone prompt)."""
        near = [i for i, r in records.items() if abs(i - index) <= reach and r.mask.any()]
        if not near:
            return None
        nearest = records[min(near, key=lambda i: abs(i - index))]
        include = self._points_rc([p for p in points if p.include], axis)
        return self._padded(_union_box(mask_box_rc(nearest.mask), include), axis, None)

    def _points_box(self, points: Sequence[PointPrompt], axis: int) -> Optional[BoxRC]:
        """A box around the points, at least 4 cm wide: the window for a points-only prompt."""
        if not points:
            return None
        rc = np.array(self._points_rc(points, axis))
        half_r, half_c = (20.0 / s for s in self.spacing_rc(axis))
        return (rc[:, 0].min() - half_r, rc[:, 1].min() - half_c, rc[:, 0].max() + half_r, rc[:, 1].max() + half_c)

    def _points_rc(self, points: Sequence[PointPrompt], axis: int) -> list[tuple[float, float]]:
        return [self._to_slice(p.ijk, axis)[1:] for p in points]

    def _padded(self, box: BoxRC, axis: int, clip: Optional[BoxRC], margin: bool = True) -> BoxRC:
        """The box with the propagation margin (unless ``margin`` is False), clipped to ``clip`` and the slice."""
        margin_r = margin_c = 0.0
        if margin:
            ratio = self.settings.box_margin_ratio
            margin_r, margin_c = (self.settings.box_margin_mm / s for s in self.spacing_rc(axis))
            margin_r += ratio * (box[2] - box[0] + 1)
            margin_c += ratio * (box[3] - box[1] + 1)
        rows, cols = self.slice_shape(axis)
        r0, c0, r1, c1 = box[0] - margin_r, box[1] - margin_c, box[2] + margin_r, box[3] + margin_c
        if clip is not None:
            r0, c0, r1, c1 = max(r0, clip[0]), max(c0, clip[1]), min(r1, clip[2]), min(c1, clip[3])
        return (max(r0, 0.0), max(c0, 0.0), min(r1, rows - 1.0), min(c1, cols - 1.0))


def _prompt_region(prompts: SegmentPrompts, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """KJI slices of the region the prompts point at: their boxes' bounds, or 2 cm around the points."""
    if prompts.boxes:
        lo, hi = prompts.box_bounds()
    else:
        ijk = np.array([p.ijk for p in prompts.include_points])
        lo, hi = ijk.min(axis=0) - 3, ijk.max(axis=0) + 3
    size_ijk = shape[::-1]
    lo = [int(np.clip(np.floor(v), 0, n - 1)) for v, n in zip(lo, size_ijk)]
    hi = [int(np.clip(np.ceil(v), 0, n - 1)) + 1 for v, n in zip(hi, size_ijk)]
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _regions_at(mask: np.ndarray, points_rc: np.ndarray) -> np.ndarray:
    """The connected regions of ``mask`` that contain at least one of the points."""
    parts, _ = ndimage.label(mask)
    ids = {parts[int(round(r)), int(round(c))] for r, c in points_rc
           if 0 <= round(r) < mask.shape[0] and 0 <= round(c) < mask.shape[1]} - {0}
    return np.isin(parts, list(ids)) if ids else np.zeros_like(mask)


def _inside(mask: np.ndarray, clip: Optional[BoxRC]) -> np.ndarray:
    """The mask without what lies outside the in-plane bounds ``clip`` (None: the whole mask)."""
    if clip is None:
        return mask
    rows, cols = np.ogrid[:mask.shape[0], :mask.shape[1]]
    return mask & (rows >= np.floor(clip[0])) & (rows <= np.ceil(clip[2])) & (cols >= np.floor(clip[1])) \
        & (cols <= np.ceil(clip[3]))


def _union_box(box: BoxRC, points_rc: Sequence[tuple[float, float]], margin: float = 2.0) -> BoxRC:
    """The box grown to contain every point (with a small margin)."""
    r0, c0, r1, c1 = box
    for row, col in points_rc:
        r0, c0 = min(r0, row - margin), min(c0, col - margin)
        r1, c1 = max(r1, row + margin), max(c1, col + margin)
    return (r0, c0, r1, c1)


def _assemble(records: dict[int, SliceRecord], axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """A KJI mask from one plane's slice records."""
    mask = np.zeros(shape, dtype=bool)
    for index, record in records.items():
        view = get_slice(mask, axis, index)
        view |= record.mask
    return mask


def _merge(old: Optional[SliceRecord], new: SliceRecord) -> SliceRecord:
    """Two results on one slice (two seeds reaching it): the union of their masks and boxes."""
    if old is None:
        return new
    box = _union_box(old.box, [new.box[:2], new.box[2:]], margin=0.0)
    return SliceRecord(old.mask | new.mask, box, old.seed, old.step, old.clip)
