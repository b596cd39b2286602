"""Synthetic segmentation tasks: random shapes with class-specific intensities and textures.

A task fixes, for ``K`` classes, a mean intensity, a texture strength and a shape scale; every image of the task
draws new shapes (arg-max of ``K`` smooth random fields) and new noise, so the images differ but the rule that
maps appearance to the target class stays the same. This widens the distribution of tasks beyond the anatomy at
hand, as in the synthetic-task training of UniverSeg.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from FMSegCore.training.task_bank import Episode


def _smooth_fields(count: int, classes: int, size: int, scale: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(count, classes, scale, scale, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def synthetic_episode(rng: np.random.Generator, support_size: int, size: int) -> Episode:
    """One episode of a fresh random task: query and ``support_size`` supports of ``size`` x ``size``."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    classes = int(rng.integers(2, 7))
    scale = int(rng.integers(3, 10))
    means = torch.from_numpy(rng.uniform(0, 1, classes).astype(np.float32))
    textures = torch.from_numpy(rng.uniform(0, 0.15, classes).astype(np.float32))
    target_class = int(rng.integers(classes))
    count = support_size + 1
    fields = _smooth_fields(count, classes, size, scale, generator)
    fields[:, 0] += float(rng.uniform(0, 1))  # a dominant background class
    label_map = fields.argmax(dim=1)  # (count, size, size)
    noise = _smooth_fields(count, 1, size, int(rng.integers(8, 33)), generator)[:, 0]
    image = means[label_map] + textures[label_map] * noise
    blur = float(rng.uniform(0, 1.5))
    if blur > 0.3:
        kernel_size = 5
        coords = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        kernel = torch.exp(-coords**2 / (2 * blur**2))
        kernel = kernel / kernel.sum()
        image = F.conv2d(image[:, None], kernel.view(1, 1, 1, -1), padding=(0, 2))
        image = F.conv2d(image, kernel.view(1, 1, -1, 1), padding=(2, 0))[:, 0]
    image = image.clamp(0, 1)
    labels = (label_map == target_class).float()
    return Episode(image[:1], labels[:1], image[1:, None], labels[1:, None], "synthetic")
