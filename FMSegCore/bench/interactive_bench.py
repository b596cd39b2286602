"""``fmseg bench prompt --protocol interactive``: the CVPR 2025 interactive 3-D protocol on labelled scans.

Per structure, each session starts from one prompt generated from the reference label map and is then
corrected by up to N clicks, each at the most interior voxel of the largest 3-D error region (include where
structure is missed, exclude where it is over-segmented):

- ``roi_3d``: one 3-D box (the structure's bounding box), then corrections;
- ``click``: one include click at the structure's most interior voxel (in 3-D), then corrections;
- ``box_2d_largest``: one tight 2-D box on the slice where the structure is largest, no corrections;
- ``scribble`` (on request): one include scribble on the click's slice, along the medial axis of the structure's
  section there (:mod:`FMSegCore.bench.simulated_curves`), then corrections: what a scribble adds over one click;
- ``lasso`` (on request): one include lasso around that section (its convex hull, 2 pixels out), no corrections.

Figures: Dice after each interaction, Dice-AUC (the mean of the Dice curve over the interactions, trapezoid),
final Dice and seconds per interaction. Cases are split into the development set (the bundled scans, on
which rules and defaults were chosen) and held-out scans (never used to choose anything), reported apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from FMSegCore.bench.metrics import dice
from FMSegCore.bench.prompt_bench import corrective_click, interior_voxel
from FMSegCore.bench.simulated_curves import scribble_on_slice
from FMSegCore.preprocessing.slicing import bounding_box_2d
from FMSegCore.prompts import BoxPrompt, PointPrompt, SegmentPrompts

INTERACTIVE_PROTOCOLS = ("roi_3d", "click", "box_2d_largest", "scribble", "lasso")
#: the protocols run unless others are asked for
DEFAULT_PROTOCOLS = ("roi_3d", "click", "box_2d_largest")
#: protocols followed by corrective clicks
CORRECTED = ("roi_3d", "click", "scribble")


@dataclass
class InteractiveResult:
    """One structure, one engine, one protocol: the Dice after each interaction and its seconds."""

    case: str
    split: str  # "development" or "held-out"
    structure: str
    voxels: int
    engine: str
    protocol: str
    curve: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.curve[-1]

    @property
    def auc(self) -> float:
        return dice_auc(self.curve)

    def as_dict(self) -> dict:
        return {**self.__dict__, "final": self.final, "auc": self.auc}


def dice_auc(curve: Sequence[float]) -> float:
    """The area under the Dice-per-interaction curve, normalised to [0, 1] (trapezoid; one point: itself)."""
    if len(curve) == 1:
        return float(curve[0])
    values = np.asarray(curve, dtype=float)
    return float(((values[1:] + values[:-1]) / 2).mean())


def first_prompts(name: str, reference: np.ndarray,
                  protocols: Sequence[str] = DEFAULT_PROTOCOLS) -> dict[str, SegmentPrompts]:
    """Each protocol's first prompt for one structure (KJI reference mask), in the order asked for. The click,
    the scribble and the lasso lie on one slice: that of the structure's most interior voxel."""
    kk, jj, ii = np.nonzero(reference)
    roi = BoxPrompt((ii.min(), jj.min(), kk.min()), (ii.max(), jj.max(), kk.max()))
    k, j, i = interior_voxel(reference)
    largest = int(np.argmax(reference.sum(axis=(1, 2))))
    (r0, c0), (r1, c1) = bounding_box_2d(reference[largest])
    makers = {
        "roi_3d": lambda: SegmentPrompts(name, boxes=[roi]),
        "click": lambda: SegmentPrompts(name, points=[PointPrompt((float(i), float(j), float(k)), include=True)]),
        "box_2d_largest": lambda: SegmentPrompts(name, boxes=[BoxPrompt((c0, r0, largest), (c1, r1, largest))]),
        "scribble": lambda: SegmentPrompts(name, curves=[scribble_on_slice(reference, k, j, i)]),
        "lasso": lambda: SegmentPrompts(name, curves=[scribble_on_slice(reference, k, j, i, closed=True)]),
    }
    return {protocol: makers[protocol]() for protocol in protocols}


def run_protocol(segment: Callable[[SegmentPrompts], np.ndarray], prompts: SegmentPrompts, reference: np.ndarray,
                 corrections: int) -> tuple[list[float], list[float]]:
    """Dice after the first prompt and after each corrective click, and the seconds each interaction took."""
    curve, seconds = [], []
    prediction = None
    for _ in range(corrections + 1):
        if prediction is not None:
            click = corrective_click(prediction, reference)
            if click is None:
                break
            prompts = SegmentPrompts(prompts.name, boxes=prompts.boxes, points=[*prompts.points, click],
                                     curves=prompts.curves)
        began = time.perf_counter()
        prediction = segment(prompts)
        seconds.append(time.perf_counter() - began)
        curve.append(dice(prediction, reference))
    return curve, seconds


def bench_structure(engines: dict[str, Callable[[SegmentPrompts], np.ndarray]], case: str, split: str, name: str,
                    reference: np.ndarray, corrections: int = 5,
                    protocols: Sequence[str] = DEFAULT_PROTOCOLS) -> list[InteractiveResult]:
    """Every protocol asked for with every engine on one structure."""
    results = []
    for protocol, prompts in first_prompts(name, reference, protocols).items():
        for engine, segment in engines.items():
            curve, seconds = run_protocol(segment, prompts, reference, corrections if protocol in CORRECTED else 0)
            results.append(InteractiveResult(case, split, name, int(reference.sum()), engine, protocol, curve,
                                             seconds))
    return results


def summarise(results: Sequence[InteractiveResult]) -> dict:
    """Mean first, final and AUC Dice and seconds per interaction, by split, engine and protocol."""
    table: dict = {}
    for r in results:
        table.setdefault(r.split, {}).setdefault(r.engine, {}).setdefault(r.protocol, []).append(r)
    summary: dict = {}
    for split, engines in table.items():
        for engine, protocols in engines.items():
            for protocol, rows in protocols.items():
                summary.setdefault(split, {}).setdefault(engine, {})[protocol] = {
                    "structures": len(rows),
                    "first_dice": float(np.mean([r.curve[0] for r in rows])),
                    "final_dice": float(np.mean([r.final for r in rows])),
                    "dice_auc": float(np.mean([r.auc for r in rows])),
                    "seconds_first": float(np.mean([r.seconds[0] for r in rows])),
                    "seconds_per_click": float(np.mean([s for r in rows for s in r.seconds[1:]] or [np.nan])),
                }
    return summary
