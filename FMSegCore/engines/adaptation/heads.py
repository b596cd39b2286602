"""Heads that turn a frozen (or adapted) foundation encoder into an automatic segmenter, one output per structure.

- :class:`LinearProbe`: a 1x1 convolution on the embedding (FSEFT's linear probe), upsampled to the input.
- :class:`SpatialAdapter`: FSEFT's black-box adapter, ``x + conv3(relu(conv3(x)))`` with the second convolution
  zero-initialised, placed before a linear probe (or, for prompting, before the mask decoder).
- :class:`LightDecoder`: a small convolutional decoder from the embedding back to full resolution, with skips
  from the encoder's stem features and the image itself (the "decoder" of encoder PEFT + decoder fine-tuning).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: Head kinds, by the method that trains them (every other method trains a LightDecoder).
HEAD_FOR_METHOD = {"linear-probe": "linear", "spatial-adapter": "spatial-adapter"}
#: Each structure's foreground probability at initialisation, everywhere.
PRIOR_PROBABILITY = 0.01


def prior_classifier(in_channels: int, classes: int) -> nn.Conv2d:
    """A 1x1 classifier whose outputs start at ``PRIOR_PROBABILITY``."""
    classifier = nn.Conv2d(in_channels, classes, 1)
    nn.init.constant_(classifier.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    return classifier


class SpatialAdapter(nn.Module):
    """``x + conv3x3(relu(conv3x3(x)))``, no biases, second convolution zero-initialised."""

    def __init__(self, channels: int, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv1 = conv(channels, channels, 3, padding=1, bias=False)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class LinearProbe(nn.Module):
    """1x1 convolution from the embedding to one logit per structure, bilinearly upsampled to ``size``."""

    def __init__(self, channels: int, classes: int, size: int, adapter: bool = False) -> None:
        super().__init__()
        self.adapter = SpatialAdapter(channels) if adapter else None
        self.classifier = prior_classifier(channels, classes)
        self.size = size

    def forward(self, embedding: torch.Tensor, stem: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.adapter is not None:
            embedding = self.adapter(embedding)
        logits = self.classifier(embedding)
        return F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.GroupNorm(8, out_channels), nn.GELU())


class LightDecoder(nn.Module):
    """Embedding (C, S/4) -> stem skip (S/2) -> image skip (S) -> one logit per structure (about 0.2 M params)."""

    def __init__(self, channels: int, stem_channels: int, classes: int, width: int = 64) -> None:
        super().__init__()
        self.reduce = _block(channels, width)
        self.stem_projection = nn.Conv2d(stem_channels, width // 2, 1)
        self.fuse_stem = _block(width + width // 2, width // 2)
        self.fuse_image = _block(width // 2 + 1, width // 4)
        self.classifier = prior_classifier(width // 4, classes)

    def forward(self, embedding: torch.Tensor, stem: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None) -> torch.Tensor:
        if stem is None or image is None:
            raise ValueError("the light decoder needs the stem features and the image")
        x = self.reduce(embedding)
        x = F.interpolate(x, size=stem.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse_stem(torch.cat([x, self.stem_projection(stem.to(x.dtype))], dim=1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse_image(torch.cat([x, image[:, :1].to(x.dtype)], dim=1))
        return self.classifier(x)


def build_head(kind: str, channels: int, stem_channels: int, classes: int, size: int) -> nn.Module:
    """A head by kind: ``linear``, ``spatial-adapter`` (adapter + linear probe) or ``decoder``."""
    if kind == "linear":
        return LinearProbe(channels, classes, size)
    if kind == "spatial-adapter":
        return LinearProbe(channels, classes, size, adapter=True)
    if kind == "decoder":
        return LightDecoder(channels, stem_channels, classes)
    raise ValueError(f"unknown head {kind!r}")
