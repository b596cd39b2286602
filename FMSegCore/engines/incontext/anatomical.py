"""In-context segmentation across subjects: supports aligned to the query in physical space.

A user's next patient has another field of view, spacing and orientation than the labelled examples. Here each
support scan is aligned to the query (:func:`FMSegCore.preprocessing.alignment.align`), then support and query
are resampled onto one *work grid* built from the query: canonical LPS axes (so the query's orientation never
matters), slices across the chosen anatomical axis at the query's own slice spacing, and an in-plane square of
``input_size`` pixels around the query's body. On that grid a query slice and the support slice at the same
position show the same anatomy, so supports are chosen by millimetres, not by index, and share the query's
pixel size and field of view. The aligned labels are also a spatial prior: a class is kept only within
``prior_margin_mm`` of where the aligned supports put it. Probabilities go back onto the query's own grid.

The same alignment, warping the supports' labels onto the query (averaged over supports, the most probable
class above one half), is the registration baseline: :func:`registration_labels`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from scipy import ndimage

from FMSegCore.engines.incontext.session import InContextResult, InContextSession, InContextSettings
from FMSegCore.engines.incontext.support import SupportExample, SupportScan, SupportSet
from FMSegCore.engines.label_vote import most_probable
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.io.volume import Volume
from FMSegCore.models.interfaces import InContextModel2D
from FMSegCore.options import MATCHES, PRIOR_MARGIN_MM, REGISTRATION_WEIGHT
from FMSegCore.preprocessing.alignment import (
    Alignment,
    PreparedScan,
    align,
    check_alignment,
    prepare_scan,
    resample_onto,
)
from FMSegCore.preprocessing.intensity import DEFAULT_CT_WINDOW, Window, guess_modality, normalize
from FMSegCore.progress import ProgressCallback

# The defaults of the spatial prior's margin and of the registration weight are FMSegCore.options' (with how
# they were chosen), as are the matchings (MATCHES): one definition for the CLI, the worker and Slicer.
#: Margin (mm) around the query's body in the work grid's square.
BODY_MARGIN_MM = 10.0
#: Thinnest slice (mm) of the work grid: finer queries are sliced at this spacing (the cost grows with the
#: number of slices) and the probabilities interpolated back.
MIN_SLICE_MM = 2.0
#: World axis (LPS) across which slices are taken, per slicing direction.
WORLD_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass
class AnatomicalSettings:
    """How supports are aligned and how far from their aligned labels a class may appear."""

    prior_margin_mm: Optional[float] = PRIOR_MARGIN_MM  # None: no spatial prior
    #: weight of the registration prior mixed into the model's probabilities: (1 - w) model + w warped labels
    registration_weight: float = REGISTRATION_WEIGHT
    affine: bool = True
    deformable: bool = False
    working_mm: float = 4.0
    #: run the model with supports of another modality than the query (CT <-> MR): refused by default, as the
    #: model compares appearances (far below the registration baseline from CT to MR: ``fmseg bench incontext
    #: --cross``, scenario ``ct_to_mr``)
    allow_cross_modality: bool = False


@dataclass
class AlignedQuery:
    """The query's work grid and, per support, its alignment and its image and labels on that grid."""

    grid: Volume  # geometry of the work grid (array: the normalised query on it)
    axis: int  # IJK axis of the work grid the slices are taken across
    alignments: list[Alignment]
    examples: list[SupportExample]
    seconds: float = 0.0
    notes: dict = field(default_factory=dict)
    #: the model's outputs on the work grid, by settings (reused when only the priors change)
    model_outputs: dict = field(default_factory=dict, repr=False)


def choose_match(match: str, query: Volume, supports: Sequence[Volume]) -> str:
    """``auto``: ``index`` (relative slice position) when every support lies on the query's own grid (labelled
    slices of the same scan) or is one slice thick; ``anatomy`` (alignment) otherwise."""
    if match not in MATCHES:
        raise InputError(None, f"unknown matching {match!r} (use {', '.join(MATCHES)})")
    if match != "auto":
        return match
    own = all(volume.same_grid(query) or min(volume.array.shape) == 1 for volume in supports)
    return "index" if own else "anatomy"


def resolve_modality(volume: Volume, modality: str) -> str:
    chosen = modality.upper()
    if chosen == "AUTO":
        return guess_modality(volume)
    if chosen not in ("CT", "MR"):
        raise InputError(volume.path, f"unknown modality {modality!r} (use CT, MR or auto)")
    return chosen


def _work_axes(axis: str) -> np.ndarray:
    """Direction (columns: the work grid's I, J, K in LPS) with K across the slicing axis."""
    across = WORLD_AXIS[axis]
    in_plane = [a for a in (0, 1, 2) if a != across]
    return np.eye(3)[:, in_plane + [across]]


