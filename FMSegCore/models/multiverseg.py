"""MultiverSeg (Wong et al., ICCV 2025): interactive in-context segmentation.

A UniverSeg-style network whose target is not a bare image but a 5-channel *target input* carrying the user's
prompts on the query, so a result defined by a context (support) set of labelled examples can be corrected with
a box, clicks, scribbles and the previous prediction (ScribblePrompt's prompt encoding).

**The 5-channel target** ``(B, 5, H, W)``, channels in this order (the official ``prepare_inputs``):

0. the image in [0, 1];
1. the box: 1 on rows ``y1:y2`` and columns ``x1:x2`` (end-exclusive), 0 elsewhere (several boxes: union);
2. include: 1 at every positive click's pixel ``[y, x]`` plus the positive scribbles, clamped to [0, 1];
3. exclude: the same for negative clicks and scribbles;
4. the previous prediction's logits, or zeros.

:func:`prompt_maps` rasterises raw prompts into a :class:`~FMSegCore.models.interfaces.PromptMaps2D` and
:func:`target_input` stacks it under the image.

**Architecture** (``MultiverSegNet(in_channels=[5, 2], encoder_blocks=[256]*4, block_kws=dict(conv_kws=
dict(norm="layer")), cross_relu=True)``, 18,903,297 parameters, trained at 128x128): a U-Net of
:class:`CrossBlock` modules (4 encoder blocks with max-pooling, 3 decoder blocks with align-corners bilinear
upsampling and ``[upsampled, skip]`` concatenation), then a 1x1 convolution to one logit. In each block:

- the cross convolution (3x3, ``target + support`` input channels, target first) is applied to every (target,
  support item) pair, followed by LeakyReLU(0.01) (no norm); as in our UniverSeg it is computed as a target term
  plus a support term with the weight split along its input channels (the official ``FastCrossConv2d``);
- the new target is the mean of the pair outputs over the support items, the new support the pair outputs;
- each then goes through its own :class:`ConvOp`: conv 3x3, LeakyReLU(0.01), GroupNorm(1, C, eps=1e-5), in that
  order (the official ``nn.Sequential`` order, despite a code comment there saying the norm comes first).

The first block takes the 5-channel target and a 2-channel support ``[image, label]``. With LeakyReLU inside the
cross op, the mean over supports no longer commutes with the convolution, so unlike UniverSeg's last block the
pairs are always computed (only the unused support branch of the last block is skipped).

**Official layout**: the checkpoint ``MultiverSeg_v1_nf256_res128.pt`` (v0: same layout) holds the
MultiverSegNet state_dict under ``["model"]``: 72 tensors named ``enc_blocks.{0..3}`` / ``dec_blocks.{0..2}``
``.cross.cross_conv.{weight,bias}`` (one ``(256, 5 + 2, 3, 3)`` weight in the first block) and
``.{target,support}.vmapped.{conv,norml}.{weight,bias}``, and ``out_conv.conv.{weight,bias}``. Our module names
are exactly these, so :func:`load_multiverseg` loads the file with strict keys. Not covered: the official
wrapper's fallback to ScribblePrompt-UNet when no context is given; this network, like the official one, then
uses a single support of constant 0.5 image and label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from FMSegCore.models import universeg
from FMSegCore.models.checkpoints import load_strict
from FMSegCore.models.interfaces import PromptMaps2D
from FMSegCore.models.universeg import Vmap

NUM_PARAMETERS = 18_903_297
#: Channels of the target input: image, box, include, exclude, previous logits.
TARGET_CHANNELS = 5
#: Channels of a support item: image, label.
SUPPORT_CHANNELS = 2
NEGATIVE_SLOPE = 0.01


class ConvOp(nn.Module):
    """Conv2d (``same`` padding), LeakyReLU(0.01), GroupNorm(1, C) -- in this order (official ``norm="layer"``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.nonlin = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.norml = nn.GroupNorm(1, out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norml(self.nonlin(self.conv(x)))


class CrossOp(universeg.CrossOp):
    """UniverSeg's split-weight cross convolution with a LeakyReLU on every pair (official ``cross_relu=True``)."""

    @staticmethod
    def combine(target_term: torch.Tensor, support_term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairwise sum (support batch 1 broadcasts), LeakyReLU; new target = mean over supports, support = pairs."""
        interaction = F.leaky_relu(target_term.unsqueeze(1) + support_term, NEGATIVE_SLOPE)
        return interaction.mean(dim=1), interaction

    def target_only(self, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The new target alone (the nonlinearity rules out UniverSeg's mean-support shortcut)."""
        return self.forward(target, support)[0]


class CrossBlock(universeg.CrossBlock):
    """UniverSeg's block (its ``forward``, ``branches`` and ``target_only`` apply unchanged) built from the
    MultiverSeg :class:`CrossOp` and normalised :class:`ConvOp` branches."""

    def __init__(self, target_channels: int, support_channels: int, features: int) -> None:
        nn.Module.__init__(self)  # not UniverSeg's constructor: it would build (and discard) its own layers
        self.cross = CrossOp(target_channels, support_channels, features)
        self.target = Vmap(ConvOp(features, features))
        self.support = Vmap(ConvOp(features, features))


class MultiverSeg(nn.Module):
    """MultiverSeg v1 (official ``MultiverSegNet``): logits of query slices from a 5-channel target input and a
    context set; implements :class:`~FMSegCore.models.interfaces.InteractiveInContextModel2D`.

    ``forward(target (B,5,H,W) or (B,1,5,H,W), context_images (Bs,S,1,H,W), context_labels (Bs,S,1,H,W))``
    returns logits ``(B,1,H,W)``; images in [0, 1], labels binary; ``Bs`` is ``B`` or 1 (one context set shared
    by all targets); ``H`` and ``W`` divisible by 8 (the official model is trained at 128x128).
    """

    #: Side of the square slices the model is trained on (it is fully convolutional: any multiple of 8 runs).
    input_size = 128

    def __init__(self, encoder_features: tuple[int, ...] = (256, 256, 256, 256),
                 decoder_features: tuple[int, ...] = (256, 256, 256)) -> None:
        super().__init__()
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        target_channels, support_channels = TARGET_CHANNELS, SUPPORT_CHANNELS
        skip_channels = []
        for features in encoder_features:
            self.enc_blocks.append(CrossBlock(target_channels, support_channels, features))
            target_channels = support_channels = features
            skip_channels.append(features)
        skip_channels.pop()  # the deepest block feeds the decoder directly, not through a skip
        for features in decoder_features:
            channels = target_channels + skip_channels.pop()  # [upsampled, skip]
            self.dec_blocks.append(CrossBlock(channels, channels, features))
            target_channels = features
        self.out_conv = universeg.ConvOp(target_channels, 1, kernel_size=1, nonlinearity=False)
        self.downsample = nn.MaxPool2d(2, 2)

    @staticmethod
    def _upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    # -- InteractiveInContextModel2D ---------------------------------------------------------------------------

    def encode_support(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One context set ``(S, 1, N, N)`` -> the stacked support ``(1, S, 2, N, N)`` (``[image, label]``).

        Every layer's support features depend on the query through the cross convolution, and the first layer's
        support term is a negligible part of the cost, so the cache is the stacked input itself.
        """
        if images.dim() != 4 or images.shape[1] != 1 or labels.shape != images.shape:
            raise ValueError(f"context images {tuple(images.shape)} and labels {tuple(labels.shape)} must both "
                             f"be (S, 1, N, N)")
        return torch.cat([images, labels.to(images.dtype)], dim=1).unsqueeze(0)

    def predict(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, N, N)`` of queries ``(B, 1, N, N)`` with no prompts (box, clicks, mask channels 0)."""
        return self.forward(target_input(queries), support=support)

    def predict_with_prompts(self, queries: torch.Tensor, support: torch.Tensor,
                             prompts: PromptMaps2D) -> torch.Tensor:
        """Logits ``(B, 1, N, N)`` of queries ``(B, 1, N, N)`` given prompt maps on them."""
        return self.forward(target_input(queries, prompts), support=support)

    # -- the official network ----------------------------------------------------------------------------------

    def forward(self, target: torch.Tensor, context_images: Optional[torch.Tensor] = None,
                context_labels: Optional[torch.Tensor] = None, *,
                support: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B, 1, H, W)``; the context is ``context_images`` + ``context_labels`` or a stacked
        ``support`` ``(Bs, S, 2, H, W)``; with neither (or ``S == 0``) one support of constant 0.5 is used, as
        the official network does."""
        if target.dim() == 5 and target.shape[1] == 1:
            target = target.squeeze(1)  # the official (B, 1, 5, H, W) form
        if target.dim() != 4 or target.shape[1] != TARGET_CHANNELS:
            raise ValueError(f"target must be (B, 5, H, W) or (B, 1, 5, H, W), got {tuple(target.shape)}")
        batch, _, height, width = target.shape
        if height % 8 or width % 8:
            raise ValueError(f"image size {height}x{width} must be divisible by 8")
        if support is None and context_images is not None and context_labels is not None:
            if context_images.dim() != 5 or context_images.shape[2] != 1 \
                    or context_labels.shape != context_images.shape:
                raise ValueError(f"context images {tuple(context_images.shape)} and labels "
                                 f"{tuple(context_labels.shape)} must both be (B, S, 1, H, W)")
            support = torch.cat([context_images, context_labels.to(context_images.dtype)], dim=2)
        if support is None or support.shape[1] == 0:
            support = torch.full((1, 1, SUPPORT_CHANNELS, height, width), 0.5, dtype=target.dtype,
                                 device=target.device)
        if support.dim() != 5 or support.shape[0] not in (1, batch) or support.shape[2] != SUPPORT_CHANNELS \
                or support.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"support {tuple(support.shape)} does not fit target {tuple(target.shape)}")

        target = universeg.run_cross_unet(self.enc_blocks, self.dec_blocks, target, support, self.downsample,
                                          self._upsample, lambda block, t, s: block.target_only(t, s))
        return self.out_conv(target)


# -- prompts ---------------------------------------------------------------------------------------------------

def _batch_of(*values: Any) -> tuple[int, torch.device]:
    for value in values:
        if value is not None:
            value = torch.as_tensor(value)
            return int(value.shape[0]), value.device
    return 1, torch.device("cpu")


def prompt_maps(size: int, points: Any = None, point_labels: Any = None, box: Any = None,
                scribbles: Any = None, previous_logits: Optional[torch.Tensor] = None) -> PromptMaps2D:
    """Rasterise raw prompts on a ``size`` x ``size`` grid as the official ``prepare_inputs`` does.

    - ``points``: ``(B, n, 2)`` clicks as pixel ``[x, y]`` (column, row; fractions are truncated, as the official
      rescaling does) and ``point_labels`` ``(B, n)``: 1 include, 0 exclude. Each click sets its pixel
      ``[y, x]`` to its label in the include map and to 1 - label in the exclude map (a later click on the same
      pixel wins).
    - ``box``: ``(B, 4)`` or ``(B, m, 4)`` as ``[x1, y1, x2, y2]`` (integers; corners in any order): 1 on rows
      ``y1:y2`` and columns ``x1:x2`` (end-exclusive), clipped to the grid.
    - ``scribbles``: ``(B, 2, size, size)`` include (channel 0) and exclude (channel 1) maps, added to the click
      maps and clamped to [0, 1].
    - ``previous_logits``: ``(B, 1, size, size)``, passed through.

    Returns float32 maps ``(B, 1, size, size)``; ``B`` comes from the first prompt given (1 with none).
    """
    batch, device = _batch_of(points, box, scribbles, previous_logits)
    shape = (batch, 1, size, size)
    box_map = torch.zeros(shape, device=device)
    clicks = torch.zeros((batch, 2, size, size), device=device)

    if box is not None:
        boxes = torch.as_tensor(box).reshape(batch, -1, 4).clamp(0, size).int().tolist()
        for index, item in enumerate(boxes):
            for x1, y1, x2, y2 in item:
                box_map[index, 0, min(y1, y2):max(y1, y2), min(x1, x2):max(x1, x2)] = 1.0

    if points is not None:
        if point_labels is None:
            raise ValueError("point_labels are required with points")
        coords = torch.as_tensor(points).reshape(batch, -1, 2).int().tolist()
        labels = torch.as_tensor(point_labels).reshape(batch, -1).tolist()
        for index, (item_coords, item_labels) in enumerate(zip(coords, labels)):
            if len(item_coords) != len(item_labels):
                raise ValueError(f"{len(item_coords)} clicks but {len(item_labels)} labels in item {index}")
            for (x, y), label in zip(item_coords, item_labels):
                if label not in (0, 1):
                    raise ValueError(f"click label {label}: must be 1 (include) or 0 (exclude)")
                if not (0 <= x < size and 0 <= y < size):
                    raise ValueError(f"click [x={x}, y={y}] is outside the {size}x{size} grid")
                clicks[index, 0, y, x] = float(label)
                clicks[index, 1, y, x] = 1.0 - label

    if scribbles is not None:
        scribbles = torch.as_tensor(scribbles).to(device=device, dtype=torch.float32)
        if scribbles.shape != (batch, 2, size, size):
            raise ValueError(f"scribbles must be ({batch}, 2, {size}, {size}), got {tuple(scribbles.shape)}")
        clicks = clicks + scribbles
    clicks = clicks.clamp(0.0, 1.0)

    if previous_logits is not None and tuple(previous_logits.shape) != shape:
        raise ValueError(f"previous_logits must be {shape}, got {tuple(previous_logits.shape)}")
    return PromptMaps2D(box=box_map, include=clicks[:, :1], exclude=clicks[:, 1:], previous_logits=previous_logits)


def target_input(images: torch.Tensor, prompts: Optional[PromptMaps2D] = None) -> torch.Tensor:
    """The 5-channel target ``(B, 5, N, N)`` = ``[image, box, include, exclude, previous logits or zeros]`` of
    query images ``(B, 1, N, N)`` (prompt maps of batch 1 are shared by all queries; no prompts: zeros)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"query images must be (B, 1, N, N), got {tuple(images.shape)}")
    zeros = torch.zeros_like(images)
    if prompts is None:
        return torch.cat([images, zeros, zeros, zeros, zeros], dim=1)
    maps = [prompts.box, prompts.include, prompts.exclude,
            zeros if prompts.previous_logits is None else prompts.previous_logits]
    try:
        maps = [m.to(images).expand_as(images) for m in maps]
    except RuntimeError:
        raise ValueError(f"prompt maps {[tuple(m.shape) for m in maps]} do not fit queries "
                         f"{tuple(images.shape)}") from None
    return torch.cat([images, *maps], dim=1)


# -- building and loading --------------------------------------------------------------------------------------

def build_multiverseg() -> MultiverSeg:
    """MultiverSeg v1 with the official architecture (random weights)."""
    return MultiverSeg()


def load_multiverseg(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                     trainable: bool = False) -> MultiverSeg:
    """Build MultiverSeg v1 and load a checkpoint (``weights_only=True``, strict keys) in eval mode
    (``trainable`` changes nothing: the same network trains).

    Accepts the official wrapping (the state_dict under ``"model"``) or a plain state_dict. Raises
    :class:`~FMSegCore.errors.ModelError` with a one-line message on an unreadable or wrong checkpoint.
    """
    return load_strict(build_multiverseg(), checkpoint, "MultiverSeg").eval().to(device)
