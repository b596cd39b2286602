"""Cross-subject in-context benchmark (``fmseg bench incontext --cross``): support and query from different
scans (:mod:`FMSegCore.bench.cross_scenarios`), Dice per structure on the whole query volume for

- ``aligned``: the in-context model with supports aligned in physical space (:mod:`.anatomical`, the default);
- ``index``: the in-context model with the old matching by relative slice index (no alignment);
- ``registration``: the support labels warped onto the query by the same alignment (multi-atlas baseline);
- ``copy``: the support labels copied through world coordinates, no alignment (the scanners' frames trusted).

and the seconds each takes per query (alignment counted once, in ``aligned`` and in ``registration``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
from FMSegCore.io.labelmap import default_segment
from FMSegCore.io.overlay import anatomical_axes
from FMSegCore.preprocessing.alignment import resample_onto

METHODS = ("aligned", "index", "registration", "copy")


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
                 anatomical: Optional[AnatomicalSettings] = None) -> dict:
    """Dice per structure and seconds of every method on one scenario."""
    structures = scenario.structures
    support = support_scan(scenario, structures)
    values = {name: scenario.support.value_of(name) for name in structures}
    query = scenario.query.volume
    settings = InContextSettings(support_size=support_size)
    out: dict = {"scenario": scenario.name, "description": scenario.description, "reported": scenario.reported,
                 "query_shape": list(query.array.shape), "query_spacing": list(query.spacing),
                 "structures": list(structures), "methods": {}}
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
        if method == "aligned":
            result, _ = engine.segment(query, aligned=aligned)
            labels = result.labels
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
        if method in ("aligned", "registration"):
            seconds += align_seconds
        scores = _scores(labels, scenario, values)
        large = [scores[n] for n in LARGE_ORGANS if n in scores]
        out["methods"][method] = {"dice": scores, "mean": float(np.mean(list(scores.values()))),
                                  "mean_large_organs": float(np.mean(large)) if large else None,
                                  "seconds": seconds}
    return out
