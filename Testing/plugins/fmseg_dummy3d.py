"""A small promptable 3-D model family, as a third party would add one: this model file and the ``FAMILY`` entry
below (registered through the ``fmseg.families`` entry point), with no change to FMSeg itself.

The network: two 3-D feature channels (the voxel's intensity and its 3x3x3 mean, from the checkpoint), and a
decoder that marks voxels whose features are near those at the include points (or the box centre), not nearer
to those at exclude points, inside the box when there is one, refined by the previous logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from FMSegCore.errors import ModelError
from FMSegCore.models.interfaces import PromptBatch3D
from FMSegCore.zoo.families import Family
from FMSegCore.zoo.registry import ModelCard

CHECKPOINT = Path(__file__).with_name("dummy3d.pt")
#: The checkpoint's sha256 (the file beside this module; ``python fmseg_dummy3d.py`` writes it).
SHA256 = "d9ba00e2f87540d19366e81fd0153ffe3c490211cca1350fa1c5bc993b0b6881"


class ClickSimilarity3D(nn.Module):
    """Intensity-similarity region from clicks in a 32^3 crop at 4 mm."""

    crop_shape = (32, 32, 32)
    crop_spacing_mm = (4.0, 4.0, 4.0)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 2, kernel_size=3, padding=1, bias=False)
        self.temperature = nn.Parameter(torch.tensor(40.0))
        self.margin = nn.Parameter(torch.tensor(0.08))

    def preprocess(self, crop: np.ndarray) -> torch.Tensor:
        """HU in a soft-tissue window, scaled to [0, 1]: (1, K, J, I)."""
        return torch.as_tensor(np.clip((crop + 160.0) / 400.0, 0.0, 1.0), dtype=torch.float32)[None]

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        return self.features(crops)

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch3D) -> tuple[torch.Tensor, torch.Tensor]:
        features = embeddings[prompts.embedding_index]
        logits = []
        for b in range(features.shape[0]):
            logits.append(self._decode_one(features[b], prompts, b))
        out = torch.stack(logits)[:, None]
        return out, torch.sigmoid(out).mean(dim=(1, 2, 3, 4))

    def _sample(self, features: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
        """Features (C,) at continuous crop voxel indices (N, 3) -> (N, C)."""
        sizes = torch.tensor(features.shape[1:][::-1], dtype=torch.float32, device=features.device)
        grid = (ijk / (sizes - 1) * 2 - 1).view(1, -1, 1, 1, 3)
        sampled = nn.functional.grid_sample(features[None], grid, align_corners=True)
        return sampled.view(features.shape[0], -1).T

    def _decode_one(self, features: torch.Tensor, prompts: PromptBatch3D, b: int) -> torch.Tensor:
        include = exclude = None
        if prompts.points is not None:
            labels = prompts.point_labels[b]
            include, exclude = prompts.points[b][labels == 1], prompts.points[b][labels == 0]
        if (include is None or len(include) == 0) and prompts.boxes is not None:
            box = prompts.boxes[b]
            include = ((box[:3] + box[3:]) / 2)[None]
        if include is None or len(include) == 0:
            raise ModelError("dummy3d: a prompt needs an include point or a box")
        distance = (features - self._sample(features, include).mean(0)[:, None, None, None]).norm(dim=0)
        logits = self.temperature * (self.margin - distance)
        if exclude is not None and len(exclude):
            nearest = torch.stack([(features - f[:, None, None, None]).norm(dim=0)
                                   for f in self._sample(features, exclude)]).min(0).values
            logits = torch.where(nearest < distance, torch.full_like(logits, -10.0), logits)
        if prompts.boxes is not None:
            k, j, i = torch.meshgrid(*(torch.arange(n, device=features.device, dtype=torch.float32)
                                       for n in features.shape[1:]), indexing="ij")
            lo, hi = prompts.boxes[b][:3], prompts.boxes[b][3:]
            inside = ((i >= lo[0] - 0.5) & (i <= hi[0] + 0.5) & (j >= lo[1] - 0.5) & (j <= hi[1] + 0.5)
                      & (k >= lo[2] - 0.5) & (k <= hi[2] + 0.5))
            logits = torch.where(inside, logits, torch.full_like(logits, -10.0))
        if prompts.mask_logits is not None:
            logits = logits + 0.25 * prompts.mask_logits[b, 0]
        return logits


def build() -> ClickSimilarity3D:
    """The network with its designed weights: channel 0 the voxel itself, channel 1 the 3x3x3 mean."""
    model = ClickSimilarity3D()
    with torch.no_grad():
        model.features.weight.zero_()
        model.features.weight[0, 0, 1, 1, 1] = 1.0
        model.features.weight[1, 0] = 1.0 / 27.0
    return model


def load(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
         trainable: bool = False) -> ClickSimilarity3D:
    """The family's loader: a plain state_dict, weights only, strict keys."""
    model = ClickSimilarity3D()
    try:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
    except (OSError, RuntimeError) as error:
        raise ModelError(f"{checkpoint}: not a dummy3d checkpoint ({str(error).splitlines()[0]})") from None
    return model.eval().to(device)


CARD = ModelCard(
    name="dummy3d-click", task="promptable-3d", title="Dummy 3-D click model (tests)",
    description="A test family's model: intensity similarity around clicks in a 3-D crop.",
    source="https://models.invalid/dummy3d.pt", filename="dummy3d.pt", size_bytes=None, sha256=SHA256,
    licence="Apache-2.0", input_conventions="32^3 crop at 4 mm; HU", architecture="dummy3d", homepage="",
)

FAMILY = Family("dummy3d", f"{__name__}:load", ("PromptableModel3D",), cards=(CARD,), title="Dummy 3-D")


if __name__ == "__main__":
    import hashlib

    torch.save(build().state_dict(), CHECKPOINT)
    print(hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest())
