"""Dice + cross-entropy for few-shot adaptation, with partial labels.

Each structure has its own sigmoid output. A case that does not label a structure (it is absent from the case's
label set) must not teach that it is background there, so a per-(sample, structure) mask removes those terms
from both the cross-entropy and the Dice (MultiTalent's partial-label loss).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, known: Optional[torch.Tensor] = None,
                   smooth: float = 1.0) -> torch.Tensor:
    """BCE over known (sample, structure) pairs plus soft Dice loss per structure over the batch.

    ``logits`` and ``target``: (B, C, *spatial); ``known``: (B, C) booleans (None: everything is labelled).
    """
    logits = logits.float()
    target = target.float()
    batch, classes = logits.shape[:2]
    if known is None:
        known = torch.ones(batch, classes, dtype=torch.bool, device=logits.device)
    weights = known.float()
    if not bool(weights.any()):
        raise ValueError("no labelled structure in this batch")
    flat_logits = logits.reshape(batch, classes, -1)
    flat_target = target.reshape(batch, classes, -1)
    bce = F.binary_cross_entropy_with_logits(flat_logits, flat_target, reduction="none").mean(dim=2)
    bce = (bce * weights).sum() / weights.sum()
    # Batch Dice per structure (nnU-Net's): sums over the batch's known samples, so a slice without the
    # structure does not on its own reward predicting nothing.
    probabilities = torch.sigmoid(flat_logits)
    intersection = ((probabilities * flat_target).sum(dim=2) * weights).sum(dim=0)
    total = ((probabilities.sum(dim=2) + flat_target.sum(dim=2)) * weights).sum(dim=0)
    dice = (2 * intersection + smooth) / (total + smooth)
    labelled = weights.sum(dim=0) > 0
    return bce + (1 - dice[labelled]).mean()
