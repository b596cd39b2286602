"""Cross-subject benchmark of automatic adapters: trained on one whole labelled scan, tested on other scans.

Scenarios come from :mod:`FMSegCore.bench.cross_scenarios` (support = the training scan, query = the test
scan, structures matched by name). Each adapter is trained with ``fmseg adapt``'s defaults through
:func:`~FMSegCore.engines.adaptation.engine.adapt`, saved, rebuilt as ``fmseg segment`` rebuilds it and run on the
whole query volume; Dice per structure is computed on the whole query volume. Pipelines: ``physical`` (the
physical-units geometry, canonical orientation and augmented views) and ``whole-slice`` (the pipeline before it:
each whole slice as stored, no augmentation), same method and steps. The query is normalised as its own
modality in both (a CT window on an MR would be meaningless).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from FMSegCore.bench.cross_scenarios import LARGE_ORGANS, LabelledScan, build_scenario
from FMSegCore.bench.metrics import dice
from FMSegCore.engines.adaptation.adapter_file import load_adapter, save_adapter
from FMSegCore.engines.adaptation.auto_segment import segment_with_adapter
from FMSegCore.engines.adaptation.cases import TrainingCase, case_from_arrays, resolve_structures
from FMSegCore.engines.adaptation.defaults import METHODS
from FMSegCore.engines.adaptation.engine import AdaptationResult, adapt, build_adapted, train_settings
from FMSegCore.engines.adaptation.geometry import SliceGeometry
from FMSegCore.engines.adaptation.methods import MethodSettings
from FMSegCore.io.labelmap import default_segment
from FMSegCore.io.orientation import anatomical_axes

PIPELINES = ("physical", "whole-slice")
#: Training scan -> the reported scenarios its adapter is tested on.
REPORTED_BY_SUPPORT = {"ct_abdomen_pelvis": ("fov_shift", "ct_to_mr"), "mr_abdomen": ("mr_to_ct",)}


@dataclass
class CrossResult:
    """One adapter on one query: Dice per structure and the seconds to train and to segment."""

    scenario: str
    support: str
    query: str
    method: str
    pipeline: str
    dice: dict[str, float]
    train_seconds: float
    segment_seconds: float
    steps: int
    batch_size: int
    views: int
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return _mean(self.dice.values())

    @property
    def mean_large(self) -> float:
        """Mean Dice over the large organs (liver, spleen, kidneys, stomach, aorta) scored here."""
        return _mean(v for k, v in self.dice.items() if k in LARGE_ORGANS)


def _mean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def scan_case(scan: LabelledScan) -> TrainingCase:
    """A labelled scan as one training case (its whole label set, its direction)."""
    volume = scan.volume
    segments = [default_segment(value, name) for value, name in scan.names.items()]
    axis = anatomical_axes(volume.direction)[2]
    return case_from_arrays(volume.array, scan.labels, segments, scan.name, volume.spacing, axis, scan.modality,
                            direction=volume.direction)


def train(base: tuple[torch.nn.Module, str], case: TrainingCase, structures: Sequence[str], method: str,
          pipeline: str, device: torch.device) -> AdaptationResult:
    """An automatic adapter at ``fmseg adapt``'s defaults for ``method`` (physical or whole-slice pipeline)."""
    model, digest = base
    settings = train_settings("auto", method)
    geometry = SliceGeometry() if pipeline == "physical" else None
    torch.manual_seed(settings.seed)
    return adapt("litemedsam", "auto", [case], resolve_structures([case], list(structures)),
                 MethodSettings(method), settings, device, modality=case.modality,
                 base=(copy.deepcopy(model), digest), geometry=geometry)


