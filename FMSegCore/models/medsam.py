"""MedSAM (Ma et al., Nature Communications 2024): SAM ViT-B fine-tuned on 1.57 M medical image-mask pairs.

The network is SAM's: a ViT-B image encoder (16x16 patches of a 1024x1024 image, 12 blocks of 768 channels with
12 heads, windowed attention of 14x14 tokens except blocks 2, 5, 8 and 11, which attend globally, both with
decomposed relative positions; a neck to 256 channels) and SAM's prompt encoder and mask decoder (shared with
LiteMedSAM, :mod:`FMSegCore.models.sam_decoder`). Names follow segment-anything, so ``medsam_vit_b.pth`` (a plain
state_dict) loads with strict keys.

Input: a slice min-max scaled to [0, 1], resized to 1024x1024, on 3 channels (MedSAM's inference script); box
prompts in those pixel coordinates; output 256x256 low-resolution mask logits. 93.7 M parameters: about a second
per slice encoding on a GPU and tens of seconds on a CPU, so LiteMedSAM stays the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from FMSegCore.models.checkpoints import load_strict
from FMSegCore.models.litemedsam import LiteMedSAM
from FMSegCore.models.sam_decoder import MLPBlock
from FMSegCore.models.tiny_vit import LayerNorm2d


def relative_positions(size: int, table: torch.Tensor) -> torch.Tensor:
    """The ``(size, size, C)`` embeddings of query-key offsets along one axis from a ``(2 size - 1, C)`` table
    (resized linearly when it was learnt for another size)."""
    if table.shape[0] != 2 * size - 1:
        table = F.interpolate(table.T[None], size=2 * size - 1, mode="linear")[0].T
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head self-attention over an (h, w) grid of tokens with decomposed relative positions."""

    def __init__(self, dim: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.heads, height * width, -1).unbind(0)
        attention = (q * self.scale) @ k.transpose(-2, -1)
        grid_q = q.reshape(batch * self.heads, height, width, -1)
        along_h = torch.einsum("bhwc,hkc->bhwk", grid_q, relative_positions(height, self.rel_pos_h))
        along_w = torch.einsum("bhwc,wkc->bhwk", grid_q, relative_positions(width, self.rel_pos_w))
        attention = (attention.view(-1, height, width, height, width) + along_h[..., :, None]
                     + along_w[..., None, :]).view(-1, height * width, height * width)
        out = (attention.softmax(dim=-1) @ v).view(batch, self.heads, height, width, -1)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim))


class Block(nn.Module):
    """Pre-norm transformer block; ``window`` > 0 attends within non-overlapping windows (padded to fit)."""

    def __init__(self, dim: int, heads: int, window: int, grid: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, dim * 4, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            batch, height, width, dim = x.shape
            w = self.window
            pad_h, pad_w = (-height) % w, (-width) % w
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            rows, cols = (height + pad_h) // w, (width + pad_w) // w
            windows = x.view(batch, rows, w, cols, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, dim)
            x = self.attn(windows).view(batch, rows, cols, w, w, dim).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(batch, rows * w, cols * w, dim)[:, :height, :width]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """16x16 patches to tokens, channels last."""

    def __init__(self, dim: int, patch: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: (B, 3, S, S) -> (B, 256, S/16, S/16)."""

    def __init__(self, image_size: int = 1024, dim: int = 768, depth: int = 12, heads: int = 12,
                 window: int = 14, global_blocks: tuple[int, ...] = (2, 5, 8, 11), out_dim: int = 256) -> None:
        super().__init__()
        grid = image_size // 16
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 0 if index in global_blocks else window, grid)
                                    for index in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
                                  nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class MedSAM(LiteMedSAM):
    """MedSAM ViT-B, implementing :class:`~FMSegCore.models.interfaces.PromptableModel2D` (LiteMedSAM's prompt
    handling and decoder; the image encoder and input size differ)."""

    input_size = 1024
    mask_size = 256

    def __init__(self) -> None:
        super().__init__(image_encoder=ImageEncoderViT(image_size=self.input_size))


def load_medsam(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                trainable: bool = False) -> MedSAM:
    """MedSAM from ``medsam_vit_b.pth`` (or any SAM ViT-B state_dict), strict keys, in eval mode."""
    return load_strict(MedSAM(), checkpoint, "MedSAM (SAM ViT-B)").eval().to(device)
