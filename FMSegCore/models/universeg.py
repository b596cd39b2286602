"""UniverSeg v1 (Butoi et al., ICCV 2023): in-context segmentation from a support set of labelled examples.

The module layout follows the official implementation so that the state_dict of the published checkpoint
``universeg_v1_nf64_ss64_STA.pt`` (44 tensors, 1,182,785 parameters) loads with strict keys:

- ``enc_blocks.{0..3}`` and ``dec_blocks.{0..2}`` are :class:`CrossBlock` modules, each holding
  ``cross.cross_conv`` (the pairwise Conv2d) and ``target.vmapped.conv`` / ``support.vmapped.conv``
  (per-branch Conv3x3 + LeakyReLU);
- ``out_conv.conv`` is the final 1x1 convolution to one logit channel.

Shapes: the target is kept as ``(B, C, H, W)``, the support as ``(B, S, C, H, W)``. A support batch of 1 is
broadcast against ``B`` targets.

The cross convolution of a (target, support) pair is a Conv2d over the channel concatenation
``[target, support]``. Because convolution is linear in its input, it equals ``conv(target, W_t) +
conv(support, W_s)`` with the weight split along input channels: the target term is computed once per target
and the support term once per support item, instead of once per pair. The support term of the first layer
depends only on the support set, so it can be computed once with :meth:`UniverSeg.encode_support_first_layer`
and reused for many queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from FMSegCore.models.checkpoints import load_strict

NUM_PARAMETERS = 1_182_785


class ConvOp(nn.Module):
    """Conv2d (``same`` padding) followed by an optional LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 nonlinearity: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.nonlinearity = nn.LeakyReLU(0.01) if nonlinearity else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinearity(self.conv(x))


