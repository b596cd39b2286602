"""SAM's prompt encoder and mask decoder (two-way transformer), shared by every SAM-family 2D model.

Parameter names follow segment-anything (``prompt_encoder.*``, ``mask_decoder.*``), so SAM, MedSAM and
LiteMedSAM checkpoints load unchanged. Coordinates are pixels of the encoder's input image (x, y).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from FMSegCore.models.tiny_vit import LayerNorm2d, gelu


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) with a fixed random Gaussian frequency matrix."""

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode coordinates normalised to [0, 1]."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding (C, H, W) of a grid of pixel centres."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode (B, N, 2) pixel coordinates (x, y) of an image of ``image_size`` (H, W)."""
        normalised = coords.clone().float()
        normalised[..., 0] = normalised[..., 0] / image_size[1]
        normalised[..., 1] = normalised[..., 1] / image_size[0]
        return self._encode(normalised)


class PromptEncoder(nn.Module):
    """Embeds points (label 1 include, 0 exclude, -1 padding), boxes and low-resolution mask prompts."""

    def __init__(self, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (256, 256), mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # negative point, positive point, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self._dense_pe: Optional[torch.Tensor] = None

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding (1, C, H, W) of the image embedding grid; cached outside training."""
        if self.training or torch.is_grad_enabled():
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        if self._dense_pe is None or self._dense_pe.device != self.pe_layer.positional_encoding_gaussian_matrix.device:
            self._dense_pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
        return self._dense_pe

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        embedding = embedding + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 2), self.input_image_size)
        corner_labels = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return corners + corner_labels

    def forward(self, points: Optional[tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
                masks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, C) and dense (B, C, H, W) prompt embeddings."""
        batch = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else (
            masks.shape[0] if masks is not None else 1)
        weight = self.point_embeddings[0].weight
        sparse = torch.empty((batch, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense


class MLPBlock(nn.Module):
    """Linear, activation, Linear (keys ``lin1``, ``lin2``); ReLU in the decoder, GELU in ViT encoders."""

    def __init__(self, embedding_dim: int, mlp_dim: int, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of the internal dimension."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.view(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        batch, heads, tokens, per_head = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * per_head))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, MLP, image-to-token attention."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer: prompt tokens and image tokens attend to each other."""

    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0),
                                 attention_downsample_rate=attention_downsample_rate)
            for i in range(depth)
        ])
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Token layout (B, H*W, C), made contiguous once: every later add and projection then runs unstrided.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (keys ``layers.i``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def upscale_2x(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A 2x2, stride-2 transposed convolution on a channels-last map (B, H, W, C) -> (B, 2H, 2W, C').

    Each input pixel writes its own 2x2 output block, so the layer is one matrix product (to 2 x 2 x C' values
    per pixel) and a pixel shuffle: much faster on CPU than the convolution kernel.
    """
    batch, height, width, channels = x.shape
    out_channels = conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(channels, 4 * out_channels)  # rows c; columns (a, b, c')
    bias = conv.bias.repeat(4) if conv.bias is not None else torch.zeros(4 * out_channels, device=x.device)
    blocks = torch.addmm(bias.to(x.dtype), x.reshape(-1, channels), weight.to(x.dtype))
    blocks = blocks.view(batch, height, width, 2, 2, out_channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, 2 * height, 2 * width, out_channels)


class MaskDecoder(nn.Module):
    """Predicts mask logits at 4x the embedding resolution, and their IoU, from image and prompt embeddings."""

    def __init__(self, transformer_dim: int = 256, transformer: Optional[nn.Module] = None,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer = transformer if transformer is not None else TwoWayTransformer()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def attend(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
               dense_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        """The part the 2-D and 3-D decoders share: the output tokens (IoU, masks) joined to the prompt tokens,
        the image embedding (repeated per prompt) plus the dense prompt, through the two-way transformer. The
        tokens out ``hs`` (B, T, C), the image tokens out (B, N, C) and the image embedding's shape (B, C, ...)."""
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((tokens, sparse_prompt_embeddings), dim=1)
        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(src, tokens.shape[0] // src.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos = image_pe.expand(tokens.shape[0], *image_pe.shape[1:])
        hs, image_tokens = self.transformer(src, pos, tokens)
        return hs, image_tokens, src.shape

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, M, 4H, 4W) and predicted IoU (B, M); M is 1, or 3 with ``multimask_output``."""
        hs, src, (batch, channels, height, width) = self.attend(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                                dense_prompt_embeddings)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]
        # Upscaling in channels-last layout: the transformer's image tokens (B, H*W, C) are already that.
        up1, norm, _, up2, _ = self.output_upscaling
        upscaled = upscale_2x(up1, src.reshape(batch, height, width, channels))
        upscaled = gelu(F.layer_norm(upscaled, (upscaled.shape[-1],), norm.weight, norm.bias, norm.eps))
        upscaled = gelu(upscale_2x(up2, upscaled))
        needed = range(self.num_mask_tokens) if multimask_output else range(1)  # single mask: token 0 only
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in needed], dim=2)
        b, h, w, c = upscaled.shape
        masks = (upscaled.view(b, h * w, c) @ hyper_in).transpose(1, 2).reshape(b, -1, h, w)
        iou = self.iou_prediction_head(iou_token_out)
        if multimask_output:
            return masks[:, 1:], iou[:, 1:]
        return masks, iou[:, :1]
