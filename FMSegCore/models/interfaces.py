"""The small interfaces engines use to talk to models, so new model families plug in without engine changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class PromptBatch2D:
    """Prompts for a batch of decoder calls, in pixel coordinates (x, y) of the model's input image.

    ``boxes``: (B, 4) as x0, y0, x1, y1, or None. ``points``: (B, N, 2) and ``point_labels``: (B, N) with 1 for
    include and 0 for exclude, or None. ``mask_logits``: (B, 1, h, w) low-resolution logits of a previous
    prediction to refine, or None. ``embedding_index``: (B,) which cached embedding each call uses.
    """

    embedding_index: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None
    point_labels: Optional[torch.Tensor] = None
    mask_logits: Optional[torch.Tensor] = None


@runtime_checkable
class PromptableModel2D(Protocol):
    """A SAM-style 2D model: an expensive image encoder and a cheap prompt decoder."""

    #: Side of the square input image, in pixels.
    input_size: int
    #: Side of the square low-resolution mask logits the decoder returns.
    mask_size: int

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """A 2D slice (H, W), already cropped and resized to ``input_size``, as a (C, S, S) model input."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of preprocessed images (B, C, S, S)."""

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, 1, mask_size, mask_size) for each prompt of the batch, and a quality score (B,)
        (the model's predicted IoU where it has one)."""

    def decode_trainable(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> torch.Tensor:
        """Mask logits (B, 1, h, w), one prompt per embedding, with gradients to the decoder (for adaptation)."""


@runtime_checkable
class InContextModel2D(Protocol):
    """A 2D in-context model: a support set of labelled slices defines a binary task for query slices."""

    #: Side of the square input slices, in pixels; inputs are in [0, 1].
    input_size: int

    def encode_support(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the model can precompute from one support set: images and labels (S, 1, N, N)."""

    def predict(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, N, N) for query slices (B, 1, N, N) given an :meth:`encode_support` result."""


@runtime_checkable
class StochasticInContextModel2D(InContextModel2D, Protocol):
    """An in-context model that draws several plausible segmentations (Tyche-style); their spread is the
    uncertainty. ``predict`` gives the logit of the candidates' mean probability."""

    def predict_candidates(self, queries: torch.Tensor, support: torch.Tensor, candidates: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits (B, K, 1, N, N) of ``candidates`` = K draws for query slices (B, 1, N, N)."""


@dataclass
class PromptMaps2D:
    """Interactive prompts on query slices as dense maps (B, 1, N, N) in [0, 1] on the model's input grid, for
    in-context models that take them (MultiverSeg-style): a box, include and exclude clicks and scribbles, and
    the previous prediction's logits (or None)."""

    box: torch.Tensor
    include: torch.Tensor
    exclude: torch.Tensor
    previous_logits: Optional[torch.Tensor] = None


@runtime_checkable
class InteractiveInContextModel2D(InContextModel2D, Protocol):
    """An in-context model that also takes prompts on the query, so a user corrects a result with clicks,
    scribbles or a box."""

    def predict_with_prompts(self, queries: torch.Tensor, support: torch.Tensor,
                             prompts: PromptMaps2D) -> torch.Tensor:
        """Logits (B, 1, N, N) for query slices given a support and prompt maps."""


@dataclass
class PromptBatch3D:
    """Prompts for a batch of decoder calls on 3-D crops, in continuous voxel indices (i, j, k) of the model's
    input crop (the array axes of a crop are K, J, I).

    ``points``: (B, N, 3) and ``point_labels``: (B, N) with 1 for include and 0 for exclude, or None.
    ``boxes``: (B, 6) as i0, j0, k0, i1, j1, k1, or None. ``mask_logits``: (B, 1, *mask_shape) logits of a
    previous prediction on the same crop to refine (iterative clicks), or None. ``embedding_index``: (B,).
    """

    embedding_index: torch.Tensor
    points: Optional[torch.Tensor] = None
    point_labels: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    mask_logits: Optional[torch.Tensor] = None


@runtime_checkable
class PromptableModel3D(Protocol):
    """A SAM-style 3-D model: a patch encoder over a 3-D crop around the prompt and a prompt decoder."""

    #: The crop the encoder sees, in voxels (K, J, I).
    crop_shape: tuple[int, int, int]
    #: The crop's voxel spacing in mm (along I, J, K); None: the scan's own spacing.
    crop_spacing_mm: Optional[tuple[float, float, float]]

    def preprocess(self, crop: np.ndarray) -> torch.Tensor:
        """A crop (K, J, I) of the scan's raw intensities (HU for CT), already resampled to ``crop_shape``, as a
        (C, K, J, I) model input (the model applies its own normalisation)."""

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of preprocessed crops (B, C, K, J, I)."""

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch3D) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, 1, *mask_shape) over the crop for each prompt of the batch (any resolution: the
        engine resamples them to the crop), and a quality score (B,)."""


@runtime_checkable
class InContextModel3D(Protocol):
    """A 3-D in-context model: a labelled reference volume is encoded once into task embeddings (one per class),
    which segment every class of a query volume in one pass."""

    #: The patch the model works on, in voxels (K, J, I), and its spacing in mm (I, J, K).
    patch_shape: tuple[int, int, int]
    patch_spacing_mm: tuple[float, float, float]

    def encode_task(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Task embeddings (K classes, ...) from reference patches (R, 1, *patch_shape) and their one-hot class
        masks (R, K, *patch_shape); plain tensors that can be cached and saved."""

    def predict(self, queries: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Logits (B, K + 1, *patch_shape) (background first) for query patches (B, 1, *patch_shape)."""


@runtime_checkable
class RefinementModel3D(Protocol):
    """A 3-D mask refiner: a cubic patch of ``patch_size`` voxels with four channels (the image normalised in the
    patch, the current mask, include-click and exclude-click maps) -> logits of a better mask."""

    #: Side of the cubic patch, in voxels.
    patch_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, P, P, P) for inputs (B, 4, P, P, P)."""


@runtime_checkable
class AdaptableBackbone(Protocol):
    """An image encoder that runs in named stages, so parameter-efficient methods and heads can adapt it without
    knowing its internals."""

    #: Names of the submodules run in order (stage indices refer to this tuple).
    stages: tuple[str, ...]
    #: The stage whose output is the fine "stem" feature map heads use for detail.
    stem_stage: int
    #: Channels of the final embedding and of the stem feature map.
    out_channels: int
    stem_channels: int
    #: Regular expressions naming the attention projections and the MLPs PEFT methods adapt.
    attention_patterns: tuple[str, ...]
    mlp_patterns: tuple[str, ...]

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Run stages ``start`` .. ``stop - 1`` on their input."""

    def stem_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """The stem stage's output as an NCHW feature map."""

    def forward_trunk(self, x: torch.Tensor, start: Optional[int] = None) -> torch.Tensor:
        """The input of stage ``start`` (default: after the stem) -> the final (B, out_channels, h, w) embedding."""

    def fuse_for_inference(self) -> Any:
        """An inference-only form of the encoder (e.g. BatchNorm folded), in place."""


@runtime_checkable
class AdaptableModel(Protocol):
    """A promptable 2-D model whose image encoder is an :class:`AdaptableBackbone`: what the adaptation engine
    trains (prompt mode) or puts a head on (automatic mode)."""

    image_encoder: AdaptableBackbone
    input_size: int

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """As :meth:`PromptableModel2D.preprocess`."""

    def decode_trainable(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> torch.Tensor:
        """As :meth:`PromptableModel2D.decode_trainable`."""


#: The interfaces by name, as families declare them.
INTERFACES: dict[str, type] = {
    "PromptableModel2D": PromptableModel2D,
    "PromptableModel3D": PromptableModel3D,
    "InContextModel2D": InContextModel2D,
    "StochasticInContextModel2D": StochasticInContextModel2D,
    "InteractiveInContextModel2D": InteractiveInContextModel2D,
    "InContextModel3D": InContextModel3D,
    "AdaptableModel": AdaptableModel,
}
