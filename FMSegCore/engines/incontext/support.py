"""Support sets: labelled example images (slices or volumes) that define an in-context task.

Each example is an image and a label map on the same grid, read from NIfTI/NRRD/MetaImage (label names from a
``labels.json`` beside the file) or a Slicer ``.seg.nrrd`` (segment names). Images are normalised to [0, 1] the
same way as the query (CT window or MR percentiles). Label values keep their meaning across examples; a class is
requested by value or by name (names are matched case-insensitively across all examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from FMSegCore.engines.labelled import LabelledCase
from FMSegCore.errors import InputError
from FMSegCore.io.labelmap import SegmentInfo, check_labelled_arrays, default_segment, read_labelmap
from FMSegCore.io.volume import Volume, read_volume
from FMSegCore.names import name_key, split_names, unknown_name
from FMSegCore.preprocessing.intensity import DEFAULT_CT_WINDOW, Window, guess_modality, normalize

PathLike = Union[str, Path]


#: One labelled example: a normalised image (3-D KJI or 2-D) and its integer label map (the one labelled-case
#: type, shared with adaptation's training cases).
SupportExample = LabelledCase


@dataclass
class SupportSet:
    """The examples of a task and the classes they define (union of their segments, by label value)."""

    examples: list[SupportExample]

    @property
    def segments(self) -> list[SegmentInfo]:
        found: dict[int, SegmentInfo] = {}
        for example in self.examples:
            for segment in example.segments:
                found.setdefault(segment.value, segment)
        return [found[value] for value in sorted(found)]

    def resolve(self, requested: Optional[Sequence[Union[str, int]]] = None) -> list[SegmentInfo]:
        """The classes to segment: all present labels, or the requested names/values (in that order)."""
        if not self.examples:
            raise InputError(None, "no support examples: give at least one --support IMAGE LABELS pair")
        present = sorted({int(v) for example in self.examples for v in np.unique(example.labels) if v != 0})
        segments = {segment.value: segment for segment in self.segments}
        if not requested:
            return [segments.get(value, default_segment(value)) for value in present]
        chosen: list[SegmentInfo] = []
        for item in split_names(requested):
            segment = _match(item, segments, present)
            if segment.value not in present:
                raise InputError(self.examples[0].source, f"label {item!r} is absent from every support label map")
            if segment.value not in {c.value for c in chosen}:
                chosen.append(segment)
        return chosen


def _match(item: Union[str, int], segments: dict[int, SegmentInfo], present: list[int]) -> SegmentInfo:
    text = str(item).strip()
    if text.lstrip("-").isdigit():
        value = int(text)
        return segments.get(value, default_segment(value))
    by_name = {name_key(segment.name): segment for segment in segments.values()}
    if name_key(text) in by_name:
        return by_name[name_key(text)]
    named = [segment for segment in segments.values()
             if segment.value in present and segment.name != f"Segment_{segment.value}"]
    if not named:  # a label map without labels.json: its labels have values only
        raise InputError(None, f"unknown label {text!r}: the supports' label maps name no structures (names come "
                               "from a .seg.nrrd, or a labels.json beside a label map); give label values instead "
                               f"({', '.join(str(v) for v in present[:20])}{' ...' if len(present) > 20 else ''})")
    raise InputError(None, unknown_name("label", text, sorted(s.name for s in named), "the supports"))


@dataclass
class SupportScan:
    """A labelled support scan as read: raw intensities with their geometry, the label map on its grid."""

    volume: Volume
    labels: np.ndarray
    segments: list[SegmentInfo]
    source: str

    def example(self, modality: str = "auto", window: Window = DEFAULT_CT_WINDOW) -> SupportExample:
        """The normalised support example of this scan (its own grid)."""
        return example_from_arrays(self.volume.array, self.labels, self.segments, self.source, modality, window)


def read_support_scan(image_path: PathLike, labels_path: PathLike) -> SupportScan:
    """Read one (image, label map) pair, check they share a grid and that the labels are not empty."""
    image = read_volume(image_path)
    labels, segments = read_labelmap(labels_path, reference=image)
    if not np.any(labels.array):
        raise InputError(labels_path, "the label map is empty (no labelled voxel)")
    return SupportScan(image, labels.array.astype(np.int32), segments, str(labels_path))


def load_support_example(image_path: PathLike, labels_path: PathLike, modality: str = "auto",
                         window: Window = DEFAULT_CT_WINDOW) -> SupportExample:
    """Read one (image, label map) pair as a normalised support example."""
    return read_support_scan(image_path, labels_path).example(modality, window)


def example_from_arrays(image: np.ndarray, labels: np.ndarray, segments: Optional[list[SegmentInfo]] = None,
                        source: str = "support", modality: str = "auto",
                        window: Window = DEFAULT_CT_WINDOW) -> SupportExample:
    """A support example from arrays (a 2-D slice or a 3-D volume) in raw intensities."""
    image, labels = check_labelled_arrays(image, labels, source)
    labels = labels.astype(np.int32)
    if segments is None:
        segments = [default_segment(int(v)) for v in np.unique(labels) if v != 0]
    modality = guess_modality(image) if modality.lower() == "auto" else modality.upper()
    return SupportExample(normalize(image, modality, window), labels, segments, source, modality=modality)


def load_support_set(pairs: Sequence[tuple[PathLike, PathLike]], modality: str = "auto",
                     window: Window = DEFAULT_CT_WINDOW) -> SupportSet:
    """A support set from (image path, label map path) pairs."""
    if not pairs:
        raise InputError(None, "no support examples: give at least one --support IMAGE LABELS pair")
    return SupportSet([load_support_example(image, labels, modality, window) for image, labels in pairs])