def work_grid(query: Volume, query_modality: str, size: int, axis: str = "axial",
              body_margin_mm: float = BODY_MARGIN_MM, min_slice_mm: float = MIN_SLICE_MM,
              prepared: Optional[PreparedScan] = None) -> tuple[Volume, int]:
    """The work grid of a query: canonical axes, an in-plane square of ``size`` pixels around its body,
    slices across ``axis`` at the query's spacing along it (at least ``min_slice_mm``). Returns (grid, IJK axis
    of the slices). ``prepared``: the query's :func:`prepare_scan`, when the caller has it already."""
    prepared = prepared or prepare_scan(query, query_modality)
    if not prepared.body.any():
        raise InputError(query.path, "no body found in the query (nothing to segment)")
    points = prepared.body_points()
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners *= np.array(query.shape_ijk, float) - 1
    extent_points = query.ijk_to_lps(corners)
    direction = _work_axes(axis)
    body_along = points @ direction
    full_along = extent_points @ direction
    low = np.maximum(body_along.min(axis=0) - body_margin_mm, full_along.min(axis=0))
    high = np.minimum(body_along.max(axis=0) + body_margin_mm, full_along.max(axis=0))
    side = float(max(high[0] - low[0], high[1] - low[1]))
    pixel = side / size
    centre = (low + high) / 2
    # slice spacing: the query's spacing along its axis closest to the slicing direction
    query_direction = np.asarray(query.direction, float)
    nearest = int(np.argmax(np.abs(query_direction.T @ direction[:, 2])))
    slice_mm = max(float(query.spacing[nearest]), min_slice_mm)
    count = int(np.floor((full_along[:, 2].max() - full_along[:, 2].min()) / slice_mm + 1e-6)) + 1
    first = full_along[:, 2].min()
    start = np.array([centre[0] - side / 2 + pixel / 2, centre[1] - side / 2 + pixel / 2, first])
    origin = direction @ start
    grid = Volume(np.zeros((count, size, size), np.float32), (pixel, pixel, slice_mm), tuple(origin), direction)
    return grid, 2


def align_supports(query: Volume, supports: Sequence[SupportScan], size: int, axis: str = "axial",
                   modality: str = "auto", window: Window = DEFAULT_CT_WINDOW,
                   settings: Optional[AnatomicalSettings] = None) -> AlignedQuery:
    """Align every support to the query (refusing, in one line naming it, a support that did not align) and
    resample query and supports onto the query's work grid."""
    began = time.perf_counter()
    settings = settings or AnatomicalSettings()
    if axis not in WORLD_AXIS:
        raise InputError(None, f"unknown axis {axis!r} (use {', '.join(WORLD_AXIS)})")
    query_modality = resolve_modality(query, modality)
    prepared = prepare_scan(query, query_modality, settings.working_mm)
    grid, grid_axis = work_grid(query, query_modality, size, axis, prepared=prepared)
    grid = grid.with_array(resample_onto(query, normalize(query, query_modality, window), grid))
    alignments, examples, modalities = [], [], []
    for scan in supports:
        support_modality = resolve_modality(scan.volume, modality)
        modalities.append(support_modality)
        alignment = align(scan.volume, query, support_modality, query_modality, settings.working_mm,
                          settings.affine, settings.deformable, prepared_query=prepared)
        check_alignment(alignment, scan.source)
        image = resample_onto(scan.volume, normalize(scan.volume, support_modality, window), grid,
                              alignment.transform)
        labels = resample_onto(scan.volume, scan.labels.astype(np.int32), grid, alignment.transform, nearest=True)
        alignments.append(alignment)
        examples.append(SupportExample(image.astype(np.float32), labels.astype(np.int32), scan.segments,
                                       scan.source, modality=support_modality))
    return AlignedQuery(grid, grid_axis, alignments, examples, time.perf_counter() - began,
                        {"query_modality": query_modality, "support_modalities": modalities})


def _prior(grid: Volume, masks: Sequence[np.ndarray], margin_mm: float) -> np.ndarray:
    """Where a class may appear on the work grid: within ``margin_mm`` of its aligned label in any support."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return union
    spacing = grid.spacing[::-1]  # KJI
    distance = ndimage.distance_transform_edt(~union, sampling=spacing)
    return distance <= margin_mm


def _empty_like(volume: Volume) -> Volume:
    """A volume on ``volume``'s grid with an empty (uint8) array: a resampling target."""
    return volume.with_array(np.zeros(volume.array.shape, np.uint8))


