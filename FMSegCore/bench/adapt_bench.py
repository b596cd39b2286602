"""Few-shot adaptation benchmark: held-out Dice per structure of every method against zero-shot prompting.

Protocol (real scans bundled with FMSeg): for each dataset, k labelled axial slices spread evenly over the
structures' extent are the training cases; every other slice of that extent is the test set (held out: never
trained on). Dice per structure is pooled over the test slices. Baselines: LiteMedSAM zero-shot, prompted with
a tight box on every test slice around the true structure (an oracle prompt the automatic methods never get),
and full fine-tuning. Encoder outputs of the frozen stages are computed once per slice and shared between
methods, exactly as within one adaptation.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from FMSegCore.engines.adaptation.auto_learner import AutoLearner2D
from FMSegCore.engines.adaptation.auto_segment import probabilities_on_slice
from FMSegCore.engines.adaptation.cases import Structure, TrainingCase, load_case, resolve_structures
from FMSegCore.engines.adaptation.defaults import ENCODER_METHODS, FROZEN_METHODS
from FMSegCore.engines.adaptation.evaluation import DiceTotals, box_prompted_logits
from FMSegCore.engines.adaptation.methods import LEARNING_RATES, MethodSettings
from FMSegCore.engines.adaptation.prompt_learner import PromptAdaptedModel, PromptLearner2D
from FMSegCore.engines.adaptation.slice_inputs import whole_slice_window
from FMSegCore.engines.adaptation.trainer import TrainSettings, fit
from FMSegCore.engines.label_vote import labels_from_probabilities
from FMSegCore.engines.prompting.windows import extract, paste
from FMSegCore.preprocessing.slicing import mask_box_rc
from FMSegCore.zoo.cache import resources_dir

#: dataset -> (sample folder, structures)
DATASETS = {
    "ct": ("ct_abdomen_pelvis", ["liver", "spleen", "kidney_left", "kidney_right", "pancreas"]),
    "mr": ("mr_abdomen", ["liver", "spleen", "kidney_left", "kidney_right"]),
}
PROMPT_METHODS = ("decoder", "spatial-adapter")
#: Prompt-mode methods the benchmark runs unless asked for others.
DEFAULT_PROMPT_METHODS = ("decoder",)


@dataclass
class RunResult:
    """One (dataset, k, mode, method) cell: Dice per structure and the cost of training."""

    dataset: str
    shots: int
    mode: str
    method: str
    dice: dict[str, float]
    trainable: int = 0
    seconds: float = 0.0
    steps: int = 0
    peak_mb: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        values = [v for v in self.dice.values() if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")


@dataclass
class Split:
    """A dataset's volume, its structures, and the training/test slices for k shots."""

    case: TrainingCase
    structures: list[Structure]
    train: list[int]
    test: list[int]


def load_dataset(name: str) -> tuple[TrainingCase, list[Structure]]:
    folder, names = DATASETS[name]
    path = resources_dir() / "SampleData" / folder
    case = load_case(path / "image.nii.gz", path / "label.nii.gz")
    return case, resolve_structures([case], names)


def split(case: TrainingCase, structures: Sequence[Structure], shots: int) -> Split:
    """k training slices evenly over the structures' extent; the rest of the extent is the test set."""
    values = [case.value_of(s.name) for s in structures]
    extent = [i for i in range(case.labels.shape[2 - case.axis]) if np.isin(case.slice(i)[1], values).any()]
    positions = np.linspace(0, len(extent) - 1, shots + 2)[1:-1] if shots > 1 else [len(extent) / 2]
    train = sorted({extent[int(round(p))] for p in positions})
    test = [i for i in extent if i not in train]
    return Split(case, list(structures), train, test)


def slice_cases(case: TrainingCase, indices: Sequence[int]) -> list[TrainingCase]:
    """Each slice of a volume as its own 2-D training case (the volume's whole label set)."""
    cases = []
    for index in indices:
        image, labels = case.slice(index)
        cases.append(TrainingCase(image, labels, case.segments, f"{case.source}[{index}]", case.spacing, case.axis,
                                  f"{case.digest}:{index}", case.modality))
    return cases


class TestSlices:
    """The test slices of a split, with the base encoder's outputs computed once and shared by all methods."""

    def __init__(self, base: torch.nn.Module, data: Split, device: torch.device) -> None:
        self.base, self.data, self.device = base, data, device
        self.cases = slice_cases(data.case, data.test)
        self._inputs: dict[int, torch.Tensor] = {}
        self._stages: dict[tuple[int, int], torch.Tensor] = {}

    def image(self, i: int) -> torch.Tensor:
        if i not in self._inputs:
            case = self.cases[i]
            window = whole_slice_window(case, 0, self.base.input_size)
            self._inputs[i] = self.base.preprocess(extract(case.image, window).numpy())
        return self._inputs[i]

    @torch.no_grad()
    def tokens(self, i: int, stage: int) -> torch.Tensor:
        """Base encoder tokens entering ``stage`` (len(stages): the embedding); stage -1: the stem map."""
        key = (i, stage)
        if key not in self._stages:
            encoder = self.base.image_encoder
            image = self.image(i)[None].to(self.device)
            stem = encoder.forward_stem(image)
            self._stages[(i, -1)] = encoder.stem_map(stem)[0]
            x = stem
            for s in range(encoder.stem_stage + 1, len(encoder.stages)):
                self._stages[(i, s)] = x[0]
                x = encoder.run_stages(x, s, s + 1)
            self._stages[(i, len(encoder.stages))] = encoder.forward_trunk(x, len(encoder.stages))[0]
        return self._stages[key]


