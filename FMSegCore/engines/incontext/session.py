"""In-context segmentation of volumes with a 2-D in-context model: one support set, many queries.

An :class:`InContextSession` prepares a support set once (support slices normalised and fitted to the model's
input size) and segments any number of query volumes or slices with it. Per class, every query slice gets
supports matched by relative position (:mod:`.slice_matching`); blocks of consecutive slices share a support set
and run as one batch. ``ensemble`` members use different support subsets and, for odd members, a mirrored
query and support (test-time augmentation); their probabilities are averaged and their spread is the
uncertainty. A stochastic model (Tyche) also draws ``candidates`` plausible segmentations per member: their
spread joins the uncertainty, and each candidate becomes a label map of its own. Classes are predicted one by one (binary) and combined into one label map, overlaps going to the
most probable class.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from FMSegCore.engines.incontext.slice_matching import (
    QueryBlock,
    SupportSlice,
    choose_supports,
    query_blocks,
    slice_position,
)
from FMSegCore.engines.incontext.support import SupportSet
from FMSegCore.engines.label_vote import LabelVote
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo
from FMSegCore.models.interfaces import (
    InContextModel2D,
    InteractiveInContextModel2D,
    PromptMaps2D,
    StochasticInContextModel2D,
)
from FMSegCore.preprocessing.intensity import DEFAULT_CT_WINDOW, Window, normalize
from FMSegCore.preprocessing.slicing import Axis, axis_index, fit_square, get_slice, put_slice, unfit_square
from FMSegCore.progress import ProgressCallback, ProgressClock


@dataclass
class SlicePromptMasks:
    """Prompts on one query slice as boolean masks on its own (row, col) grid: include and exclude clicks and
    scribbles, and a box (all False when none)."""

    include: np.ndarray
    exclude: np.ndarray
    box: np.ndarray


@dataclass
class InContextSettings:
    """How supports are matched and how many model passes are made."""

    #: support slices per query slice
    support_size: int = 8
    #: ensemble members (support subsets / mirrored copies) averaged per query slice
    ensemble: int = 1
    #: largest difference of position between a query and its supports: relative (0..1 along the axis), or in
    #: mm for supports aligned to the query (:mod:`.anatomical`, which sets it from its own margin)
    match_tolerance: float = 0.05
    #: consecutive query slices sharing one support set (one batch)
    block_slices: int = 8
    #: upper bound on queries x supports in one forward pass (memory)
    max_pairs_per_pass: int = 128
    #: probability above which a voxel belongs to a class
    threshold: float = 0.5
    seed: int = 0
    #: candidates drawn per member by a stochastic model (0: its one averaged prediction)
    candidates: int = 0


def settings_from_options(options: Any) -> InContextSettings:
    """The session's settings from the shared in-context options (:class:`FMSegCore.options.InContext`, or the
    CLI's and worker's objects with the same fields)."""
    return InContextSettings(support_size=options.support_size, ensemble=options.ensemble,
                             match_tolerance=options.tolerance, seed=options.seed, candidates=options.candidates)


@dataclass
class InContextResult:
    """A multi-label map on the query grid, its classes, and optionally the uncertainty and probabilities."""

    labels: np.ndarray
    segments: list[SegmentInfo]
    uncertainty: Optional[np.ndarray] = None
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)
    #: one label map per drawn candidate (stochastic models with ``candidates``)
    candidates: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    model_passes: int = 0


@torch.no_grad()
def predict_probabilities(model: InContextModel2D, queries: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
                          autocast_dtype: Optional[torch.dtype] = None, max_pairs_per_pass: int = 128,
                          candidates: int = 0, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Probabilities (B, H, W) of query slices (B, 1, H, W) against one support set (S, 1, H, W), and the number
    of forward passes: the support is encoded once, queries run in chunks of at most ``max_pairs_per_pass``
    query-support pairs (candidates count as pairs). With ``candidates`` = K > 0 (a
    :class:`StochasticInContextModel2D`): (K, B, H, W), drawn from a generator seeded by ``seed``."""
    chunk = max(1, max_pairs_per_pass // (images.shape[0] + candidates))
    generator = torch.Generator(device=queries.device).manual_seed(seed) if candidates else None
    out = []
    with torch.autocast(queries.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        encoded = model.encode_support(images, masks)
        for start in range(0, queries.shape[0], chunk):
            if candidates:
                logits = model.predict_candidates(queries[start:start + chunk], encoded, candidates, generator)
                out.append(torch.sigmoid(logits.float())[:, :, 0].transpose(0, 1))
            else:
                logits = model.predict(queries[start:start + chunk], encoded)
                out.append(torch.sigmoid(logits.float())[:, 0])
    return torch.cat(out, dim=-3), len(out)


class InContextSession:
    """A prepared support set and model; :meth:`segment_volume` and :meth:`segment_slice` apply it."""

    def __init__(self, model: InContextModel2D, support: SupportSet, classes: Optional[Sequence[Union[str, int]]] = None,
                 axis: Axis = 2, settings: Optional[InContextSettings] = None,
                 device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None,
                 modality: str = "auto", window: Window = DEFAULT_CT_WINDOW,
                 slice_spacing_mm: Optional[float] = None) -> None:
        """``slice_spacing_mm``: support examples and queries lie on one physical grid with this slice spacing
        (aligned supports, :mod:`.anatomical`); slices match by millimetres and ``match_tolerance`` is in mm.
        Otherwise they match by relative position along the axis."""
        self.model, self.support = model, support
        self.slice_spacing_mm = slice_spacing_mm
        self.settings = settings or InContextSettings()
        if self.settings.support_size < 1 or self.settings.ensemble < 1:
            raise InputError(None, "support size and ensemble must be at least 1")
        if self.settings.candidates < 0 or self.settings.candidates == 1:
            raise InputError(None, f"candidates must be 0 (none) or at least 2, not {self.settings.candidates}")
        if self.settings.candidates and not isinstance(model, StochasticInContextModel2D):
            raise InputError(None, "this in-context model draws no candidates (a stochastic model such as "
                                   "tyche does)")
        self.classes = support.resolve(classes)
        self.axis = axis_index(axis)
        self.device = device or next(model.parameters()).device  # type: ignore[attr-defined]
        self.autocast_dtype = autocast_dtype
        self.modality, self.window = modality, window
        self._fitted: dict[tuple[int, int], np.ndarray] = {}  # (example, slice) -> fitted image
        self._fitted_masks: dict[tuple[int, int, int], np.ndarray] = {}  # (example, slice, value) -> fitted mask
        self._slices = {segment.value: self._support_slices(segment.value) for segment in self.classes}

    # -------------------------------------------------------------------------------------------- supports

    def _support_slices(self, value: int) -> list[SupportSlice]:
        slices = []
        for number, example in enumerate(self.support.examples):
            mask = example.labels == value
            if not example.is_volume:
                if mask.any():
                    slices.append(SupportSlice(number, -1, None, float(mask.sum())))
                continue
            count = example.labels.shape[2 - self.axis]
            areas = mask.sum(axis=tuple(a for a in range(3) if a != 2 - self.axis))
            for index in np.flatnonzero(areas):
                # a single-slice example has no position along the axis: it matches every query slice
                position = slice_position(int(index), count, self.slice_spacing_mm) if count > 1 else None
                slices.append(SupportSlice(number, int(index), position, float(areas[index])))
        return slices

    def _support_arrays(self, chosen: list[SupportSlice], value: int, mirror: bool) -> tuple[torch.Tensor, ...]:
        size = self.model.input_size
        images, masks = [], []
        for item in chosen:
            example = self.support.examples[item.example]
            key = (item.example, item.index)
            if key not in self._fitted:
                image = example.image if item.index < 0 else get_slice(example.image, self.axis, item.index)
                self._fitted[key] = fit_square(image, size, "antialias")[0]
            mask_key = (item.example, item.index, value)
            if mask_key not in self._fitted_masks:
                labels = example.labels if item.index < 0 else get_slice(example.labels, self.axis, item.index)
                fitted = fit_square((labels == value).astype(np.float32), size, "antialias")[0]
                self._fitted_masks[mask_key] = np.clip(fitted, 0, 1)
            images.append(self._fitted[key])
            masks.append(self._fitted_masks[mask_key])
        image_tensor = torch.from_numpy(np.stack(images))[:, None]
        mask_tensor = torch.from_numpy(np.stack(masks))[:, None]
        if mirror:
            image_tensor, mask_tensor = image_tensor.flip(-1), mask_tensor.flip(-1)
        return image_tensor.to(self.device), mask_tensor.to(self.device)

    # ------------------------------------------------------------------------------------------ prediction

    def _predict(self, queries: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, seed: int) -> torch.Tensor:
        probabilities, passes = predict_probabilities(self.model, queries, images, masks, self.autocast_dtype,
                                                      self.settings.max_pairs_per_pass, self.settings.candidates,
                                                      seed)
        self._passes += passes
        return probabilities

    def _block_probabilities(self, block: QueryBlock, fitted_queries: np.ndarray, value: int,
                             rng: np.random.Generator) -> np.ndarray:
        """(members, B, size, size) probabilities of one block's query slices; with candidates, (members x K, B,
        size, size), member by member."""
        members = []
        queries = torch.from_numpy(fitted_queries)[:, None].to(self.device)
        for member in range(self.settings.ensemble):
            chosen = choose_supports(block.pool, block.centre, self.settings.support_size, member, rng)
            mirror = member % 2 == 1
            images, masks = self._support_arrays(chosen, value, mirror)
            seed = int(rng.integers(2**31)) if self.settings.candidates else 0
            probability = self._predict(queries.flip(-1) if mirror else queries, images, masks, seed)
            probability = (probability.flip(-1) if mirror else probability).cpu().numpy()
            members.extend(probability if self.settings.candidates else [probability])
        return np.stack(members)

    def correct_slice(self, image: np.ndarray, index: int, value: int, prompts: SlicePromptMasks,
                      previous: np.ndarray) -> np.ndarray:
        """The probability of class ``value`` on slice ``index`` (along the session's axis) of a normalised query
        volume, given prompt masks on that slice and the previous probability there; interactive in-context
        models (MultiverSeg) only. Supports as for the uncorrected slice (ensemble member 0)."""
        if not isinstance(self.model, InteractiveInContextModel2D):
            raise InputError(None, "this in-context model takes no corrections (an interactive one such as "
                                   "multiverseg does)")
        size, count = self.model.input_size, image.shape[2 - self.axis]
        query, fit = fit_square(get_slice(image, self.axis, index), size, "antialias")
        blocks = query_blocks(self._slices[value], count, self.settings.match_tolerance, 1, self.slice_spacing_mm)
        block = next((b for b in blocks if index in b.slices), None)
        pool, centre = (block.pool, block.centre) if block else (self._slices[value], None)  # none near: any
        rng = np.random.default_rng([self.settings.seed, value])
        images, masks = self._support_arrays(choose_supports(pool, centre, self.settings.support_size, 0, rng),
                                             value, False)

        def square(mask: np.ndarray) -> torch.Tensor:  # thin lines and single clicks survive the downsizing
            fitted = fit_square(np.asarray(mask, dtype=np.float32), size, "antialias")[0] > 0
            return torch.from_numpy(fitted.astype(np.float32))[None, None].to(self.device)

        odds = np.clip(fit_square(previous.astype(np.float32), size, "bilinear")[0], 1e-6, 1 - 1e-6)
        logits = np.clip(np.log(odds / (1 - odds)), -8, 8).astype(np.float32)  # MultiverSeg's mask range
        maps = PromptMaps2D(square(prompts.box), square(prompts.include), square(prompts.exclude),
                            torch.from_numpy(logits)[None, None].to(self.device))
        with torch.no_grad():
            logits = self.model.predict_with_prompts(torch.from_numpy(query)[None, None].to(self.device),
                                                     self.model.encode_support(images, masks), maps)
        return unfit_square(torch.sigmoid(logits.float())[0, 0].cpu().numpy(), fit, "bilinear")

    def segment_volume(self, volume: np.ndarray, uncertainty: bool = False, keep_probabilities: bool = False,
                       progress: Optional[ProgressCallback] = None, normalised: bool = False) -> InContextResult:
        """Segment every class in a query volume (KJI array of raw intensities, or of values already in [0, 1]
        when ``normalised``); a query one slice thick along the axis is a lone slice and takes supports from
        anywhere."""
        volume = np.asarray(volume)
        image = volume if normalised else self.normalise(volume)
        if volume.ndim == 3 and volume.shape[2 - self.axis] == 1:
            return self._segment(image, self.axis, self._position_free(), uncertainty, keep_probabilities,
                                 progress)
        return self._segment(image, self.axis, self._slices, uncertainty, keep_probabilities, progress)

    def normalise(self, volume: np.ndarray) -> np.ndarray:
        """Raw intensities in [0, 1] as the session feeds them to the model."""
        return normalize(np.asarray(volume), self.modality, self.window)

    def _position_free(self) -> dict[int, list[SupportSlice]]:
        return {value: [SupportSlice(s.example, s.index, None, s.area) for s in slices]
                for value, slices in self._slices.items()}

    def segment_slice(self, image: np.ndarray, uncertainty: bool = False) -> InContextResult:
        """Segment one 2-D query slice (raw intensities); supports from anywhere in the support examples."""
        image = np.asarray(image)
        if image.ndim != 2:
            raise InputError(None, f"the query slice must be 2-D, got {image.ndim} dimensions")
        result = self._segment(normalize(image[None], self.modality, self.window), 2, self._position_free(),
                               uncertainty, False, None)
        result.labels = result.labels[0]
        if result.uncertainty is not None:
            result.uncertainty = result.uncertainty[0]
        return result

    def _segment(self, image: np.ndarray, query_axis: int, support_slices: dict[int, list[SupportSlice]],
                 uncertainty: bool, keep_probabilities: bool,
                 progress: Optional[ProgressCallback]) -> InContextResult:
        """Segment a normalised query volume."""
        started = time.perf_counter()
        self._passes = 0
        volume = image
        if volume.ndim != 3:
            raise InputError(None, f"the query must be a 3-D volume, got {volume.ndim} dimensions")
        if uncertainty and self.settings.ensemble < 2 and not self.settings.candidates:
            raise InputError(None, "an uncertainty map needs an ensemble of at least 2 members (--ensemble 2) or "
                                   "candidates from a stochastic model (--candidates 4)")
        count = volume.shape[2 - query_axis]
        size = self.model.input_size
        fits, fitted = [], np.zeros((count, size, size), dtype=np.float32)
        for index in range(count):
            fitted[index], fit = fit_square(get_slice(image, query_axis, index), size, "antialias")
            fits.append(fit)
        vote = LabelVote(volume.shape, self.settings.threshold)
        drawn = self.settings.candidates
        candidate_votes = [LabelVote(volume.shape, self.settings.threshold) for _ in range(drawn)]
        spread = np.zeros(volume.shape, dtype=np.float32) if uncertainty else None
        result = InContextResult(vote.labels, list(self.classes), spread,
                                 candidates=[v.labels for v in candidate_votes])
        plans = [(segment, query_blocks(support_slices[segment.value], count, self.settings.match_tolerance,
                                        self.settings.block_slices, self.slice_spacing_mm))
                 for segment in self.classes]
        total, done = sum(len(blocks) for _, blocks in plans), 0
        clock = ProgressClock(progress, total)
        for segment, blocks in plans:
            rng = np.random.default_rng([self.settings.seed, segment.value])
            probability = np.zeros(volume.shape, dtype=np.float32)
            deviation = np.zeros(volume.shape, dtype=np.float32) if uncertainty else None
            per_candidate = np.zeros((drawn, *volume.shape), dtype=np.float32)
            for block in blocks:
                members = self._block_probabilities(block, fitted[block.slices], segment.value, rng)
                mean = members.mean(axis=0)
                candidate_means = members.reshape(-1, drawn, *members.shape[1:]).mean(axis=0) if drawn else None
                for row, index in enumerate(block.slices):
                    put_slice(probability, query_axis, index, unfit_square(mean[row], fits[index], "bilinear"))
                    for k in range(drawn):
                        put_slice(per_candidate[k], query_axis, index,
                                  unfit_square(candidate_means[k, row], fits[index], "bilinear"))
                    if deviation is not None:
                        std = members[:, row].std(axis=0)
                        put_slice(deviation, query_axis, index, unfit_square(std, fits[index], "bilinear"))
                done += 1
                clock(done, message=segment.name)
            vote.add(segment.value, probability)
            for k, candidate_vote in enumerate(candidate_votes):
                candidate_vote.add(segment.value, per_candidate[k])
            if spread is not None and deviation is not None:
                np.maximum(spread, deviation, out=spread)
            if keep_probabilities:
                result.probabilities[segment.value] = probability
        result.seconds, result.model_passes = time.perf_counter() - started, self._passes
        return result
