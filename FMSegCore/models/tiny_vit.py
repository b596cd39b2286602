"""TinyViT image encoder, in the variant LiteMedSAM (MedSAM distilled into MobileSAM's encoder) uses.

A 256x256 image becomes a 256-channel 64x64 embedding: a 1x1 patch embedding, one convolutional stage of
MBConv blocks at full resolution, three stages of windowed-attention blocks (at 128, 64 and 64 pixels), and
SAM's neck. Parameter names and numerics match the LiteMedSAM checkpoint (``image_encoder.*`` keys).

For inference, :meth:`TinyViT.fuse_for_inference` folds every BatchNorm into its convolution and keeps
feature maps channels-last, so convolutions, linear layers and window attention run without layout copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU; in place when no gradient is recorded (large feature maps: saves allocation and traffic)."""
    if torch.is_grad_enabled():
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (keys ``c.*`` and ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0.0)

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        """An equivalent single convolution with the BatchNorm statistics folded in (inference only)."""
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          groups=conv.groups, bias=True)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused.to(conv.weight.device, conv.weight.dtype)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (SAM's neck)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Two 1x1 ConvBN layers with GELU between (no downsampling in LiteMedSAM)."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_channels, embed_dim // 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](gelu(self.seq[0](x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, channels: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = ConvBN(channels, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, channels, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gelu(self.conv1(x))
        y = gelu(self.conv2(y))
        return gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv (stride 2, or 1 for the last stage), 1x1 conv; returns tokens (B, L, C)."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            height, width = self.resolution
            x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        x = gelu(self.conv1(x))
        x = gelu(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks then a PatchMerging downsample."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, out_dim: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(self.norm(x))))


def relative_offset_index(window: int) -> tuple[torch.Tensor, int]:
    """For every pair of positions in a window, the index of their absolute (dy, dx) offset, and the count."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    indices = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            indices.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(indices, dtype=torch.long).view(len(points), len(points)), len(offsets)


class Attention(nn.Module):
    """Multi-head self-attention within a window, with a learned bias per head and relative offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index, count = relative_offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        self.register_buffer("attention_bias_idxs", index, persistent=False)
        self._cached_bias: torch.Tensor | None = None

    def bias(self) -> torch.Tensor:
        """The (heads, N, N) additive attention bias; cached outside training."""
        if self.training or torch.is_grad_enabled():
            self._cached_bias = None
            return self.attention_biases[:, self.attention_bias_idxs]
        if self._cached_bias is None or self._cached_bias.dtype != self.attention_biases.dtype:
            self._cached_bias = self.attention_biases[:, self.attention_bias_idxs].detach()
        return self._cached_bias

    def train(self, mode: bool = True) -> Attention:
        self._cached_bias = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)
        bias = self.bias().to(q.dtype)[None]  # (1, heads, N, N): the mask shape SDPA's fused CPU kernel takes
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(batch, -1, -1, -1))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded windows), depthwise 3x3 local conv, MLP; residuals around both."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        batch, tokens, channels = x.shape
        w = self.window
        if height == w and width == w:
            return self.attn(x)
        pad_b, pad_r = (w - height % w) % w, (w - width % w) % w
        grid = F.pad(x.view(batch, height, width, channels), (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = height + pad_b, width + pad_r
        windows = grid.view(batch, ph // w, w, pw // w, w, channels).transpose(2, 3).reshape(-1, w * w, channels)
        out = self.attn(windows)
        out = out.view(batch, ph // w, pw // w, w, w, channels).transpose(2, 3).reshape(batch, ph, pw, channels)
        return out[:, :height, :width].reshape(batch, tokens, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        batch, tokens, channels = x.shape
        x = x + self.windowed_attention(x)
        # A channels-last NCHW view of the token grid: the depthwise conv needs no layout copy.
        grid = x.view(batch, height, width, channels).permute(0, 3, 1, 2)
        x = self.local_conv(grid).permute(0, 2, 3, 1).reshape(batch, tokens, channels)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    """A stage of TinyViT blocks, optionally followed by PatchMerging."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, out_dim: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio) for _ in range(depth)]
        )
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64)."""

    def __init__(self, img_size: int = 256, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (2, 4, 5, 10),
                 window_sizes: Sequence[int] = (7, 7, 14, 7), mlp_ratio: float = 4.0,
                 mbconv_expand_ratio: float = 4.0, out_chans: int = 256) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for index, dim in enumerate(embed_dims):
            scale = 2 ** (index - 1 if index == 3 else index)
            resolution = (img_size // scale, img_size // scale)
            out_dim = embed_dims[index + 1] if index + 1 < len(embed_dims) else None
            if index == 0:
                self.layers.append(ConvStage(dim, resolution, depths[0], out_dim, mbconv_expand_ratio))
            else:
                self.layers.append(AttentionStage(dim, resolution, depths[index], num_heads[index],
                                                  window_sizes[index], mlp_ratio, out_dim))
        self.embedding_size = img_size // 4
        self.stem_channels = embed_dims[1]  # channels of the stem's output tokens
        self.out_channels = out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    #: The encoder's stages, run in order (then the neck). Stages before the first one with trainable
    #: parameters can be computed once per image when adapting (the first two, at the highest resolutions, take a
    #: large share of an encoder pass on CPU).
    stages = ("patch_embed", "layers.0", "layers.1", "layers.2", "layers.3")
    #: The stage whose output is the stem feature map (128 channels at half resolution), for decoders' skips.
    stem_stage = 1
    #: Regular expressions for what parameter-efficient methods adapt: attention projections and MLPs.
    attention_patterns = (r"layers\.\d+\.blocks\.\d+\.attn\.qkv$",)
    mlp_patterns = (r"layers\.\d+\.blocks\.\d+\.mlp$",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_trunk(self.forward_stem(x))

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Run stages ``start`` .. ``stop - 1`` (indices into :attr:`stages`) on their input."""
        modules = [self.patch_embed, *self.layers]
        for module in modules[start:stop]:
            x = module(x)
        return x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> stem tokens (B, (S/2)^2, 128): patch embedding and the convolutional stage."""
        return self.run_stages(x, 0, self.stem_stage + 1)

    def stem_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """Stem tokens as an NCHW feature map (B, 128, S/2, S/2), for decoders that want fine detail."""
        batch, count, channels = tokens.shape
        side = int(round(count ** 0.5))
        return tokens.transpose(1, 2).reshape(batch, channels, side, side)

    def forward_trunk(self, x: torch.Tensor, start: Optional[int] = None) -> torch.Tensor:
        """Tokens entering stage ``start`` (default: after the stem) -> (B, 256, S/4, S/4) embeddings."""
        x = self.run_stages(x, self.stem_stage + 1 if start is None else start)
        batch, _, channels = x.shape
        side = self.embedding_size
        x = x.view(batch, side, side, channels).permute(0, 3, 1, 2)
        return self.neck(x)

    @torch.no_grad()
    def fuse_for_inference(self) -> TinyViT:
        """Fold BatchNorm into convolutions (in place) and switch to channels-last; for inference only."""
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, ConvBN):
                    setattr(parent, name, child.fused())
        self.eval()
        return self.to(memory_format=torch.channels_last)
