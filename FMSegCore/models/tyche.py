"""Tyche (Rakic et al., CVPR 2024): stochastic in-context segmentation. Given a support set of labelled examples,
it draws K plausible segmentations of a target image; their spread is the model's uncertainty.

Tyche's network ``TysegXC`` is a UniverSeg-style U-Net of cross blocks in which the K candidates of one target
interact. The module layout follows the official implementation (mariannerakic/tyche) so that the state_dict of
the published checkpoint ``tyche_v1_model_weights_CVPR.pt`` (held under ``["model"]``; 58 tensors, 1,774,785
parameters) loads with strict keys:

- ``enc_blocks.{0..3}`` and ``dec_blocks.{0..2}`` are :class:`TycheBlock` modules, each holding
  ``cross.cross_conv`` (the pairwise Conv2d), ``meanconv.vmapped.conv`` (per-candidate Conv3x3 over the candidate
  and the block's shared target features) and ``target.vmapped.conv`` / ``support.vmapped.conv`` (per-branch
  Conv3x3), every convolution followed by LeakyReLU(0.01);
- ``out_conv.conv`` is the final 1x1 convolution to one logit per candidate.

Shapes: the candidates are ``(B, K, C, H, W)``; each starts as ``[image, noise]`` with its own Gaussian noise
image, which is what makes the candidates differ. The support is ``(B, S, C, H, W)``, starting as
``[image, label]``; a support batch of 1 is broadcast against ``B`` targets.

A block: the mean of the K candidates is cross-convolved with every support item; the LeakyReLU of each pair is
the new support item, and their mean over the support is the shared target feature. Every candidate is then
concatenated with that shared feature and passed through ``meanconv`` and ``target``; the new support goes
through ``support``. The encoder max-pools between blocks, the decoder upsamples (bilinear, corners aligned) and
concatenates the skips of both branches.

As in :mod:`FMSegCore.models.universeg`, convolutions of a channel concatenation are computed as sums of
convolutions with the weight split along input channels: the cross conv's target term is computed once per
target (on the candidates' mean) and its support term once per support item, and the part of
``meanconv`` that sees the shared feature is computed once per target instead of once per candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from FMSegCore.models.checkpoints import load_strict
from FMSegCore.models.universeg import ConvOp, CrossOp, Vmap, _vmap, run_cross_unet

NUM_PARAMETERS = 1_774_785


class TycheCrossOp(CrossOp):
    """UniverSeg's split-weight cross convolution with Tyche's ``cross_relu``: LeakyReLU on every pair before the
    mean over the support (so the mean can no longer be taken before the convolution)."""

    @staticmethod
    def combine(target_term: torch.Tensor, support_term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairwise sum (support batch 1 broadcasts) and LeakyReLU; new target = mean over supports, new support
        = pairs."""
        interaction = F.leaky_relu(target_term.unsqueeze(1) + support_term, 0.01)
        return interaction.mean(dim=1), interaction

    def target_only(self, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The new target alone (every pair is still needed because of the nonlinearity)."""
        return self(target, support)[0]


class TycheBlock(nn.Module):
    """Cross op on the candidates' mean, ``meanconv`` on each candidate with the shared feature, then the target
    and support convolutions (official ``CrossBlockTarget``)."""

    def __init__(self, target_channels: int, support_channels: int, cross_features: int,
                 conv_features: int) -> None:
        super().__init__()
        self.target_channels = target_channels
        self.cross = TycheCrossOp(target_channels, support_channels, cross_features)
        self.meanconv = Vmap(ConvOp(target_channels + cross_features, conv_features))
        self.target = Vmap(ConvOp(cross_features, conv_features))
        self.support = Vmap(ConvOp(cross_features, conv_features))

    def candidates(self, target: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """``meanconv`` then ``target`` on ``cat([candidate, shared])`` for every candidate ``(B, K, C, H, W)``;
        the shared half of ``meanconv`` is computed once per target."""
        op = self.meanconv.vmapped
        weight, padding = op.conv.weight, op.conv.padding
        own = _vmap(lambda x: F.conv2d(x, weight[:, :self.target_channels], op.conv.bias, padding=padding), target)
        common = F.conv2d(shared, weight[:, self.target_channels:], None, padding=padding)
        return self.target(op.nonlinearity(own + common.unsqueeze(1)))

    def forward(self, target: torch.Tensor, support: torch.Tensor,
                with_support: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``target (B, K, Ct, H, W)``, ``support (Bs, S, Cs, H, W)`` -> new target and (unless
        ``with_support`` is False: the last block) new support ``(B, S, C, H, W)``."""
        shared, interaction = self.cross(target.mean(dim=1), support)
        target = self.candidates(target, shared)
        return target, (self.support(interaction) if with_support else None)


class TycheNet(nn.Module):
    """Tyche v1 (``TysegXC``): K candidate segmentations of a target image given a support set.

    ``forward(support_images (Bs,S,1,H,W), support_labels (Bs,S,1,H,W), target_image (B,K,1,H,W), noise_image
    (B,K,1,H,W))`` returns logits ``(B,K,1,H,W)``, as the official model does; inputs in [0, 1], labels binary;
    ``Bs`` is ``B`` or 1 (one support set shared by all targets); ``H`` and ``W`` divisible by 8 (the official
    model is trained at 128x128). :meth:`encode_support`, :meth:`predict` and :meth:`predict_candidates`
    implement :class:`~FMSegCore.models.interfaces.StochasticInContextModel2D`.
    """

    #: Side of the square slices the model is trained on (it is fully convolutional: any multiple of 8 runs).
    input_size = 128
    #: Candidates :meth:`predict` averages, and the seed of their noise.
    default_candidates = 8
    default_seed = 0

    def __init__(self, encoder_features: tuple[int, ...] = (64, 64, 64, 64),
                 decoder_features: tuple[int, ...] = (64, 64, 64)) -> None:
        super().__init__()
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        channels = 2  # target: image + noise; support: image + label
        skip_channels = []
        for features in encoder_features:
            self.enc_blocks.append(TycheBlock(channels, channels, features, features))
            channels = features
            skip_channels.append(features)
        skip_channels.pop()  # the deepest block feeds the decoder directly
        for features in decoder_features:
            channels += skip_channels.pop()  # [upsampled, skip]
            self.dec_blocks.append(TycheBlock(channels, channels, features, features))
            channels = features
        self.out_conv = ConvOp(channels, 1, kernel_size=1, nonlinearity=False)
        self.downsample = nn.MaxPool2d(2, 2)

    @staticmethod
    def _upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def _run(self, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Candidates ``(B, K, 2, H, W)`` ([image, noise]) and support ``(Bs, S, 2, H, W)`` -> ``(B, K, 1, H, W)``."""
        target = run_cross_unet(self.enc_blocks, self.dec_blocks, target, support, self.downsample, self._upsample,
                                lambda block, t, s: block(t, s, with_support=False)[0], grouped_target=True)
        return _vmap(self.out_conv, target)

    @staticmethod
    def _check(name: str, tensor: torch.Tensor, shape: Optional[torch.Size] = None) -> None:
        if tensor.dim() != 5 or tensor.shape[2] != 1 or (shape is not None and tensor.shape != shape):
            wanted = tuple(shape) if shape is not None else "(B, N, 1, H, W)"
            raise ValueError(f"{name} must be {wanted}, got {tuple(tensor.shape)}")

    def forward(self, support_images: torch.Tensor, support_labels: torch.Tensor, target_image: torch.Tensor,
                noise_image: torch.Tensor) -> torch.Tensor:
        self._check("target_image", target_image)
        self._check("noise_image", noise_image, target_image.shape)
        self._check("support_images", support_images)
        self._check("support_labels", support_labels, support_images.shape)
        height, width = target_image.shape[-2:]
        if height % 8 or width % 8:
            raise ValueError(f"image size {height}x{width} must be divisible by 8")
        if support_images.shape[0] not in (1, target_image.shape[0]) \
                or support_images.shape[-2:] != target_image.shape[-2:]:
            raise ValueError(f"support {tuple(support_images.shape)} does not fit target "
                             f"{tuple(target_image.shape)}")
        return self._run(torch.cat([target_image, noise_image], dim=2),
                         torch.cat([support_images, support_labels], dim=2))

    def encode_support(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:class:`~FMSegCore.models.interfaces.InContextModel2D`: one support set ``(S, 1, H, W)`` ->
        ``(1, S, 2, H, W)``, images and labels stacked (every later support feature depends on the target)."""
        if images.dim() != 4 or images.shape[1] != 1 or labels.shape != images.shape:
            raise ValueError(f"support images {tuple(images.shape)} and labels {tuple(labels.shape)} must both be "
                             f"(S, 1, H, W)")
        return torch.cat([images, labels], dim=1).unsqueeze(0)

    def _candidates(self, queries: torch.Tensor, support: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if queries.dim() != 4 or queries.shape[1] != 1:
            raise ValueError(f"queries must be (B, 1, H, W), got {tuple(queries.shape)}")
        if support.dim() != 5 or support.shape[0] != 1 or support.shape[2] != 2 \
                or support.shape[-2:] != queries.shape[-2:]:
            raise ValueError(f"support {tuple(support.shape)} is not an encode_support result for queries "
                             f"{tuple(queries.shape)}")
        if queries.shape[-1] % 8 or queries.shape[-2] % 8:
            raise ValueError(f"image size {queries.shape[-2]}x{queries.shape[-1]} must be divisible by 8")
        target = queries.unsqueeze(1).expand(-1, noise.shape[1], -1, -1, -1)
        return self._run(torch.cat([target, noise], dim=2), support)

    def predict_candidates(self, queries: torch.Tensor, support: torch.Tensor, candidates: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits ``(B, K, 1, H, W)`` of K = ``candidates`` draws for queries ``(B, 1, H, W)``; the noise is
        ``torch.randn((B, K, 1, H, W), generator=generator)`` (drawn on the generator's device)."""
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        shape = (queries.shape[0], candidates, 1, *queries.shape[-2:])
        device = generator.device if generator is not None else queries.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=queries.dtype)
        return self._candidates(queries, support, noise.to(queries.device))

    def predict(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)``: the logit of the mean probability of :attr:`default_candidates` candidates.
        Deterministic: every query gets the same noise images (seeded by :attr:`default_seed`), so a query's
        result does not depend on the batch it is in."""
        generator = torch.Generator().manual_seed(self.default_seed)
        noise = torch.randn((1, self.default_candidates, 1, *queries.shape[-2:]), generator=generator)
        noise = noise.to(queries.device, queries.dtype).expand(queries.shape[0], -1, -1, -1, -1)
        return mean_probability_logits(self._candidates(queries, support, noise))


def mean_probability_logits(candidates: torch.Tensor) -> torch.Tensor:
    """``logit(mean_k sigmoid(candidates[:, k]))`` for logits ``(B, K, ...)`` -> ``(B, ...)``, computed in log
    space (float32 or wider), so confident candidates neither saturate to 0/1 nor overflow."""
    candidates = candidates.float() if candidates.dtype in (torch.float16, torch.bfloat16) else candidates
    return torch.logsumexp(F.logsigmoid(candidates), dim=1) - torch.logsumexp(F.logsigmoid(-candidates), dim=1)


def build_tyche() -> TycheNet:
    """Tyche v1 with the official architecture (random weights)."""
    return TycheNet()


def load_tyche(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
               trainable: bool = False) -> TycheNet:
    """Build Tyche v1 and load a checkpoint (``weights_only=True``, strict keys) in eval mode (``trainable``
    changes nothing: the same network trains).

    Accepts the official release (state_dict under ``"model"``), a plain state_dict or one under
    ``"state_dict"``. Raises :class:`ModelError` with a one-line message on an unreadable or wrong checkpoint.
    """
    return load_strict(build_tyche(), checkpoint, "Tyche").eval().to(device)
