"""Real segmentation tasks as stacks of 2-D slices, and sampling of (query, support set) episodes from them.

A *task* is one structure (a label value inside a named label *group*, e.g. ``brain/aal`` value 41) seen in one
or more subjects. Every subject's image and label map is cut into slices along the three axes and fitted into a
square of ``size`` pixels once (images bilinear, labels nearest), so that sampling an episode is only indexing.

An episode mirrors how the in-context engine uses supports on volumes: the query is a slice where the structure
is present; the supports are slices of the same structure from the same or other subjects, drawn with a
preference for the same relative position along the axis (and never the query slice or its neighbours).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LabelledVolume:
    """One subject's image (float in [0, 1]) and label map on the same 3-D grid."""

    subject: str
    group: str
    image: np.ndarray
    labels: np.ndarray
    names: dict[int, str] = field(default_factory=dict)


def fit_stack(stack: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Pad ``(N, H, W)`` slices to squares (centred) and resize them to ``size`` x ``size``."""
    count, height, width = stack.shape
    side = max(height, width)
    padded = np.zeros((count, side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    padded[:, top:top + height, left:left + width] = stack
    tensor = torch.from_numpy(padded)[:, None]
    if mode == "nearest":
        resized = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    else:
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].numpy()


class SliceStacks:
    """The slices of one labelled volume along each axis, fitted to ``size`` pixels, with per-slice areas."""

    def __init__(self, volume: LabelledVolume, size: int) -> None:
        self.subject, self.group, self.names = volume.subject, volume.group, volume.names
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.areas: list[np.ndarray] = []  # axis -> (slices, max_value + 1) pixel counts
        max_value = int(volume.labels.max())
        for axis in range(3):
            image = np.moveaxis(volume.image.astype(np.float32), axis, 0)
            labels = np.moveaxis(volume.labels, axis, 0)
            self.images.append(fit_stack(image, size, "bilinear").astype(np.float16))
            fitted = fit_stack(labels.astype(np.float32), size, "nearest").round().astype(np.int16)
            self.labels.append(fitted)
            flat = fitted.reshape(fitted.shape[0], -1).astype(np.int64)
            offsets = np.arange(fitted.shape[0])[:, None] * (max_value + 1)
            counts = np.bincount((flat + offsets).ravel(), minlength=fitted.shape[0] * (max_value + 1))
            self.areas.append(counts.reshape(fitted.shape[0], max_value + 1))

    def slices_with(self, axis: int, value: int, min_area: int) -> np.ndarray:
        areas = self.areas[axis]
        if value >= areas.shape[1]:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(areas[:, value] >= min_area)


@dataclass
class Episode:
    """One training example: query and supports as ``(1, H, W)`` / ``(S, 1, H, W)`` float tensors."""

    query_image: torch.Tensor
    query_label: torch.Tensor
    support_images: torch.Tensor
    support_labels: torch.Tensor
    task: str


class TaskBank:
    """Samples episodes of real tasks from labelled volumes grouped by label namespace."""

    def __init__(self, volumes: list[LabelledVolume], size: int, min_area: int = 12,
                 min_slices: int = 4) -> None:
        self.size, self.min_area = size, min_area
        self.stacks = [SliceStacks(volume, size) for volume in volumes]
        self.tasks: list[tuple[str, int]] = []
        by_group: dict[str, list[int]] = {}
        for index, stack in enumerate(self.stacks):
            by_group.setdefault(stack.group, []).append(index)
        self.by_group = by_group
        for group, members in sorted(by_group.items()):
            values = sorted({value for index in members for value in self.stacks[index].names})
            for value in values:
                present = max(len(self.stacks[i].slices_with(a, value, min_area)) for i in members for a in range(3))
                if present >= min_slices:
                    self.tasks.append((group, value))

    def _axis_and_subjects(self, rng: np.random.Generator, group: str, value: int) -> Optional[tuple[int, list[int]]]:
        axis = int(rng.integers(3))
        members = [index for index in self.by_group[group]
                   if len(self.stacks[index].slices_with(axis, value, self.min_area)) >= 2]
        if not members:
            return None
        return axis, members

    def sample(self, rng: np.random.Generator, support_size: int, task_index: Optional[int] = None,
               position_scale: float = 0.12) -> Episode:
        """One episode of a random task (or ``task_index``) with ``support_size`` supports."""
        for _ in range(50):
            index = int(rng.integers(len(self.tasks))) if task_index is None else task_index
            group, value = self.tasks[index]
            chosen = self._axis_and_subjects(rng, group, value)
            if chosen is not None:
                break
        else:
            raise RuntimeError("no task with enough labelled slices")
        axis, members = chosen
        query_stack = self.stacks[int(rng.choice(members))]
        present = query_stack.slices_with(axis, value, self.min_area)
        query_slice = int(rng.choice(present))
        relative = query_slice / max(1, query_stack.labels[axis].shape[0] - 1)
        candidates = []
        for member in members:
            stack = self.stacks[member]
            slices = stack.slices_with(axis, value, self.min_area)
            if stack is query_stack:
                slices = slices[np.abs(slices - query_slice) > 1]
            for slice_index in slices:
                position = slice_index / max(1, stack.labels[axis].shape[0] - 1)
                candidates.append((member, int(slice_index), position))
        if not candidates:
            return self.sample(rng, support_size, None, position_scale)
        positions = np.array([position for _, _, position in candidates])
        weights = np.exp(-np.abs(positions - relative) / position_scale)
        picks = rng.choice(len(candidates), size=support_size, replace=len(candidates) < support_size,
                           p=weights / weights.sum())
        images = [self.stacks[candidates[p][0]].images[axis][candidates[p][1]] for p in picks]
        labels = [self.stacks[candidates[p][0]].labels[axis][candidates[p][1]] == value for p in picks]
        return Episode(
            torch.from_numpy(query_stack.images[axis][query_slice].astype(np.float32))[None],
            torch.from_numpy((query_stack.labels[axis][query_slice] == value).astype(np.float32))[None],
            torch.from_numpy(np.stack(images).astype(np.float32))[:, None],
            torch.from_numpy(np.stack(labels).astype(np.float32))[:, None],
            f"{group}:{value}",
        )