class AnatomicalInContext:
    """In-context segmentation of query scans with supports from other scans, aligned in physical space."""

    def __init__(self, model: InContextModel2D, supports: Sequence[SupportScan],
                 classes: Optional[Sequence[Union[str, int]]] = None, axis: str = "axial",
                 settings: Optional[InContextSettings] = None, anatomical: Optional[AnatomicalSettings] = None,
                 device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None,
                 modality: str = "auto", window: Window = DEFAULT_CT_WINDOW) -> None:
        if not supports:
            raise InputError(None, "no support examples: give at least one --support IMAGE LABELS pair")
        self.model, self.supports = model, list(supports)
        self.classes: list[SegmentInfo] = SupportSet([s.example(modality, window) for s in supports]).resolve(classes)
        self.axis, self.settings = axis, settings or InContextSettings()
        self.anatomical = anatomical or AnatomicalSettings()
        self.device, self.autocast_dtype = device, autocast_dtype
        self.modality, self.window = modality, window

    def align(self, query: Volume) -> AlignedQuery:
        """Align the supports to ``query``; a support of another modality is refused unless allowed."""
        if not self.anatomical.allow_cross_modality:
            query_modality = resolve_modality(query, self.modality)
            for scan in self.supports:
                modality = resolve_modality(scan.volume, self.modality)
                if modality != query_modality:
                    raise InputError(scan.source, f"is {modality} and the query {query_modality}: the in-context "
                                                  "model needs supports of the query's modality (use "
                                                  "--method registration, or --cross-modality to try anyway)")
        return align_supports(query, self.supports, self.model.input_size, self.axis, self.modality, self.window,
                              self.anatomical)

    def segment(self, query: Volume, uncertainty: bool = False, keep_probabilities: bool = False,
                progress: Optional[ProgressCallback] = None,
                aligned: Optional[AlignedQuery] = None) -> tuple[InContextResult, AlignedQuery]:
        """Segment ``query`` (raw intensities, its own grid); the result lies on the query's grid."""
        began = time.perf_counter()
        aligned = aligned or self.align(query)
        margin = self.anatomical.prior_margin_mm
        settings = InContextSettings(**{**self.settings.__dict__,
                                        "match_tolerance": margin if margin is not None else 1e9})
        key = (tuple(sorted(settings.__dict__.items())), tuple(c.value for c in self.classes), uncertainty)
        work = aligned.model_outputs.get(key)
        if work is None:  # the model's output on the work grid is kept: other priors reuse it
            session = InContextSession(self.model, SupportSet(aligned.examples), [c.value for c in self.classes],
                                       axis=aligned.axis, settings=settings, device=self.device,
                                       autocast_dtype=self.autocast_dtype,
                                       slice_spacing_mm=aligned.grid.spacing[2])
            work = session.segment_volume(aligned.grid.array, uncertainty=uncertainty, keep_probabilities=True,
                                          progress=progress, normalised=True)
            aligned.model_outputs[key] = work
        probabilities: dict[int, np.ndarray] = {}
        weight = self.anatomical.registration_weight
        target = _empty_like(query)
        for segment in self.classes:
            probability = work.probabilities[segment.value]
            masks = [example.labels == segment.value for example in aligned.examples]  # the aligned labels
            if weight > 0:
                probability = (1 - weight) * probability + weight * np.mean(masks, axis=0)
            if margin is not None:
                probability = probability * _prior(aligned.grid, masks, margin)
            probabilities[segment.value] = resample_onto(aligned.grid, probability.astype(np.float32), target)
        labels = most_probable(probabilities, query.array.shape, self.settings.threshold)
        spread = (None if work.uncertainty is None
                  else resample_onto(aligned.grid, work.uncertainty.astype(np.float32), target))
        candidates = [resample_onto(aligned.grid, drawn, target, nearest=True) for drawn in work.candidates]
        result = InContextResult(labels, list(self.classes), spread,
                                 probabilities if keep_probabilities else {}, candidates,
                                 time.perf_counter() - began, work.model_passes)
        return result, aligned


def registration_probability(query: Volume, supports: Sequence[SupportScan], aligned: AlignedQuery,
                             value: int) -> np.ndarray:
    """On the query grid, the share of supports whose label ``value`` covers each voxel after alignment
    (masks warped linearly, so boundaries are fractional)."""
    reference = _empty_like(query)
    total = np.zeros(query.array.shape, np.float32)
    for scan, alignment in zip(supports, aligned.alignments):
        mask = (scan.labels == value).astype(np.float32)
        if mask.any():
            total += resample_onto(scan.volume, mask, reference, alignment.transform)
    return total / max(1, len(supports))


def registration_labels(query: Volume, supports: Sequence[SupportScan], aligned: AlignedQuery,
                        classes: Sequence[SegmentInfo], threshold: float = 0.5) -> np.ndarray:
    """The registration (multi-atlas) baseline on the query grid: each support's class masks warped onto the
    query through its alignment, averaged over supports, the most probable class at or above ``threshold``."""
    probabilities = {segment.value: registration_probability(query, supports, aligned, segment.value)
                     for segment in classes}
    return most_probable(probabilities, query.array.shape, threshold)
