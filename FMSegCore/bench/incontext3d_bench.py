"""3-D in-context benchmark (``fmseg bench incontext3d``): the 3-D in-context model (:mod:`FMSegCore.models.iris`)
on the cross-subject scenarios of :mod:`FMSegCore.bench.cross_scenarios`, beside the 2-D in-context path and the
registration baseline on the same cases.

Per scenario: Dice per structure of

- ``3d``: a task created from the scenario's reference (one reference volume), applied to the query;
- ``3d_refs2``: (brain only) a task from two references, the scenario's and a second brain template with the same
  atlas;
- ``2d_aligned``: the 2-D in-context path as ``fmseg incontext`` runs it (supports aligned to the query);
- ``registration``: the reference's labels warped onto the query by the same alignment (multi-atlas baseline);

with seconds to create the task, seconds to apply it, and the process's peak memory. ``large`` applies a task
made on the bundled CT to that CT resampled to 512 x 512 x 300 (10 classes): the seconds once the task exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

from FMSegCore.bench.cross_scenarios import LARGE_ORGANS, Scenario, brain_scan
from FMSegCore.bench.metrics import dice
from FMSegCore.io.labelmap import SegmentInfo, default_segment
from FMSegCore.io.volume import Volume

if TYPE_CHECKING:
    import torch

# Light at import (the command's --help lists SCENARIOS and METHODS): torch and the models load when it runs.

#: Scenarios reported (the query is a subject the 3-D model never saw in training, except in ``ct_to_mr``:
#: the MR abdomen is a training volume of both in-context models, so that row is marked ``query_trained``).
SCENARIOS = ("fov_shift", "mr_to_ct", "ct_to_mr", "brain_cross")
METHODS = ("3d", "3d_refs2", "2d_aligned", "registration")
#: A second reference for the brain scenario: another training template with the scenario's (held-out) atlas.
SECOND_BRAIN_REFERENCE = ("icbm2009a_skull", "neuromorphometrics")
QUERY_TRAINED = {"ct_to_mr"}


def _classes(scenario: Scenario) -> list[SegmentInfo]:
    return [default_segment(scenario.support.value_of(n), n) for n in scenario.structures]


def _reference(scan, structures: Sequence[str], values: dict[str, int]) -> tuple[Volume, Volume]:
    """A reference scan and a label volume holding only ``structures``, relabelled to ``values``."""
    labels = np.zeros(scan.labels.shape, np.int32)
    for name in structures:
        own = scan.value_of(name)
        if own is not None:
            labels[scan.labels == own] = values[name]
    return scan.volume, scan.volume.with_array(labels)


def _scores(labels: np.ndarray, scenario: Scenario, values: dict[str, int]) -> dict[str, float]:
    return {name: dice(labels == values[name], scenario.query.mask(name)) for name in values}


def _summary(scores: dict[str, float], seconds: dict[str, float]) -> dict:
    large = [scores[n] for n in LARGE_ORGANS if n in scores]
    return {"dice": scores, "mean": float(np.mean(list(scores.values()))),
            "mean_large_organs": float(np.mean(large)) if large else None, **seconds}


def run_3d(model, scenario: Scenario, extra_references: Sequence = (), modality: str = "auto") -> dict:
    """Task creation and application of the 3-D model on one scenario: Dice and seconds."""
    from FMSegCore.engines.incontext.volume3d import apply_task, create_task

    classes = _classes(scenario)
    values = {name: segment.value for name, segment in zip(scenario.structures, classes)}
    references = [_reference(scenario.support, scenario.structures, values)]
    references += [_reference(scan, scenario.structures, values) for scan in extra_references]
    began = time.perf_counter()
    task = create_task(model, references, classes, modality=modality)
    created = time.perf_counter() - began
    began = time.perf_counter()
    labels = apply_task(model, task, scenario.query.volume, classes, modality=modality).labels
    applied = time.perf_counter() - began
    return _summary(_scores(labels, scenario, values), {"seconds_task": created, "seconds_apply": applied,
                                                        "references": len(references)})


def run_baselines(model_2d, scenario: Scenario, device: torch.device) -> dict[str, dict]:
    """The 2-D in-context path (aligned supports, the default settings) and the registration baseline."""
    from FMSegCore.bench.incontext_cross_bench import run_scenario

    out = run_scenario(model_2d, scenario, methods=("aligned", "registration"), device=device)
    renamed = {"aligned": "2d_aligned", "registration": "registration"}
    return {renamed[m]: {"dice": row["dice"], "mean": row["mean"], "mean_large_organs": row["mean_large_organs"],
                         "seconds_apply": row["seconds"]} for m, row in out["methods"].items()}


def bench_scenario(model_3d, model_2d, scenario: Scenario, methods: Sequence[str], device: torch.device) -> dict:
    """Every method on one scenario."""
    out: dict = {"scenario": scenario.name, "description": scenario.description,
                 "query_trained": scenario.name in QUERY_TRAINED, "structures": list(scenario.structures),
                 "query_shape": list(scenario.query.volume.array.shape), "methods": {}}
    if "3d" in methods:
        out["methods"]["3d"] = run_3d(model_3d, scenario)
    if "3d_refs2" in methods and scenario.name == "brain_cross":
        out["methods"]["3d_refs2"] = run_3d(model_3d, scenario, [brain_scan(*SECOND_BRAIN_REFERENCE)])
    if model_2d is not None and {"2d_aligned", "registration"} & set(methods):
        out["methods"].update({m: row for m, row in run_baselines(model_2d, scenario, device).items()
                               if m in methods})
    from FMSegCore.bench.prompt_bench import peak_memory_mb

    out["peak_memory_mb"] = peak_memory_mb()
    return out


def time_large(model_3d, classes: int = 10) -> dict:
    """A task from the bundled CT (``classes`` abdominal structures) applied to the CT resampled to
    512 x 512 x 300: seconds to create and to apply, and the Dice of the large copy."""
    import torch

    from FMSegCore.bench.cross_scenarios import ABDOMEN_STRUCTURES, sample_scan
    from FMSegCore.bench.prompt_bench import large_case, peak_memory_mb
    from FMSegCore.engines.incontext.volume3d import apply_task, create_task
    from FMSegCore.zoo.cache import resources_dir

    ct = sample_scan("ct_abdomen_pelvis")
    names = [n for n in ABDOMEN_STRUCTURES if ct.value_of(n) is not None][:classes]
    segments = [default_segment(ct.value_of(n), n) for n in names]
    began = time.perf_counter()
    task = create_task(model_3d, [(ct.volume, ct.volume.with_array(ct.labels))], segments)
    created = time.perf_counter() - began
    big, labels, _ = large_case(resources_dir() / "SampleData" / "ct_abdomen_pelvis")
    began = time.perf_counter()
    result = apply_task(model_3d, task, big, segments).labels
    applied = time.perf_counter() - began
    scores = {n: dice(result == s.value, labels == s.value) for n, s in zip(names, segments)}
    return {"shape_kji": list(big.array.shape), "classes": len(segments), "seconds_task": created,
            "seconds_apply": applied, "mean_dice": float(np.mean(list(scores.values()))), "dice": scores,
            "threads": torch.get_num_threads(), "peak_memory_mb": peak_memory_mb()}


def run_bench(scenarios: Sequence[str], methods: Sequence[str], device: torch.device, model_name: str,
              large: bool = False, log: Optional[Callable[[str], None]] = print) -> dict:
    """The whole benchmark; figures as a JSON-ready dict."""
    import torch

    from FMSegCore.bench.cross_scenarios import build_scenario
    from FMSegCore.models.factory import load_model
    from FMSegCore.zoo.registry import DEFAULT_INCONTEXT

    model_3d = load_model(model_name, device)
    model_2d = load_model(DEFAULT_INCONTEXT, device) if {"2d_aligned", "registration"} & set(methods) else None
    figures: dict = {"device": str(device), "model": model_name, "threads": torch.get_num_threads(),
                     "scenarios": []}
    for name in scenarios:
        row = bench_scenario(model_3d, model_2d, build_scenario(name), methods, device)
        figures["scenarios"].append(row)
        if log:
            log(f"{name}: " + ", ".join(f"{m} {r['mean']:.3f}" for m, r in row["methods"].items()))
    if large:
        figures["large"] = time_large(model_3d)
        if log:
            big = figures["large"]
            log(f"512x512x300 CT, {big['classes']} classes: task {big['seconds_task']:.1f} s, "
                f"apply {big['seconds_apply']:.1f} s, mean Dice {big['mean_dice']:.3f}")
    return figures
