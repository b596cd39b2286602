"""The small interfaces engines use to talk to models, so new model families plug in without engine changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

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