@torch.no_grad()
def evaluate_auto(learner: AutoLearner2D, tests: TestSlices) -> dict[str, float]:
    """Pooled Dice per structure of an automatic segmenter on the test slices."""
    root = learner.root.eval()
    structures = tests.data.structures
    totals = DiceTotals([s.name for s in structures])
    start = learner.first_trainable if not learner.frozen_encoder else len(root.encoder.stages)
    for i, case in enumerate(tests.cases):
        image = tests.image(i)[None].to(tests.device)
        stem_map = tests.tokens(i, -1)[None]
        if learner.frozen_encoder:
            embedding = tests.tokens(i, start)[None]
        else:
            embedding, _ = root.features(tokens=tests.tokens(i, max(start, root.encoder.stem_stage + 1))[None],
                                         start=max(start, root.encoder.stem_stage + 1), stem_map=stem_map)
        logits = root.head(embedding, stem_map, image)[0]
        window = whole_slice_window(case, 0, root.input_size)
        probabilities = probabilities_on_slice(logits, window, case.image.shape)
        labels = labels_from_probabilities(probabilities, [s.value for s in structures])
        for s in structures:
            totals.add(s.name, labels == s.value, case.labels == case.value_of(s.name))
    return totals.result()


@torch.no_grad()
def evaluate_prompted(model: PromptAdaptedModel, tests: TestSlices) -> dict[str, float]:
    """Pooled Dice per structure with a tight box around the truth on every test slice (frozen encoder)."""
    model.eval()
    totals = DiceTotals([s.name for s in tests.data.structures])
    for i, case in enumerate(tests.cases):
        window = whole_slice_window(case, 0, model.input_size)
        embedding = model.embedding_adapter(tests.tokens(i, len(tests.base.image_encoder.stages))[None])
        for s in tests.data.structures:
            truth = case.labels == case.value_of(s.name)
            box = mask_box_rc(truth)
            if box is not None:
                logits = box_prompted_logits(model, embedding, window, box)
                totals.add(s.name, paste(logits, window, truth.shape).numpy() > 0, truth)
    return totals.result()


def resident_mb() -> float:
    """This process's resident memory (MB; Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def _train(learner, method: str, steps: int, device: torch.device) -> tuple[float, int, float]:
    """Train with a fixed budget (every method gets the same steps); seconds, steps, peak memory growth (MB)."""
    settings = TrainSettings(steps=steps, patience=steps)
    before = resident_mb()
    peak = [before]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    result = fit(learner, settings, LEARNING_RATES[method], device,
                 arena_lambda=1e-3 if method == "arena" else 0.0,
                 progress=lambda _p: peak.append(resident_mb()))
    seconds = time.perf_counter() - began
    if device.type == "cuda":
        return seconds, result.steps, torch.cuda.max_memory_allocated(device) / 1e6
    return seconds, result.steps, max(peak) - before


def run_benchmark(base: torch.nn.Module, datasets: Sequence[str], shots: Sequence[int], device: torch.device,
                  steps: int = 150, encoder_steps: int = 40, encoder_shots: Sequence[int] = (5,),
                  encoder_datasets: Sequence[str] = ("ct",), methods: Optional[Sequence[str]] = None,
                  prompt_shots: Sequence[int] = (5,), prompt_methods: Sequence[str] = DEFAULT_PROMPT_METHODS,
                  report: Optional[Callable[[RunResult], None]] = None) -> list[RunResult]:
    """Every cell of the benchmark; ``report`` sees each result as it comes."""
    results: list[RunResult] = []
    wanted = set(methods) if methods else None

    def emit(result: RunResult) -> None:
        results.append(result)
        if report is not None:
            report(result)

    for name in datasets:
        case, structures = load_dataset(name)
        for k in shots:
            data = split(case, structures, k)
            tests = TestSlices(base, data, device)
            train_cases = slice_cases(case, data.train)
            if k == shots[0]:  # scored on this k's test set, which ``test_shots`` records
                zero = PromptAdaptedModel(base)
                emit(RunResult(name, 0, "prompt", "zero-shot (box)", evaluate_prompted(zero, tests),
                               extra={"test_shots": k}))
            features: dict = {}
            for method in FROZEN_METHODS + ENCODER_METHODS:
                if wanted is not None and method not in wanted:
                    continue
                encoder_method = method in ENCODER_METHODS
                if encoder_method and (k not in encoder_shots or name not in encoder_datasets):
                    continue
                torch.manual_seed(0)
                learner = AutoLearner2D(copy.deepcopy(base), train_cases, structures, MethodSettings(method), device,
                                        feature_cache=features)
                n = encoder_steps if encoder_method else steps
                seconds, done, peak = _train(learner, method, n, device)
                emit(RunResult(name, k, "auto", method, evaluate_auto(learner, tests), learner.report.trainable,
                               seconds, done, peak))
            prompt_features: dict = {}
            for method in prompt_methods:
                if k not in prompt_shots or (wanted is not None and method not in wanted):
                    continue
                torch.manual_seed(0)
                learner = PromptLearner2D(copy.deepcopy(base), train_cases, structures, MethodSettings(method),
                                          device, feature_cache=prompt_features)
                seconds, done, peak = _train(learner, method, steps, device)
                emit(RunResult(name, k, "prompt", method, evaluate_prompted(learner.root, tests),
                               learner.report.trainable, seconds, done, peak))
    return results
