"""Augmentation of in-context episodes: per image (each query/support item) and per task (all items alike).

Per-image augmentation makes the supports vary the way real examples of one structure do (pose, scale,
contrast, noise). Task augmentation changes the task itself, the same way for every item, so the model learns
the rule from the supports rather than memorising structures: intensity inversion, flips and transposition,
an elastic warp, and label-shape changes (dilation, erosion, boundary).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from FMSegCore.training.task_bank import Episode


def _affine_grids(rng: np.random.Generator, count: int, size: int, strength: float) -> torch.Tensor:
    thetas = []
    for _ in range(count):
        angle = math.radians(rng.uniform(-20, 20)) * strength
        scale = math.exp(rng.uniform(-0.2, 0.2) * strength)
        shift = rng.uniform(-0.1, 0.1, 2) * strength
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        thetas.append([[cos, -sin, shift[0]], [sin, cos, shift[1]]])
    theta = torch.tensor(thetas, dtype=torch.float32)
    return F.affine_grid(theta, [count, 1, size, size], align_corners=False)


def _elastic_offset(rng: np.random.Generator, size: int, magnitude: float) -> torch.Tensor:
    coarse = torch.from_numpy(rng.normal(0, magnitude, (1, 2, 5, 5)).astype(np.float32))
    offset = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return offset.permute(0, 2, 3, 1)


def _warp(images: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return images, (labels > 0.5).float()


def _intensity(rng: np.random.Generator, images: torch.Tensor) -> torch.Tensor:
    out = []
    for image in images:
        if rng.random() < 0.5:
            image = image.clamp(0, 1) ** float(math.exp(rng.uniform(-0.4, 0.4)))
        if rng.random() < 0.5:
            image = image * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.1, 0.1))
        if rng.random() < 0.3:
            image = image + float(rng.uniform(0, 0.05)) * torch.randn_like(image)
        out.append(image.clamp(0, 1))
    return torch.stack(out)


def _erode(labels: torch.Tensor) -> torch.Tensor:
    return 1 - F.max_pool2d(1 - labels, 3, 1, 1)


def augment_episode(episode: Episode, rng: np.random.Generator, strength: float = 1.0) -> Episode:
    """Apply per-image then task augmentation to an episode (query first, supports after)."""
    images = torch.cat([episode.query_image[None], episode.support_images])  # (1+S, 1, H, W)
    labels = torch.cat([episode.query_label[None], episode.support_labels])
    count, size = images.shape[0], images.shape[-1]
    # per image
    if rng.random() < 0.7:
        images, labels = _warp(images, labels, _affine_grids(rng, count, size, strength))
    images = _intensity(rng, images)
    # per task
    if rng.random() < 0.2:
        grid = _affine_grids(rng, 1, size, 0.0) + _elastic_offset(rng, size, 0.04 * strength)
        images, labels = _warp(images, labels, grid.expand(count, -1, -1, -1))
    if rng.random() < 0.2:
        images = 1 - images
    if rng.random() < 0.25:
        images, labels = images.flip(-1), labels.flip(-1)
    if rng.random() < 0.25:
        images, labels = images.flip(-2), labels.flip(-2)
    if rng.random() < 0.25:
        images, labels = images.transpose(-1, -2), labels.transpose(-1, -2)
    shape_change = rng.random()
    if shape_change < 0.08:
        labels = F.max_pool2d(labels, 3, 1, 1)
    elif shape_change < 0.16:
        eroded = _erode(labels)
        if bool((eroded.flatten(1).sum(1) > 0).all()):
            labels = eroded
    elif shape_change < 0.2:
        boundary = labels - _erode(labels)
        if bool((boundary.flatten(1).sum(1) > 0).all()):
            labels = boundary
    return Episode(images[0].contiguous(), labels[0].contiguous(), images[1:].contiguous(),
                   labels[1:].contiguous(), episode.task)
