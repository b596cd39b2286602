"""A 3-D in-context network in the style of Iris ("Show and Segment", CVPR 2025; no code or weights were
released, so this is FMSeg's own reading of the paper, sized for a CPU).

One residual U-Net (MONAI ``ResidualUnit`` blocks) serves reference and query alike. It turns a cubic patch at a
fixed spacing into per-voxel embeddings at full resolution and tokens at its coarsest level.

- **Task encoding** (:meth:`IrisNet.encode_task`, once per reference): for each class, a *foreground
  prototype*, the masked mean of the reference's full-resolution embeddings over the class, a *background
  prototype*, their mean over the rest of the patch, and ``query_tokens`` learnt tokens that attend to the
  reference's coarsest tokens tagged with the class mask. The class's task embedding is these ``2 +
  query_tokens`` vectors: a plain tensor ``(K, 2 + query_tokens, embed_dim)``, cached and saved in task files.
  Several reference patches (or volumes) are pooled into one embedding per class: the prototypes weigh each
  patch by its voxels, the learnt tokens attend to the tokens of every patch.
- **Decoding** (:meth:`IrisNet.predict`, all classes in one pass): the query's coarsest tokens attend to the task
  tokens of every class, which conditions the decoder. Each class's logit is the cosine similarity of the
  query's full-resolution embeddings with its foreground prototype (corrected by its learnt tokens), times a
  learnt temperature; the background logit is the highest similarity to any class's background prototype. The
  output is ``(B, K + 1, P, P, P)`` logits, background first, for a softmax over the classes. Untrained, the
  head is a plain prototype match (the corrections start at zero), so training starts from a sensible answer.

Checkpoints hold ``{"config": {...plain types...}, "state_dict": {...tensors...}}`` and load with
``torch.load(..., weights_only=True)``; :func:`load_iris` turns any wrong or damaged file into one
:class:`~FMSegCore.errors.InputError` line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from torch import nn

from FMSegCore.errors import InputError
from FMSegCore.models.network_config import NetworkConfig


@dataclass
class IrisConfig(NetworkConfig):
    """The network's shape and the grid it works on: what a checkpoint must carry to rebuild it."""

    patch_size: int = 48  # voxels along each axis, a multiple of 2 ** (levels - 1)
    spacing_mm: float = 2.5  # isotropic voxel size of the patches
    features: tuple[int, ...] = (12, 24, 48, 96)
    embed_dim: int = 64
    query_tokens: int = 8
    heads: int = 4


def _unit(channels_in: int, channels_out: int, strides: int = 1) -> ResidualUnit:
    return ResidualUnit(3, channels_in, channels_out, strides=strides, subunits=2, norm="INSTANCE", act="PRELU")


