"""Cross-subject in-context benchmark (``fmseg bench incontext --cross``): support and query from different
scans (:mod:`FMSegCore.bench.cross_scenarios`), Dice per structure on the whole query volume for

- ``aligned``: the in-context model with supports aligned in physical space (:mod:`.anatomical`, the default
  settings: spatial prior and registration prior);
- ``aligned_model_only``: the same model output without the registration prior (spatial prior kept);
- ``aligned_wW``: the same model output mixed with the warped labels at weight W (``(1 - W) model + W warped``);
- ``index``: the in-context model with the old matching by relative slice index (no alignment);
- ``registration``: the support labels warped onto the query by the same alignment (multi-atlas baseline);
- ``copy``: the support labels copied through world coordinates, no alignment (the scanners' frames trusted).

and the seconds each takes per query (alignment counted once, in ``aligned`` and in ``registration``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from FMSegCore.bench.cross_scenarios import LARGE_ORGANS, Scenario
from FMSegCore.bench.metrics import dice
from FMSegCore.engines.incontext.anatomical import (
    AnatomicalInContext,
    AnatomicalSettings,
    registration_labels,
    resolve_modality,
)
from FMSegCore.engines.incontext.session import InContextSession, InContextSettings
from FMSegCore.engines.incontext.support import SupportScan, SupportSet
from FMSegCore.engines.label_vote import most_probable
from FMSegCore.io.labelmap import default_segment
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.preprocessing.alignment import resample_onto

METHODS = ("aligned", "aligned_model_only", "aligned_w0.25", "aligned_w0.5", "index", "registration", "copy")


def support_scan(scenario: Scenario, structures: Sequence[str]) -> SupportScan:
    """The scenario's support as a support scan holding only the scored structures."""
    scan = scenario.support
    labels = np.zeros(scan.labels.shape, np.int32)
    segments = []
    for name in structures:
        value = scan.value_of(name)
        labels[scan.labels == value] = value
        segments.append(default_segment(value, name))
    return SupportScan(scan.volume, labels, segments, scan.name)


def _scores(labels: np.ndarray, scenario: Scenario, values: dict[str, int]) -> dict[str, float]:
    return {name: dice(labels == values[name], scenario.query.mask(name)) for name in values}


def run_scenario(model, scenario: Scenario, methods: Sequence[str] = METHODS, support_size: int = 8,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 anatomical: Optional[AnatomicalSettings] = None, preview: Optional[Path] = None) -> dict:
    """Dice per structure and seconds of every method on one scenario (and an overlay PNG of the aligned
    model's result when ``preview`` is given)."""
    structures = scenario.structures
    support = support_scan(scenario, structures)
    values = {name: scenario.support.value_of(name) for name in structures}
    query = scenario.query.volume
    settings = InContextSettings(support_size=support_size)
    anatomical = anatomical or AnatomicalSettings(allow_cross_modality=True)  # CT <-> MR is measured, not refused
    out: dict = {"scenario": scenario.name, "description": scenario.description, "reported": scenario.reported,
                 "query_shape": list(query.array.shape), "query_spacing": list(query.spacing),
                 "structures": list(structures), "methods": {},
                 "aligned_settings": {"prior_margin_mm": anatomical.prior_margin_mm,
                                      "registration_weight": anatomical.registration_weight}}
    engine = AnatomicalInContext(model, [support], [values[n] for n in structures], settings=settings,
                                 anatomical=anatomical, device=device, autocast_dtype=dtype,
                                 modality="auto")
    began = time.perf_counter()
    aligned = engine.align(query)
    align_seconds = time.perf_counter() - began
    alignment = aligned.alignments[0]
    out["alignment"] = {"seconds": align_seconds, "body_dice": alignment.body_dice, "overlap": alignment.overlap,
                        "metric": alignment.metric, "stages": list(alignment.stages)}
    for method in methods:
        began = time.perf_counter()
        if method == "aligned_model_only" or method.startswith("aligned_w"):
            weight = 0.0 if method == "aligned_model_only" else float(method[len("aligned_w"):])
            alone = AnatomicalSettings(**{**engine.anatomical.__dict__, "registration_weight": weight})
            model_only = AnatomicalInContext(model, [support], [values[n] for n in structures], settings=settings,
                                             anatomical=alone, device=device, autocast_dtype=dtype)
            labels = model_only.segment(query, aligned=aligned)[0].labels
        elif method == "aligned":
            result, _ = engine.segment(query, aligned=aligned)
            labels = result.labels
            if preview is not None:
                from FMSegCore.io.overlay import write_overlay_png

                preview.parent.mkdir(parents=True, exist_ok=True)
                write_overlay_png(query, labels, {values[n]: n for n in structures}, preview)
        elif method == "registration":
            labels = registration_labels(query, [support], aligned, engine.classes)
        elif method == "copy":
            labels = resample_onto(support.volume, support.labels, query, nearest=True)
        elif method == "index":
            modality = resolve_modality(support.volume, "auto")
            session = InContextSession(model, SupportSet([support.example(modality)]), [values[n] for n in structures],
                                       axis=anatomical_axes(query.direction)[2], settings=settings, device=device,
                                       autocast_dtype=dtype, modality=resolve_modality(query, "auto"))
            labels = session.segment_volume(query.array).labels
        else:
            raise KeyError(method)
        seconds = time.perf_counter() - began
        if method.startswith("aligned") or method == "registration":
            seconds += align_seconds  # (aligned_* variants reuse the model's output: their model time is aligned's)
        scores = _scores(labels, scenario, values)
        large = [scores[n] for n in LARGE_ORGANS if n in scores]
        out["methods"][method] = {"dice": scores, "mean": float(np.mean(list(scores.values()))),
                                  "mean_large_organs": float(np.mean(large)) if large else None,
                                  "seconds": seconds}
    return out


