"""SAM-Med3D-turbo (uni-medical/SAM-Med3D, ``sam_model_registry3D["vit_b_ori"]``): a fully 3-D Segment Anything,
implementing :class:`~FMSegCore.models.interfaces.PromptableModel3D`.

Architecture (segment-anything style, every 2-D operation made 3-D; 100,509,232 parameters):

- ``image_encoder``: a ViT-B over a 128^3 crop. A 16^3 patch embedding (``Conv3d``) gives an 8x8x8 grid of 768-d
  tokens plus a learnt absolute ``pos_embed``; 12 pre-norm blocks (LayerNorm eps 1e-6, 12 heads, GELU MLP x4),
  with decomposed relative positions (``rel_pos_d/h/w`` added to the attention logits). Blocks 2, 5, 8 and 11
  attend globally over the 8^3 grid; the others attend in 14^3 windows. The grid (8^3) is smaller than one
  window, so those blocks see the grid zero-padded to 14^3 (the padded tokens act as keys, as in the official
  code): here the padding is done on the projected tokens (a zero token projects to the qkv bias) and only the
  512 real tokens are queried, which gives the same result for far less work. The official relative-position
  term broadcasts its three axes onto unexpected key axes (see :meth:`Attention3D._relative_bias`); the
  trained weights expect that, so it is reproduced exactly. A neck (1x1 conv, LayerNorm3d,
  3x3x3 conv, LayerNorm3d, no biases) maps to 384 channels: the embedding is ``(B, 384, 8, 8, 8)``.
- ``prompt_encoder``: random-Fourier positional encoding of 3-D coordinates (a fixed ``(3, 128)`` Gaussian
  matrix, ``cat([sin, cos, sin])`` of ``2*pi*(2c - 1) @ G``), two point-label embeddings (exclude, include), a
  not-a-point embedding for the padding point appended when no box is given, and a mask path (two stride-2
  ``Conv3d`` + LayerNorm3d + GELU, then 1x1x1 to 384) for a previous low-resolution mask ``(B, 1, 32, 32, 32)``,
  or ``no_mask_embed`` when there is none.
- ``mask_decoder``: SAM's two-way transformer (depth 2, 8 heads, MLP 2048; shared with the 2-D models in
  :mod:`FMSegCore.models.sam_decoder`), then two stride-2 ``ConvTranspose3d`` upscalings to 32^3 and
  hypernetwork MLPs: logits ``(B, 1, 32, 32, 32)`` (or mask tokens 1..3 with ``multimask_output``) and the
  predicted IoU.

Official layout: the state_dict keys are the official ones (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``; 324 tensors, the Gaussian matrix included as a persistent buffer). The official
``pixel_mean``/``pixel_std`` are non-persistent and unused by the 3-D model, so they are left out. The release
``sam_med3d_turbo.pth`` is a training checkpoint with the state_dict under ``["model_state_dict"]``;
:func:`load_sam_med3d` reads it (or a plain state_dict) with ``weights_only=True`` and strict keys.

Conventions of the official pipeline (``utils/infer_utils.py`` and ``train.py``) that this wrapper follows:

- Input: a 128^3 crop at 1.5 mm, z-normalised by torchio's ``ZNormalization(masking_method=lambda x: x > 0)``:
  the mean and the (unbiased) standard deviation of the voxels > 0 normalise the whole crop. (Training also
  clamps CT to [-1000, 1000] first; inference does not, and neither does :meth:`SAMMed3D.preprocess`.)
- Axes: the official volumes are torchio tensors ``(C, i, j, k)`` of a canonical (RAS+) image, so the network's
  spatial dims are (I, J, K) of the volume (random flips were a training augmentation, axis order was not).
  FMSeg's crops are ``(K, J, I)`` arrays, so :meth:`SAMMed3D.encode` transposes them to ``(I, J, K)``,
  :meth:`SAMMed3D.decode` passes points (i, j, k) unchanged as the official coordinates (indices along the
  network's dims 2, 3, 4, shifted by +0.5 inside) and transposes mask prompts and logits between (K, J, I) and
  (I, J, K).
- Masks: the official loop passes ``zeros(1, 1, 32, 32, 32)`` as the mask prompt at the first click (training
  does the same; ``no_mask_embed`` is never trained), then the previous low-resolution logits.
- Boxes: the official code cannot embed boxes (``_embed_boxes`` indexes point embeddings 2 and 3, which do not
  exist); :meth:`SAMMed3D.decode` turns each box into an include point at its centre.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from FMSegCore.models.checkpoints import load_strict
from FMSegCore.models.interfaces import PromptBatch3D
from FMSegCore.models.sam_decoder import MaskDecoder, MLPBlock, PromptEncoder, TwoWayTransformer
from FMSegCore.models.tiny_vit import LayerNorm2d

#: The crop the network was trained on: voxels and mm.
CROP_SIZE = 128
CROP_SPACING_MM = 1.5


class LayerNorm3d(LayerNorm2d):
    """LayerNorm over the channels of an NCDHW map (eps 1e-6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


# ---------------------------------------------------------------------------------------------- image encoder
class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches -> channels-last tokens (B, D, H, W, C) (key ``proj``)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


def _relative_positions(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Rows of a relative-position table (2 * k_size - 1, C) for query positions 0..q_size-1 and key positions
    0..k_size-1 of the same window: (q_size, k_size, C), row ``q - k + k_size - 1``."""
    if table.shape[0] != 2 * k_size - 1:
        raise ValueError(f"relative positions for {table.shape[0]} offsets, but the attention spans {k_size} "
                         f"tokens: SAM-Med3D takes {CROP_SIZE}^3 crops only")
    q = torch.arange(q_size, device=table.device)[:, None]
    k = torch.arange(k_size, device=table.device)[None, :]
    return table[q - k + (k_size - 1)]


def _partition(x: torch.Tensor, window: int, fill: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> windows (B * n, window, window, window, C), the grid padded at its end with ``fill``."""
    batch, d, h, w, channels = x.shape
    sizes = [-(-n // window) * window for n in (d, h, w)]
    if sizes != [d, h, w]:
        padded = fill.to(x.dtype).expand(batch, *sizes, channels).clone()
        padded[:, :d, :h, :w] = x
        x = padded
    nd, nh, nw = (n // window for n in sizes)
    x = x.view(batch, nd, window, nh, window, nw, window, channels).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, window, window, window, channels)


def _unpartition(windows: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`_partition`: windows -> (B, D, H, W, C), the padding cut off."""
    window, channels = windows.shape[1], windows.shape[-1]
    nd, nh, nw = (-(-n // window) for n in grid)
    x = windows.view(batch, nd, nh, nw, window, window, window, channels).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(batch, nd * window, nh * window, nw * window, channels)
    return x[:, :grid[0], :grid[1], :grid[2]]


class Attention3D(nn.Module):
    """Multi-head self-attention over a 3-D token grid with decomposed relative positions (keys ``qkv``, ``proj``,
    ``rel_pos_d/h/w``); global (``window_size`` 0) or in cubic windows (grid zero-padded to whole windows)."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int, int], window_size: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) normalised tokens -> attention output (B, D, H, W, C)."""
        batch, d, h, w, channels = x.shape
        heads, per_head = self.num_heads, channels // self.num_heads
        qkv = self.qkv(x)
        if self.window_size:
            # Zero tokens pad the grid to whole windows; their projection is the qkv bias.
            qkv = _partition(qkv, self.window_size, self.qkv.bias)
        groups, n = qkv.shape[0], qkv.shape[1]  # windows (or crops), and their side
        if tuple(qkv.shape[1:4]) != (n, n, n):
            raise ValueError(f"SAM-Med3D attends over cubic grids only, not {tuple(qkv.shape[1:4])}")
        # Only queries that are kept need computing: with one window per crop, the real tokens.
        qd, qh, qw = (d, h, w) if groups == batch else (n, n, n)
        q, k, v = qkv.reshape(groups, n, n, n, 3, heads, per_head).permute(4, 0, 5, 1, 2, 3, 6)
        q = q[:, :, :qd, :qh]  # (G, heads, qd, qh, n, c): every position along the last axis (see below)
        bias = self._relative_bias(q, qw, n).to(q.dtype)
        queries = q[:, :, :, :, :qw].reshape(groups, heads, qd * qh * qw, per_head)
        out = F.scaled_dot_product_attention(queries, k.reshape(groups, heads, n ** 3, per_head),
                                             v.reshape(groups, heads, n ** 3, per_head), attn_mask=bias)
        out = self.proj(out.transpose(1, 2).reshape(groups, qd, qh, qw, channels))
        if groups > batch:
            out = _unpartition(out, batch, (d, h, w))
        return out

    def _relative_bias(self, q: torch.Tensor, qw: int, n: int) -> torch.Tensor:
        """The relative-position logits (G, heads, queries, n^3) exactly as the official code adds them.

        The official ``add_decomposed_rel_pos`` computes ``r_a[query, key_offset] = q[query] . rel_pos_a[...]``
        for each axis a, then broadcasts ``r_d[:, :, :, :, None, None]``, ``r_h[:, :, :, None, :, None]`` and
        ``r_w[:, :, :, None, None, :]`` onto the (qd, qh, qw, kd, kh, kw) logits. Those index patterns line the
        key offset up with the key's last axis and a query axis with a key axis, so for query (i, j, l) and key
        (p, r, s) the bias is ``q[i,j,l].Td[i-s] + q[i,j,p].Th[j-s] + q[i,j,r].Tw[r-s]`` (T at offset + n - 1).
        The trained weights expect exactly this, so it is reproduced here; ``q`` holds the queries at every
        position of the last axis because the second and third terms read them at key positions.
        """
        qd, qh = q.shape[2], q.shape[3]
        td = _relative_positions(self.rel_pos_d, qd, n).to(q.dtype)  # (qd, n, c): Td[i - s]
        th = _relative_positions(self.rel_pos_h, qh, n).to(q.dtype)  # (qh, n, c): Th[j - s]
        tw = _relative_positions(self.rel_pos_w, n, n).to(q.dtype)   # (n, n, c): Tw[r - s]
        first = torch.einsum("gnijlc,isc->gnijls", q[:, :, :, :, :qw], td)
        second = torch.einsum("gnijpc,jsc->gnijps", q, th)
        third = torch.einsum("gnijrc,rsc->gnijrs", q, tw)
        bias = (first[:, :, :, :, :, None, None, :] + second[:, :, :, :, None, :, None, :]
                + third[:, :, :, :, None, None, :, :])
        return bias.reshape(q.shape[0], q.shape[1], qd * qh * qw, n ** 3)


class Block3D(nn.Module):
    """Pre-norm transformer block: attention (windowed or global) and MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int], window_size: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = grid if window_size == 0 else (window_size,) * 3
        self.attn = Attention3D(dim, num_heads, size, window_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """ViT-B 3-D image encoder: (B, 1, 128, 128, 128) -> (B, 384, 8, 8, 8)."""

    def __init__(self, img_size: int = CROP_SIZE, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, out_chans: int = 384, window_size: int = 14,
                 global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)) -> None:
        super().__init__()
        side = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, 1, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, side, side, side, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, (side, side, side), 0 if i in global_attn_indexes else window_size)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))


# ---------------------------------------------------------------------------------------------- prompt encoder
class PositionEmbeddingRandom3D(nn.Module):
    """Fourier features ``cat([sin, cos, sin])`` of 3-D coordinates with a fixed Gaussian matrix (3, F)."""

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode coordinates normalised to [0, 1]."""
        coords = 2 * np.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding (C, X, Y, Z) of a grid of voxel centres; as in the official code, its first coordinate
        follows the grid's second dim and its second coordinate the first dim."""
        device = self.positional_encoding_gaussian_matrix.device
        centres = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) for n in size]
        a, b, c = torch.meshgrid(*centres, indexing="ij")
        grid = torch.stack([b / size[0], a / size[1], c / size[2]], dim=-1)
        return self._encode(grid).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """Encode (B, N, 3) voxel coordinates of an input of ``image_size``."""
        scale = torch.tensor(image_size, device=coords.device, dtype=torch.float32)
        return self._encode(coords.float() / scale)


class PromptEncoder3D(PromptEncoder):
    """SAM's prompt encoder in 3-D: points (label 1 include, 0 exclude, -1 padding) and a low-resolution mask.

    The 2-D :class:`~FMSegCore.models.sam_decoder.PromptEncoder` with its dimension-specific parts replaced in
    place (same keys, same order): a 3-D positional encoding, two point embeddings (the official model has no
    box corners) and a 3-D mask path. Point embedding and the cached dense PE are the 2-D code's.
    """

    def __init__(self, embed_dim: int = 384, image_embedding_size: tuple[int, int, int] = (8, 8, 8),
                 input_image_size: tuple[int, int, int] = (CROP_SIZE,) * 3, mask_in_chans: int = 16) -> None:
        super().__init__(embed_dim, image_embedding_size[:2], input_image_size[:2], mask_in_chans)
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.mask_input_size = tuple(4 * n for n in image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(2)])  # exclude, include
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        raise ValueError("SAM-Med3D has no box embeddings (give the box as points)")

    def forward(self, points: Optional[tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
                masks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, C) and dense (B, C, X, Y, Z) prompt embeddings; ``points`` in official coordinates
        (indices along the network input's dims 2, 3, 4)."""
        if boxes is not None:
            self._embed_boxes(boxes)
        batch = points[0].shape[0] if points is not None else masks.shape[0] if masks is not None else 1
        weight = self.point_embeddings[0].weight
        sparse = torch.empty((batch, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=True)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense


# ---------------------------------------------------------------------------------------------- mask decoder
class MaskDecoder3D(MaskDecoder):
    """SAM's mask decoder in 3-D: the shared two-way transformer and MLP heads, 3-D transposed-conv upscaling
    (the 2-D :class:`~FMSegCore.models.sam_decoder.MaskDecoder` with ``output_upscaling`` replaced in place)."""

    def __init__(self, transformer_dim: int = 384, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256) -> None:
        transformer = TwoWayTransformer(depth=2, embedding_dim=transformer_dim, num_heads=8, mlp_dim=2048)
        super().__init__(transformer_dim, transformer, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, M, 4X, 4Y, 4Z) and predicted IoU (B, M); M is 1, or 3 with ``multimask_output``."""
        hs, src, (batch, channels, x, y, z) = self.attend(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                          dense_prompt_embeddings)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(batch, channels, x, y, z))
        needed = range(1, self.num_mask_tokens) if multimask_output else range(1)  # single mask: token 0
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in needed], dim=1)
        b, c = upscaled.shape[:2]
        masks = (hyper_in @ upscaled.reshape(b, c, -1)).reshape(b, -1, *upscaled.shape[2:])
        iou = self.iou_prediction_head(hs[:, 0])
        return masks, (iou[:, 1:] if multimask_output else iou[:, :1])


# ---------------------------------------------------------------------------------------------- the model
class SAMMed3D(nn.Module):
    """SAM-Med3D-turbo, implementing :class:`~FMSegCore.models.interfaces.PromptableModel3D`."""

    crop_shape = (CROP_SIZE, CROP_SIZE, CROP_SIZE)
    crop_spacing_mm = (CROP_SPACING_MM, CROP_SPACING_MM, CROP_SPACING_MM)
    #: Side of the low-resolution mask logits :meth:`decode` returns (and takes as a mask prompt).
    mask_size = CROP_SIZE // 4

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = ImageEncoderViT3D()
        self.prompt_encoder = PromptEncoder3D()
        self.mask_decoder = MaskDecoder3D()
        #: Without a previous mask, :meth:`decode` passes a zero mask, as the official loop and training do
        #: at the first click; False uses ``no_mask_embed`` instead (never trained).
        self.zero_mask_without_previous = True

    def preprocess(self, crop: np.ndarray) -> torch.Tensor:
        """A (K, J, I) crop of raw intensities -> (1, K, J, I) float32, z-normalised as torchio's
        ``ZNormalization(masking_method=lambda x: x > 0)``: mean and unbiased std of the voxels > 0. Where fewer
        than two voxels are > 0 (or they are all equal) all voxels give the statistics; a constant crop -> 0."""
        array = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
        values = array[array > 0]
        if values.numel() < 2 or float(values.std()) == 0.0:
            values = array.reshape(-1)
        mean = values.mean()
        std = values.std() if values.numel() > 1 else torch.zeros(())
        centred = array - mean
        normalised = centred / std if float(std) > 0 else centred
        return normalised[None]

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """Preprocessed crops (B, 1, K, J, I) -> embeddings (B, 384, 8, 8, 8), on the network's (I, J, K) axes."""
        return self.image_encoder(crops.transpose(2, 4))

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch3D) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (B, 1, 32, 32, 32) over the crop's (K, J, I) axes and the predicted IoU (B,).

        Points are crop voxel indices (i, j, k); each box becomes an include point at its centre. A previous
        mask (``prompts.mask_logits``, (K, J, I) logits of any size) refines the result.
        """
        index = prompts.embedding_index
        points, labels = prompts.points, prompts.point_labels
        if prompts.boxes is not None:
            boxes = prompts.boxes.float()
            centres = ((boxes[:, :3] + boxes[:, 3:]) / 2)[:, None]
            ones = torch.ones(centres.shape[:2], dtype=torch.long, device=centres.device)
            points = centres if points is None else torch.cat([points.float(), centres], dim=1)
            labels = ones if labels is None else torch.cat([labels.long(), ones], dim=1)
        batch = index.shape[0]
        device = embeddings.device
        masks = prompts.mask_logits
        if masks is not None:
            masks = masks.float().transpose(2, 4)
            if tuple(masks.shape[2:]) != self.prompt_encoder.mask_input_size:
                masks = F.interpolate(masks, size=self.prompt_encoder.mask_input_size, mode="trilinear",
                                      align_corners=False)
        elif self.zero_mask_without_previous:
            masks = torch.zeros((batch, 1, *self.prompt_encoder.mask_input_size), device=device)
        with torch.autocast(device.type, enabled=False):
            point_prompt = None if points is None else (points.float().to(device), labels.to(device))
            sparse, dense = self.prompt_encoder(points=point_prompt, boxes=None, masks=masks)
            low_res, iou = self.mask_decoder(
                image_embeddings=_select(embeddings, index).float(),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return low_res.transpose(2, 4), iou[:, 0]


def _select(embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``embeddings[index]``, without a copy when the index takes each embedding once, in order."""
    if index.numel() == embeddings.shape[0] and bool((index.cpu() == torch.arange(index.numel())).all()):
        return embeddings
    return embeddings[index.to(embeddings.device)]


def build_sam_med3d() -> SAMMed3D:
    """An untrained SAM-Med3D (``vit_b_ori``) in eval mode."""
    return SAMMed3D().eval()


def load_sam_med3d(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                   trainable: bool = False) -> SAMMed3D:
    """Build SAM-Med3D and load a checkpoint (``weights_only=True``, strict keys) in eval mode.

    Accepts the release's training checkpoint (state_dict under ``"model_state_dict"``) or a plain state_dict.
    Raises :class:`~FMSegCore.errors.ModelError` with a one-line message on an unreadable or wrong checkpoint.
    ``trainable`` changes nothing: the same network trains.
    """
    del trainable
    return load_strict(SAMMed3D(), checkpoint, "SAM-Med3D").eval().to(device)
