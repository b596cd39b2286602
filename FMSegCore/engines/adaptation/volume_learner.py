"""Adapting a 3D backbone (MONAI Swin UNETR, as in FSEFT/SuPreM) on labelled volumes with the same methods and
training loop as the 2D models: random crops, one sigmoid output per structure, partial labels masked out.

Parts: the Swin transformer (``swinViT``) is the encoder PEFT adapts (attention ``qkv`` and MLPs); the
convolutional encoder/decoder (``encoder*``, ``decoder*``) is the pre-trained decoder; the output convolution is
replaced by a new head with one channel per structure (a linear probe on the last decoder features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from FMSegCore.engines.adaptation.cases import Structure, TrainingCase
from FMSegCore.engines.adaptation.heads import SpatialAdapter
from FMSegCore.engines.adaptation.losses import masked_dice_ce
from FMSegCore.engines.adaptation.methods import AdaptableParts, MethodReport, MethodSettings, apply_method


class SwinUNETRSegmenter(nn.Module):
    """Swin UNETR with a new head (and, for the spatial-adapter method, a black-box adapter before it)."""

    def __init__(self, backbone: nn.Module, classes: int, adapter: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        features = backbone.out.conv.conv.in_channels
        self.backbone.out = nn.Identity()
        self.adapter = SpatialAdapter(features, dims=3) if adapter else nn.Identity()
        self.head = nn.Conv3d(features, classes, 1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(self.backbone(volume)))


def volume_parts(root: SwinUNETRSegmenter) -> AdaptableParts:
    """How methods see Swin UNETR: the transformer encoder, the conv decoder, and the new modules."""
    new = ["head"] + (["adapter"] if isinstance(root.adapter, SpatialAdapter) else [])
    decoder = [name for name, _ in root.backbone.named_children() if name.startswith(("encoder", "decoder"))]
    return AdaptableParts(root, "backbone.swinViT", (r"attn\.qkv$",), (r"blocks\.\d+\.mlp$",), stages=(),
                          decoders=[f"backbone.{name}" for name in decoder], new_modules=new)


class VolumeLearner3D:
    """Random crops of labelled volumes for a :class:`SwinUNETRSegmenter`."""

    def __init__(self, backbone: nn.Module, cases: Sequence[TrainingCase], structures: Sequence[Structure],
                 settings: MethodSettings, device: torch.device, crop: int = 64) -> None:
        if crop % 32:
            raise ValueError("Swin UNETR crops must be multiples of 32")
        self.root = SwinUNETRSegmenter(backbone, len(structures), settings.method == "spatial-adapter").to(device)
        parts = volume_parts(self.root)
        self.report: MethodReport = apply_method(parts, settings)
        self.cases, self.structures, self.device, self.crop = list(cases), list(structures), device, crop
        self.settings = settings

    def parameter_groups(self, learning_rate: float, head_learning_rate: float) -> list[dict[str, Any]]:
        new = {id(p) for name in ("head", "adapter") for p in self.root.get_submodule(name).parameters()}
        head = [p for p in self.root.parameters() if p.requires_grad and id(p) in new]
        rest = [p for p in self.root.parameters() if p.requires_grad and id(p) not in new]
        return [{"params": head, "lr": head_learning_rate}, {"params": rest, "lr": learning_rate}]

    def _crop(self, case: TrainingCase, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = self.crop
        pad = [(0, max(0, size - n)) for n in case.image.shape]
        image, labels = np.pad(case.image, pad), np.pad(case.labels, pad)
        start = [int(torch.randint(n - size + 1, (), generator=generator)) for n in image.shape]
        region = tuple(slice(s, s + size) for s in start)
        return image[region], labels[region]

    def sample(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        images, targets, known = [], [], []
        for _ in range(batch_size):
            case = self.cases[int(torch.randint(len(self.cases), (), generator=generator))]
            image, labels = self._crop(case, generator)
            values = [case.value_of(s.name) for s in self.structures]
            images.append(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None])
            targets.append(torch.from_numpy(np.stack([labels == v if v is not None else np.zeros_like(labels, bool)
                                                      for v in values])))
            known.append(torch.tensor([v is not None for v in values]))
        return {"images": torch.stack(images), "targets": torch.stack(targets), "known": torch.stack(known)}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.root(batch["images"].to(self.device))
        return masked_dice_ce(logits, batch["targets"].to(self.device), batch["known"].to(self.device))