def prior_sweep(model, scenario: Scenario, margins: Sequence[Optional[float]],
                weights: Sequence[float] = (0.0,), support_size: int = 8, device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> dict:
    """Mean Dice of the aligned model for each spatial-prior margin (None: no prior) and each weight of the
    registration prior, on one scenario; for choosing defaults on development scenarios. The model runs once
    without a prior; each margin then keeps a class only within that distance (mm, on the query grid) of the
    support labels warped by the alignment, and each weight ``w`` mixes ``(1 - w) * model + w * warped``."""
    from scipy import ndimage

    structures = scenario.structures
    support = support_scan(scenario, structures)
    values = {name: scenario.support.value_of(name) for name in structures}
    query = scenario.query.volume
    engine = AnatomicalInContext(model, [support], [values[n] for n in structures],
                                 settings=InContextSettings(support_size=support_size),
                                 anatomical=AnatomicalSettings(prior_margin_mm=None, registration_weight=0.0,
                                                               allow_cross_modality=True),
                                 device=device,
                                 autocast_dtype=dtype)
    aligned = engine.align(query)
    result, _ = engine.segment(query, keep_probabilities=True, aligned=aligned)
    spacing = query.spacing[::-1]
    distances, warped = {}, {}
    nearest = resample_onto(support.volume, support.labels, query, aligned.alignments[0].transform, nearest=True)
    for segment in engine.classes:
        warped[segment.value] = (nearest == segment.value).astype(np.float32)  # as the engine mixes them
        inside = warped[segment.value] >= 0.5
        distances[segment.value] = (ndimage.distance_transform_edt(~inside, sampling=spacing) if inside.any()
                                    else np.full(query.array.shape, np.inf, np.float32))
    rows = []
    for margin in margins:
        for weight in weights:
            kept = {}
            for value, probability in result.probabilities.items():
                mixed = (1 - weight) * probability + weight * warped[value]
                kept[value] = mixed * (distances[value] <= margin) if margin is not None else mixed
            scores = _scores(most_probable(kept, query.array.shape, 0.5), scenario, values)
            rows.append({"margin_mm": margin, "registration_weight": weight,
                         "mean": float(np.mean(list(scores.values()))), "dice": scores})
    return {"scenario": scenario.name, "rows": rows}


def time_large_alignment(shape: tuple[int, int, int] = (300, 512, 512)) -> dict:
    """Seconds to align the bundled CT (support) to a copy of it resampled to ``shape`` (KJI), the size of a
    typical diagnostic CT."""
    from FMSegCore.bench.cross_scenarios import sample_scan, shifted_copy
    from FMSegCore.preprocessing.alignment import align

    ct = sample_scan("ct_abdomen_pelvis")
    extent = np.array(ct.volume.shape_ijk, float) * np.array(ct.volume.spacing)
    spacing = extent / np.array(shape[::-1], float)
    query = shifted_copy(ct, spacing=tuple(spacing), flip_lr=True)
    began = time.perf_counter()
    alignment = align(ct.volume, query.volume, "CT", "CT")
    return {"shape": list(query.volume.array.shape), "seconds": time.perf_counter() - began,
            "body_dice": alignment.body_dice, "threads": torch.get_num_threads()}