class _Backbone(nn.Module):
    """Residual U-Net: ``(B, 1, P, P, P)`` -> coarsest features ``(B, C, p, p, p)`` and skips; the decoder runs
    from (possibly conditioned) coarsest features back to full-resolution features."""

    def __init__(self, features: tuple[int, ...]) -> None:
        super().__init__()
        self.down = nn.ModuleList([_unit(1, features[0])])
        self.down.extend(_unit(a, b, strides=2) for a, b in zip(features[:-1], features[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, kernel_size=2, stride=2)
                                for a, b in zip(features[:-1], features[1:]))
        self.merge = nn.ModuleList(_unit(2 * a, a) for a in features[:-1])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for block in self.down:
            x = block(x)
            levels.append(x)
        return levels

    def decode(self, coarsest: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = coarsest
        for level in reversed(range(len(self.up))):
            x = self.merge[level](torch.cat([self.up[level](x), skips[level]], dim=1))
        return x


class IrisNet(nn.Module):
    """Implements :class:`~FMSegCore.models.interfaces.InContextModel3D`."""

    def __init__(self, config: Optional[IrisConfig] = None) -> None:
        super().__init__()
        self.config = config = config or IrisConfig()
        levels = len(config.features)
        if config.patch_size % 2 ** (levels - 1):
            raise ValueError(f"patch size {config.patch_size} is not a multiple of {2 ** (levels - 1)}")
        dim = config.embed_dim
        self.backbone = _Backbone(config.features)
        self.to_embedding = nn.Conv3d(config.features[0], dim, kernel_size=1)
        self.to_tokens = nn.Linear(config.features[-1], dim)
        self.mask_tag = nn.Linear(1, dim)
        self.learnt_queries = nn.Parameter(torch.randn(config.query_tokens, dim) * 0.02)
        self.task_attention = nn.MultiheadAttention(dim, config.heads, batch_first=True)
        self.task_norm = nn.LayerNorm(dim)
        self.query_attention = nn.MultiheadAttention(dim, config.heads, batch_first=True)
        self.query_norm = nn.LayerNorm(dim)
        self.from_tokens = nn.Linear(dim, config.features[-1])
        # the learnt tokens' corrections to the foreground and background prototypes (zero at first: the
        # untrained head is a plain prototype match)
        self.refine_foreground = nn.Linear(dim, dim)
        self.refine_background = nn.Linear(dim, dim)
        for layer in (self.refine_foreground, self.refine_background):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.background_bias = nn.Parameter(torch.zeros(()))

    # ------------------------------------------------------------------------------- the interface's fields

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return (self.config.patch_size,) * 3

    @property
    def patch_spacing_mm(self) -> tuple[float, float, float]:
        return (self.config.spacing_mm,) * 3

    @property
    def task_shape(self) -> tuple[int, int]:
        """Shape of one class's task embedding."""
        return 2 + self.config.query_tokens, self.config.embed_dim

    # ------------------------------------------------------------------------------------------ features

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        levels = self.backbone.encode(images)
        return levels[-1], levels[:-1]

    def _embeddings(self, coarsest: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.to_embedding(self.backbone.decode(coarsest, skips))

    # ----------------------------------------------------------------------------------------- task side

    def encode_task(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Task embeddings ``(K, 2 + query_tokens, embed_dim)`` from reference patches ``(R, 1, P, P, P)`` and
        their class masks ``(R, K, P, P, P)`` (values in [0, 1]): per class its foreground prototype, its
        background prototype (the rest of the patches) and the learnt tokens."""
        coarsest, skips = self._features(images)
        embeddings = self._embeddings(coarsest, skips)  # (R, D, P, P, P)
        masks = labels.to(embeddings.dtype)
        foreground = _masked_mean(embeddings, masks)  # (K, D)
        background = _masked_mean(embeddings, 1 - masks)
        tokens = self.to_tokens(coarsest.flatten(2).transpose(1, 2))  # (R, N, D)
        small = F.adaptive_avg_pool3d(masks, coarsest.shape[2:]).flatten(2)  # (R, K, N)
        count = labels.shape[1]
        keys = tokens[None] + self.mask_tag(small[..., None]).transpose(0, 1)  # (K, R, N, D)
        keys = keys.reshape(count, -1, keys.shape[-1])
        queries = self.learnt_queries[None].expand(count, -1, -1) + foreground[:, None]
        attended, _ = self.task_attention(queries, keys, keys, need_weights=False)
        learnt = self.task_norm(queries + attended)
        return torch.cat([foreground[:, None], background[:, None], learnt], dim=1)

    # ---------------------------------------------------------------------------------------- query side

    def predict(self, queries: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K + 1, P, P, P)``, background first, of query patches ``(B, 1, P, P, P)`` for the classes
        of ``task`` ``(K, 2 + query_tokens, embed_dim)``."""
        coarsest, skips = self._features(queries)
        batch, channels = coarsest.shape[:2]
        tokens = self.to_tokens(coarsest.flatten(2).transpose(1, 2))  # (B, N, D)
        task_tokens = task.reshape(1, -1, task.shape[-1]).expand(batch, -1, -1).to(tokens.dtype)
        attended, _ = self.query_attention(tokens, task_tokens, task_tokens, need_weights=False)
        condition = self.from_tokens(self.query_norm(attended)).transpose(1, 2).reshape(coarsest.shape)
        embeddings = F.normalize(self._embeddings(coarsest + condition, skips), dim=1)  # (B, D, P, P, P)
        learnt = task[:, 2:].mean(dim=1)
        foreground = F.normalize(task[:, 0] + self.refine_foreground(learnt), dim=-1).to(embeddings.dtype)
        background = F.normalize(task[:, 1] + self.refine_background(learnt), dim=-1).to(embeddings.dtype)
        temperature = self.log_temperature.exp()
        classes = torch.einsum("bdxyz,kd->bkxyz", embeddings, foreground) * temperature
        rest = torch.einsum("bdxyz,kd->bkxyz", embeddings, background).amax(dim=1, keepdim=True) * temperature
        return torch.cat([rest + self.background_bias, classes], dim=1)


def _masked_mean(embeddings: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per class, the mean embedding ``(K, D)`` over the voxels of ``masks`` ``(R, K, ...)`` in all patches."""
    total = torch.einsum("rkxyz,rdxyz->kd", masks, embeddings)
    return total / masks.sum(dim=(0, 2, 3, 4)).clamp(min=1e-3)[:, None]


def average_tasks(tasks: list[torch.Tensor], weights: Optional[list[float]] = None) -> torch.Tensor:
    """One task embedding from several (same classes, in the same order): their weighted mean."""
    stacked = torch.stack(tasks)
    w = torch.tensor(weights if weights is not None else [1.0] * len(tasks), dtype=stacked.dtype)
    return (stacked * (w / w.sum())[:, None, None, None]).sum(dim=0)


def iris_checkpoint(model: IrisNet, half: bool = True) -> dict[str, Any]:
    """What :func:`load_iris` reads: the config and the weights (fp16 by default, on the CPU)."""
    state = {key: (value.detach().cpu().half() if half and value.is_floating_point() else value.detach().cpu())
             for key, value in model.state_dict().items()}
    return {"config": model.config.to_dict(), "state_dict": state}


def load_iris(path: Union[str, Path], device: Union[str, torch.device] = "cpu", trainable: bool = False) -> IrisNet:
    """An :class:`IrisNet` from a checkpoint of :func:`iris_checkpoint` (or a training checkpoint: its weights
    under ``"model"`` beside its ``"config"``), in eval mode unless ``trainable``."""
    path = Path(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is one message
        raise InputError(path, f"not a readable checkpoint ({type(error).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # a training checkpoint
        data = {"config": data.get("config"), "state_dict": data["model"]}
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "state_dict" not in data:
        raise InputError(path, "not an FMSeg 3-D in-context checkpoint (no config and state_dict)")
    try:
        model = IrisNet(IrisConfig.from_dict(data["config"]))
        model.load_state_dict(data["state_dict"])
    except (ValueError, TypeError, RuntimeError) as error:
        raise InputError(path, f"does not fit the 3-D in-context network ({str(error).splitlines()[0]})") from None
    model.to(device)
    return model.train(trainable) if trainable else model.eval()
