"""Scoring adapted models on labelled slices: the adapter's validation figures and the benchmark share it.

Dice per structure is pooled over slices (intersections and sizes summed first), so a structure's score does not
depend on how many slices it happens to cross.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import nn

from FMSegCore.engines.adaptation.auto_segment import physical_probabilities, slice_probabilities
from FMSegCore.engines.adaptation.cases import Structure, TrainingCase
from FMSegCore.engines.adaptation.geometry import SliceGeometry, body_region, canonical_case
from FMSegCore.engines.adaptation.prompt_learner import PromptAdaptedModel, prompt_window
from FMSegCore.engines.adaptation.trainer import autocast_dtype
from FMSegCore.engines.label_vote import labels_from_probabilities
from FMSegCore.engines.prompting.windows import SliceWindow, extract, paste
from FMSegCore.models.interfaces import PromptBatch2D
from FMSegCore.preprocessing.slicing import mask_box_rc


class DiceTotals:
    """Pooled Dice per structure: add (guess, truth) masks slice by slice, then read :meth:`result`."""

    def __init__(self, names: Sequence[str]) -> None:
        self._sums = {name: [0.0, 0.0] for name in names}

    def add(self, name: str, guess: np.ndarray, truth: np.ndarray) -> None:
        self._sums[name][0] += float(np.logical_and(guess, truth).sum())
        self._sums[name][1] += float(guess.sum() + truth.sum())

    def result(self) -> dict[str, float]:
        """Dice per structure (NaN where neither guess nor truth had a pixel)."""
        return {name: (2 * a / b if b > 0 else float("nan")) for name, (a, b) in self._sums.items()}


def box_prompted_logits(model: PromptAdaptedModel, embedding: torch.Tensor, window: SliceWindow,
                        box_rc: tuple[float, float, float, float]) -> torch.Tensor:
    """Mask logits (S, S) a box prompts on a window's embedding (1, C, h, w)."""
    prompts = PromptBatch2D(torch.zeros(1, dtype=torch.long, device=embedding.device),
                            boxes=torch.tensor(window.box_to_window(box_rc), dtype=torch.float32,
                                               device=embedding.device)[None])
    logits, _ = model.decode(embedding, prompts)
    return logits[0, 0].float()


@torch.no_grad()
def validate(model: nn.Module, mode: str, cases: Sequence[TrainingCase], structures: Sequence[Structure],
             device: torch.device, precision: str = "auto",
             geometry: Optional[SliceGeometry] = None) -> dict[str, float]:
    """Dice per structure on validation cases (pooled over their annotated slices).

    ``auto``: the automatic segmentation (in physical units with a ``geometry``). ``prompt``: each structure
    prompted with its tight box on each slice (each window encoded once per slice).
    """
    model.eval()
    dtype = autocast_dtype(device, precision)
    totals = DiceTotals([s.name for s in structures])
    values = [s.value for s in structures]
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    for case in cases:
        if geometry is not None and geometry.orientation == "LPS":
            case = canonical_case(case)
        region = body_region(case.image, case.axis, case.spacing_rc(), geometry.margin_mm) if geometry else None
        for index in case.annotated_slices():
            image, labels = case.slice(index)
            if mode == "auto" and geometry is not None:
                predicted = np.zeros(labels.shape, dtype=np.uint16)
                predicted[region] = labels_from_probabilities(physical_probabilities(
                    model, [image[region]], case.spacing_rc(), geometry, device, dtype)[0], values)
            elif mode == "auto":
                probabilities = slice_probabilities(model, [image], case.spacing_rc(), device, dtype)[0]
                predicted = labels_from_probabilities(probabilities, values)
            embeddings: dict[tuple, torch.Tensor] = {}
            for structure in structures:
                value = case.value_of(structure.name)
                if value is None:
                    continue
                truth = labels == value
                if mode == "auto":
                    totals.add(structure.name, predicted == structure.value, truth)
                    continue
                box = mask_box_rc(truth)
                if box is None:
                    totals.add(structure.name, np.zeros(truth.shape, dtype=bool), truth)
                    continue
                window = prompt_window(case, index, box, model.input_size)
                if window.key not in embeddings:
                    pixels = model.preprocess(extract(image, window).numpy())[None].to(device)
                    with autocast:
                        embeddings[window.key] = model.encode(pixels)
                with autocast:
                    logits = box_prompted_logits(model, embeddings[window.key], window, box)
                totals.add(structure.name, paste(logits, window, truth.shape).numpy() > 0, truth)
    return totals.result()
