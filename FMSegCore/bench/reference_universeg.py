"""The straightforward UniverSeg computation, as the official implementation does it, for equality and speed checks.

Every (target, support) pair is concatenated along channels and passed through the full cross convolution; the
new target is the mean over supports; per-branch convolutions run on every item, the last decoder block's support
branch included. Written on a plain state_dict (the official key layout), independently of
:mod:`FMSegCore.models.universeg`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _items(fn, x: torch.Tensor) -> torch.Tensor:
    batch, count = x.shape[:2]
    y = fn(x.reshape(batch * count, *x.shape[2:]))
    return y.reshape(batch, count, *y.shape[1:])


def reference_forward(state: dict[str, torch.Tensor], target: torch.Tensor, images: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, 1, H, W)`` for targets ``(B, 1, H, W)`` and supports ``(B, S, 1, H, W)`` (same ``B``)."""
    count = images.shape[1]
    target = target.unsqueeze(1)  # (B, 1, C, H, W)
    support = torch.cat([images, labels], dim=2)  # (B, S, 2, H, W)

    def conv_relu(prefix: str, x: torch.Tensor) -> torch.Tensor:
        return _items(lambda y: F.leaky_relu(F.conv2d(y, state[f"{prefix}.weight"], state[f"{prefix}.bias"],
                                                      padding=1), 0.01), x)

    def block(prefix: str, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = torch.cat([target.expand(-1, count, -1, -1, -1), support], dim=2)
        weight, bias = state[f"{prefix}.cross.cross_conv.weight"], state[f"{prefix}.cross.cross_conv.bias"]
        interaction = _items(lambda y: F.conv2d(y, weight, bias, padding=1), pairs)
        return (conv_relu(f"{prefix}.target.vmapped.conv", interaction.mean(dim=1, keepdim=True)),
                conv_relu(f"{prefix}.support.vmapped.conv", interaction))

    def up(y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)

    skips = []
    for i in range(4):
        target, support = block(f"enc_blocks.{i}", target, support)
        if i < 3:
            skips.append((target, support))
            target, support = _items(lambda y: F.max_pool2d(y, 2), target), _items(lambda y: F.max_pool2d(y, 2), support)
    for j in range(3):
        target_skip, support_skip = skips.pop()
        target = torch.cat([_items(up, target), target_skip], dim=2)
        support = torch.cat([_items(up, support), support_skip], dim=2)
        target, support = block(f"dec_blocks.{j}", target, support)
    return F.conv2d(target[:, 0], state["out_conv.conv.weight"], state["out_conv.conv.bias"])
