"""Labelled training cases for adaptation: (image, label map) pairs, their structures and their slices.

A case is a 2D slice or a 3D volume. Structures are matched across cases by name (``labels.json`` or ``.seg.nrrd``
segment names; label values may differ between cases). A case whose label set lacks a structure leaves it
unknown there (masked out of the loss), so partially labelled cases mix freely. A volume trains on its annotated
slices (those with any labelled voxel), so a few painted slices of a scan make a valid case.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from FMSegCore.engines.labelled import LabelledCase
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo, check_labelled_arrays, default_segment, read_labelmap
from FMSegCore.io.orientation import anatomical_axes
from FMSegCore.io.volume import read_volume
from FMSegCore.names import name_key, split_names, unknown_name
from FMSegCore.preprocessing.intensity import DEFAULT_CT_WINDOW, Window, guess_modality, normalize
from FMSegCore.preprocessing.slicing import AXIS_NAMES

PathLike = Union[str, Path]


#: A labelled training case (the one labelled-case type, shared with in-context supports).
TrainingCase = LabelledCase


def _digest(image: np.ndarray, labels: np.ndarray) -> str:
    hasher = hashlib.sha256()
    for array in (image, labels):
        array = np.ascontiguousarray(array)
        hasher.update(str((array.shape, array.dtype.str)).encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def case_from_arrays(image: np.ndarray, labels: np.ndarray, segments: Optional[list[SegmentInfo]] = None,
                     source: str = "case", spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 2,
                     modality: str = "auto", window: Window = DEFAULT_CT_WINDOW,
                     direction: Optional[np.ndarray] = None) -> TrainingCase:
    """A case from arrays in raw intensities: a 2-D slice (rows, cols) or a 3-D KJI volume (with its direction
    matrix when known, so that physical-units adapters can reorient it)."""
    image, labels = check_labelled_arrays(image, labels, source)
    if not np.any(labels):
        raise InputError(source, "the label map is empty (no labelled voxel)")
    labels = labels.astype(np.int32)
    modality = guess_modality(image) if modality.lower() == "auto" else modality.upper()
    present = [int(v) for v in np.unique(labels) if v != 0]
    named = {segment.value: segment for segment in segments or []}  # the label set: named + present values
    segments = list(named.values()) + [default_segment(value) for value in present if value not in named]
    return TrainingCase(normalize(image, modality, window), labels, segments, source,
                        tuple(float(s) for s in spacing), axis, _digest(image, labels), modality,
                        None if direction is None or image.ndim != 3 else np.asarray(direction, dtype=float))


def load_case(image_path: PathLike, labels_path: PathLike, modality: str = "auto",
              window: Window = DEFAULT_CT_WINDOW, axis: str = "axial") -> TrainingCase:
    """Read one (image, label map) pair; the grids must match and the labels must not be empty."""
    image = read_volume(image_path)
    labels, segments = read_labelmap(labels_path, reference=image)
    ijk_axis = anatomical_axes(image.direction)[AXIS_NAMES[axis]]
    return case_from_arrays(image.array, labels.array, segments, str(labels_path), image.spacing, ijk_axis,
                            modality, window, image.direction)


@dataclass
class Structure:
    """A structure the adaptation learns: its name, colour and output label value."""

    name: str
    color: tuple[float, float, float]
    value: int

    def to_json(self) -> dict:
        return {"name": self.name, "color": list(self.color), "value": self.value}


def resolve_structures(cases: Sequence[TrainingCase], requested: Optional[Sequence[str]] = None) -> list[Structure]:
    """The structures to learn: every named structure of the cases, or the requested names/values.

    Every requested structure must be labelled in some case, and every case must label at least one of them.
    Output values are the cases' own values when they are unambiguous, else 1..N.
    """
    if not cases:
        raise InputError(None, "no training cases: give at least one --train IMAGE LABELS pair")
    by_name: dict[str, SegmentInfo] = {}
    for case in cases:
        for segment in case.segments:
            by_name.setdefault(name_key(segment.name), segment)
    chosen: list[SegmentInfo] = []
    for item in split_names(requested) if requested else [segment.name for segment in by_name.values()]:
        text = str(item).strip()
        segment = by_name.get(name_key(text))
        if segment is None and text.isdigit():
            segment = next((s for case in cases for s in case.segments if s.value == int(text)), None)
        if segment is None:
            raise InputError(cases[0].source, unknown_name("structure", text, sorted(s.name for s in by_name.values()),
                                                           "the training cases"))
        if segment.name.lower() not in {c.name.lower() for c in chosen}:
            chosen.append(segment)
    names = [segment.name for segment in chosen]
    for case in cases:
        if all(case.value_of(name) is None for name in names):
            raise InputError(case.source, f"labels none of the structures to learn ({', '.join(names)})")
    values = [segment.value for segment in chosen]
    if len(set(values)) != len(values):
        values = list(range(1, len(chosen) + 1))
    return [Structure(segment.name, tuple(segment.color), value) for segment, value in zip(chosen, values)]


def case_targets(case: TrainingCase, labels_slice: np.ndarray,
                 structures: Sequence[Structure]) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks (C, rows, cols) of one slice and which structures this case labels (C,)."""
    masks, known = [], []
    for structure in structures:
        value = case.value_of(structure.name)
        known.append(value is not None)
        masks.append(labels_slice == value if value is not None else np.zeros(labels_slice.shape, dtype=bool))
    return np.stack(masks), np.array(known, dtype=bool)
