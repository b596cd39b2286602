"""LiteMedSAM: MedSAM distilled into a TinyViT encoder, with SAM's prompt encoder and mask decoder.

Input: a 256x256 image, min-max normalised to [0, 1] and repeated on 3 channels; box prompts in those pixel
coordinates (MedSAM's convention). Output: 256x256 mask logits. 9.79 M parameters. The checkpoint is a plain
state_dict with ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*`` keys.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from FMSegCore.errors import ModelError
from FMSegCore.models.interfaces import PromptBatch2D
from FMSegCore.models.sam_decoder import MaskDecoder, PromptEncoder, TwoWayTransformer
from FMSegCore.models.tiny_vit import TinyViT


class LiteMedSAM(nn.Module):
    """The LiteMedSAM network, implementing :class:`~FMSegCore.models.interfaces.PromptableModel2D`."""

    input_size = 256
    mask_size = 256

    def __init__(self, image_encoder: Optional[nn.Module] = None) -> None:
        """LiteMedSAM's TinyViT, or another SAM image encoder giving (B, 256, 64, 64) from ``input_size``."""
        super().__init__()
        self.image_encoder = TinyViT(img_size=256) if image_encoder is None else image_encoder
        self.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                            input_image_size=(self.input_size, self.input_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
        )
        self._variants: dict[str, nn.Module] = {}  # inference copies in other dtypes (not in the state_dict)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(S, S) slice -> (3, S, S) float tensor, min-max scaled to [0, 1] as MedSAM does."""
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-8)
        return torch.from_numpy(array)[None].expand(3, -1, -1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) -> (B, 256, 64, 64) image embeddings."""
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, 1, 256, 256) and predicted IoU (B,) for a batch of prompts on cached embeddings."""
        points = None
        if prompts.points is not None:
            points = (prompts.points, prompts.point_labels)
        boxes = prompts.boxes[:, None, :] if prompts.boxes is not None else None
        masks = prompts.mask_logits
        if masks is not None and masks.shape[-1] != self.prompt_encoder.mask_input_size[-1]:
            masks = nn.functional.interpolate(masks, size=self.prompt_encoder.mask_input_size, mode="bilinear",
                                              align_corners=False)
        decoder, dtype = self._mask_decoder_for(embeddings.device.type)
        with torch.autocast(embeddings.device.type, enabled=False):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
            low_res, iou = decoder(
                image_embeddings=_select(embeddings, prompts.embedding_index).to(dtype),
                image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
                sparse_prompt_embeddings=sparse.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
                multimask_output=False,
            )
        low_res, iou = low_res.float(), iou.float()
        if low_res.shape[-1] != self.mask_size:
            low_res = nn.functional.interpolate(low_res, size=(self.mask_size, self.mask_size), mode="bilinear",
                                                align_corners=False)
        return low_res, iou[:, 0]

    def _mask_decoder_for(self, device_type: str) -> tuple[nn.Module, torch.dtype]:
        """The mask decoder to run, and its dtype: under CPU bf16 autocast, a bf16 copy of it (casting its
        weights once instead of every call, which makes a call faster; ``fmseg bench prompt --precision
        bf16`` times it)."""
        if device_type == "cpu" and torch.is_autocast_enabled("cpu") and _cpu_autocast_dtype() == torch.bfloat16:
            if "bf16" not in self._variants:
                self._variants["bf16"] = copy.deepcopy(self.mask_decoder).to(torch.bfloat16).eval()
            return self._variants["bf16"], torch.bfloat16
        return self.mask_decoder, self.mask_decoder.iou_token.weight.dtype

    def decode_trainable(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> torch.Tensor:
        """Low-resolution mask logits (B, 1, 256, 256) of box and/or point prompts, one per embedding, through
        the model's own prompt encoder and mask decoder (gradients flow; no inference copies), for training."""
        points = (prompts.points, prompts.point_labels) if prompts.points is not None else None
        boxes = prompts.boxes[:, None, :] if prompts.boxes is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, _ = self.mask_decoder(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, False)
        return low_res

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Reference-style forward: images (B, 3, 256, 256) and one box each (B, 4) -> low-res logits."""
        prompts = PromptBatch2D(embedding_index=torch.arange(image.shape[0]), boxes=boxes)
        return self.decode_trainable(self.encode(image), prompts)


def _select(embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``embeddings[index]``, without a copy when the index takes each embedding once, in order."""
    if index.numel() == embeddings.shape[0] and bool((index == torch.arange(index.numel(), device=index.device)).all()):
        return embeddings
    return embeddings[index]


def _cpu_autocast_dtype() -> torch.dtype:
    getter = getattr(torch, "get_autocast_dtype", None)
    return getter("cpu") if getter is not None else torch.get_autocast_cpu_dtype()


def load_litemedsam(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                    trainable: bool = False) -> LiteMedSAM:
    """Build LiteMedSAM and load a checkpoint (``weights_only=True``, strict keys); prepared for inference
    (BatchNorm folded), or left ``trainable`` for adaptation."""
    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ModelError(f"{checkpoint}: cannot load LiteMedSAM checkpoint ({error})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model = LiteMedSAM()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        summary = str(error).splitlines()[0]
        raise ModelError(f"{checkpoint}: not a LiteMedSAM checkpoint ({summary})") from None
    model.eval()
    if not trainable:
        model.image_encoder.fuse_for_inference()
    return model.to(device)
