"""The one Dice + binary cross-entropy loss: few-shot adaptation (partial labels) and meta-training share it.

Each structure has its own sigmoid output. A case that does not label a structure (it is absent from the case's
label set) must not teach that it is background there, so a per-(sample, structure) mask removes those terms
from both the cross-entropy and the Dice (MultiTalent's partial-label loss). The Dice term is MONAI's
``DiceLoss`` (smoothing 1 in numerator and denominator), on probabilities whose unknown (sample, structure)
pairs are zeroed with their targets, so that those pairs add nothing to the sums.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, known: Optional[torch.Tensor] = None,
                  batch: bool = True, smooth: float = 1.0) -> torch.Tensor:
    """BCE over the known (sample, structure) pairs plus the soft Dice loss.

    ``logits`` and ``target``: (B, C, *spatial); ``known``: (B, C) booleans (None: everything is labelled).
    ``batch``: one Dice per structure over the batch's known samples (nnU-Net's batch Dice: a slice without the
    structure does not on its own reward predicting nothing), averaged over the structures some sample labels;
    else one Dice per known (sample, structure) pair, averaged over the pairs.
    """
    logits = logits.float()
    target = target.float()
    samples, classes = logits.shape[:2]
    if known is None:
        known = torch.ones(samples, classes, dtype=torch.bool, device=logits.device)
    if not bool(known.any()):
        raise ValueError("no labelled structure in this batch")
    weights = known.float()
    flat_logits = logits.reshape(samples, classes, -1)
    flat_target = target.reshape(samples, classes, -1)
    bce = F.binary_cross_entropy_with_logits(flat_logits, flat_target, reduction="none").mean(dim=2)
    bce = (bce * weights).sum() / weights.sum()
    mask = weights[:, :, None]
    dice = DiceLoss(batch=batch, smooth_nr=smooth, smooth_dr=smooth, reduction="none")(
        torch.sigmoid(flat_logits) * mask, flat_target * mask)
    dice = dice.reshape(classes) if batch else dice.reshape(samples, classes)
    counted = known.any(dim=0) if batch else known
    return bce + dice[counted].mean()