def score(result: AdaptationResult, query: LabelledScan, structures: Sequence[str],
          device: torch.device) -> tuple[dict[str, float], float]:
    """Dice per structure of an adapter on a whole query volume, rebuilt as ``fmseg segment`` does; seconds to
    segment (model rebuilt from the adapter file included)."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_adapter(Path(folder) / "bench.fmseg-adapter.pt", result.metadata, result.state)
        began = time.perf_counter()
        adapter = load_adapter(path)
        model = build_adapted(adapter, device)
        labels = segment_with_adapter(model, adapter.metadata, query.volume, device, modality=query.modality)
        seconds = time.perf_counter() - began
    values = {s["name"]: int(s["value"]) for s in adapter.metadata["structures"]}
    return {name: dice(labels == values[name], query.mask(name)) for name in structures}, seconds


def scored_structures(scenario, wanted: Sequence[str] = LARGE_ORGANS) -> list[str]:
    """The structures a scenario is scored on: the wanted ones labelled in both its scans."""
    return [name for name in scenario.structures if name in wanted]


def run_cross(base: tuple[torch.nn.Module, str], scenarios: Sequence[str], methods: Sequence[str],
              pipelines: Sequence[str], device: torch.device,
              report: Optional[Callable[[CrossResult], None]] = None,
              wanted: Sequence[str] = LARGE_ORGANS) -> list[CrossResult]:
    """Train one adapter per (support scan, method, pipeline) on the union of its scenarios' structures (the
    ``wanted`` ones: by default the large organs); score it on each scenario's query."""
    built = {name: build_scenario(name) for name in scenarios}
    by_support: dict[str, list[str]] = {}
    for name, scenario in built.items():
        by_support.setdefault(scenario.support.name, []).append(name)
    results: list[CrossResult] = []
    for support, names in by_support.items():
        scan = built[names[0]].support
        case = scan_case(scan)
        union = list(dict.fromkeys(s for name in names for s in scored_structures(built[name], wanted)))
        for method in methods:
            for pipeline in pipelines:
                result = train(base, case, union, method, pipeline, device)
                for name in names:
                    scenario = built[name]
                    scores, seconds = score(result, scenario.query, scored_structures(scenario, wanted), device)
                    cell = CrossResult(name, support, scenario.query.name, method, pipeline, scores,
                                       round(result.fit.seconds, 1), round(seconds, 1), result.fit.steps,
                                       result.metadata["training"]["batch_size"], result.metadata.get("views", 0),
                                       {"structures_trained": len(union), "trainable": result.report.trainable})
                    results.append(cell)
                    if report is not None:
                        report(cell)
    return results


@dataclass
class TimingResult:
    """One method at its defaults on a whole labelled volume: seconds to train (encoder features and the head's
    warm-up included), and Dice per structure on one other scan when one is given."""

    method: str
    seconds: float
    steps: int
    batch_size: int
    views: int
    trainable: int
    structures: int
    head_steps: int = 0
    scenario: str = ""
    dice: dict[str, float] = field(default_factory=dict)

    @property
    def mean_large(self) -> float:
        return _mean(v for k, v in self.dice.items() if k in LARGE_ORGANS)


def run_timing(base: tuple[torch.nn.Module, str], support: LabelledScan, structures: Sequence[str],
               device: torch.device, methods: Sequence[str] = METHODS,
               report: Optional[Callable[[TimingResult], None]] = None,
               scenario=None) -> list[TimingResult]:
    """Train every method at ``fmseg adapt``'s defaults on all annotated slices of one volume; seconds each, and
    Dice on ``scenario``'s query when given."""
    case = scan_case(support)
    results = []
    for method in methods:
        result = train(base, case, structures, method, "physical", device)
        scores = score(result, scenario.query, scored_structures(scenario), device)[0] if scenario else {}
        cell = TimingResult(method, round(result.fit.seconds, 1), result.fit.steps,
                            result.metadata["training"]["batch_size"], result.metadata.get("views", 0),
                            result.report.trainable, len(structures), result.metadata["fit"].get("head_steps", 0),
                            scenario.name if scenario else "", scores)
        results.append(cell)
        if report is not None:
            report(cell)
    return results