class Vmap(nn.Module):
    """Apply a module to every item of a ``(B, N, C, H, W)`` group by folding ``N`` into the batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.vmapped = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _vmap(self.vmapped, x)


def _vmap(fn, x: torch.Tensor) -> torch.Tensor:
    batch, group = x.shape[:2]
    y = fn(x.reshape(batch * group, *x.shape[2:]))
    return y.reshape(batch, group, *y.shape[1:])


class CrossOp(nn.Module):
    """Pairwise interaction of a target with every support item (v1: no nonlinearity).

    ``cross_conv`` is a plain Conv2d over ``target_channels + support_channels`` inputs (target first), computed
    here as the sum of a target term and a support term.
    """

    def __init__(self, target_channels: int, support_channels: int, out_channels: int) -> None:
        super().__init__()
        self.target_channels = target_channels
        self.cross_conv = nn.Conv2d(target_channels + support_channels, out_channels, 3, padding=1)

    def target_term(self, target: torch.Tensor) -> torch.Tensor:
        """``(B, Ct, H, W)`` -> ``(B, O, H, W)``: the target half of the weight, plus the bias."""
        weight = self.cross_conv.weight[:, :self.target_channels]
        return F.conv2d(target, weight, self.cross_conv.bias, padding=1)

    def support_term(self, support: torch.Tensor) -> torch.Tensor:
        """``(Bs, S, Cs, H, W)`` -> ``(Bs, S, O, H, W)``: the support half of the weight, no bias."""
        weight = self.cross_conv.weight[:, self.target_channels:]
        return _vmap(lambda x: F.conv2d(x, weight, None, padding=1), support)

    @staticmethod
    def combine(target_term: torch.Tensor, support_term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairwise sum (support batch 1 broadcasts); new target = mean over supports, new support = pairs."""
        interaction = target_term.unsqueeze(1) + support_term
        return interaction.mean(dim=1), interaction

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.combine(self.target_term(target), self.support_term(support))

    def target_only(self, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The new target alone: by linearity the mean over supports of their terms is the support half of the
        weight applied once to the mean support, so no per-pair convolution is needed."""
        weight = self.cross_conv.weight[:, self.target_channels:]
        return self.target_term(target) + F.conv2d(support.mean(dim=1), weight, None, padding=1)


class CrossBlock(nn.Module):
    """CrossOp, then a Conv3x3 + LeakyReLU on the target and (per item) on the support."""

    def __init__(self, target_channels: int, support_channels: int, cross_features: int,
                 conv_features: int) -> None:
        super().__init__()
        self.cross = CrossOp(target_channels, support_channels, cross_features)
        self.target = Vmap(ConvOp(cross_features, conv_features))
        self.support = Vmap(ConvOp(cross_features, conv_features))

    def branches(self, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-branch convolutions applied after the cross interaction."""
        return self.target.vmapped(target), self.support(support)

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.branches(*self.cross(target, support))

    def target_only(self, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The target output alone (the last block: its support output is never used)."""
        return self.target.vmapped(self.cross.target_only(target, support))


class UniverSeg(nn.Module):
    """UniverSeg v1: binary segmentation of a target image given a support set of (image, label) pairs.

    ``forward(target_image (B,1,H,W), support_images (Bs,S,1,H,W), support_labels (Bs,S,1,H,W))`` returns
    logits ``(B,1,H,W)``; inputs in [0, 1]; ``Bs`` is ``B`` or 1 (one support set shared by all targets);
    ``H`` and ``W`` divisible by 8 (the official model is trained at 128x128).
    """

    #: Side of the square slices the model is trained on (it is fully convolutional: any multiple of 8 runs).
    input_size = 128

    def __init__(self, encoder_features: tuple[int, ...] = (64, 64, 64, 64),
                 decoder_features: tuple[int, ...] = (64, 64, 64)) -> None:
        super().__init__()
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        target_channels, support_channels = 1, 2  # target image; support image + label
        skip_channels = []
        for features in encoder_features:
            self.enc_blocks.append(CrossBlock(target_channels, support_channels, features, features))
            target_channels = support_channels = features
            skip_channels.append(features)
        skip_channels.pop()  # the deepest block feeds the decoder directly, not through a skip
        for features in decoder_features:
            skip = skip_channels.pop()
            channels = target_channels + skip  # [upsampled, skip]
            self.dec_blocks.append(CrossBlock(channels, channels, features, features))
            target_channels = features
        self.out_conv = ConvOp(target_channels, 1, kernel_size=1, nonlinearity=False)
        self.downsample = nn.MaxPool2d(2, 2)

    @staticmethod
    def _upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def encode_support_first_layer(self, support_images: torch.Tensor,
                                   support_labels: torch.Tensor) -> torch.Tensor:
        """Support term of the first cross convolution ``(Bs, S, 64, H, W)``; it depends on the support only.

        Pass it as ``first_layer_support`` to :meth:`forward` to reuse one support set for many queries.
        """
        if support_images.dim() != 5 or support_images.shape[2] != 1:
            raise ValueError(f"support_images must be (B, S, 1, H, W), got {tuple(support_images.shape)}")
        if support_labels.shape != support_images.shape:
            raise ValueError(f"support_labels {tuple(support_labels.shape)} must match support_images "
                             f"{tuple(support_images.shape)}")
        support = torch.cat([support_images, support_labels], dim=2)
        return self.enc_blocks[0].cross.support_term(support)

    def encode_support(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:class:`~FMSegCore.models.interfaces.InContextModel2D`: one support set ``(S, 1, H, W)`` -> cache."""
        return self.encode_support_first_layer(images.unsqueeze(0), labels.unsqueeze(0))

    def predict(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """:class:`~FMSegCore.models.interfaces.InContextModel2D`: logits of queries against a cached support."""
        return self.forward(queries, first_layer_support=support)

    def forward(self, target_image: torch.Tensor, support_images: Optional[torch.Tensor] = None,
                support_labels: Optional[torch.Tensor] = None, *,
                first_layer_support: Optional[torch.Tensor] = None) -> torch.Tensor:
        if target_image.dim() != 4 or target_image.shape[1] != 1:
            raise ValueError(f"target_image must be (B, 1, H, W), got {tuple(target_image.shape)}")
        height, width = target_image.shape[-2:]
        if height % 8 or width % 8:
            raise ValueError(f"image size {height}x{width} must be divisible by 8")
        if first_layer_support is None:
            if support_images is None or support_labels is None:
                raise ValueError("support_images and support_labels (or first_layer_support) are required")
            first_layer_support = self.encode_support_first_layer(support_images, support_labels)
        if first_layer_support.shape[0] not in (1, target_image.shape[0]) \
                or first_layer_support.shape[-2:] != target_image.shape[-2:]:
            raise ValueError(f"support {tuple(first_layer_support.shape)} does not fit target "
                             f"{tuple(target_image.shape)}")

        first = self.enc_blocks[0]
        target, support = first.branches(*first.cross.combine(first.cross.target_term(target_image),
                                                               first_layer_support))
        target = run_cross_unet(self.enc_blocks, self.dec_blocks, target, support, self.downsample,
                                self._upsample, lambda block, t, s: block.target_only(t, s), first_done=True)
        return self.out_conv(target)


def run_cross_unet(enc_blocks: Sequence[nn.Module], dec_blocks: Sequence[nn.Module], target: torch.Tensor,
                   support: torch.Tensor, downsample: Callable, upsample: Callable,
                   last: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
                   grouped_target: bool = False, first_done: bool = False) -> torch.Tensor:
    """The cross-block U-Net that UniverSeg, MultiverSeg and Tyche share: encoder blocks on (target, support)
    with both kept as skips and down-sampled, then decoder blocks on the up-sampled pair joined to its skips;
    ``last(block, target, support)`` runs the last decoder block (target only). ``target`` is ``(B, C, H, W)``,
    or ``(B, K, C, H, W)`` with ``grouped_target`` (Tyche's candidates); ``support`` is ``(B, S, C, H, W)``.
    ``first_done``: the first encoder block's output is given (UniverSeg's cached first layer)."""

    def on_target(function: Callable, x: torch.Tensor) -> torch.Tensor:
        return _vmap(function, x) if grouped_target else function(x)

    channel_dim = 2 if grouped_target else 1
    skips = []
    for index, block in enumerate(enc_blocks):
        if index > 0 or not first_done:
            target, support = block(target, support)
        if index == len(enc_blocks) - 1:
            break
        skips.append((target, support))
        target, support = on_target(downsample, target), _vmap(downsample, support)
    for index, block in enumerate(dec_blocks):
        target_skip, support_skip = skips.pop()
        target = torch.cat([on_target(upsample, target), target_skip], dim=channel_dim)
        support = torch.cat([_vmap(upsample, support), support_skip], dim=2)
        if index == len(dec_blocks) - 1:
            target = last(block, target, support)
        else:
            target, support = block(target, support)
    return target


def build_universeg() -> UniverSeg:
    """UniverSeg v1 with the official architecture (random weights)."""
    return UniverSeg()


def load_universeg(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                   trainable: bool = False) -> UniverSeg:
    """Build UniverSeg v1 and load a checkpoint (``weights_only=True``, strict keys) in eval mode (``trainable``
    changes nothing: the same network trains).

    Accepts a plain state_dict (the official release) or a dict holding it under ``"model"`` or
    ``"state_dict"``. Raises :class:`ModelError` with a one-line message on an unreadable or wrong checkpoint.
    """
    return load_strict(build_universeg(), checkpoint, "UniverSeg").eval().to(device)
