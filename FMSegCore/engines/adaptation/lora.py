"""LoRA and ARENA: low-rank updates of frozen Linear / Conv2d / Conv3d layers, chosen by name patterns.

LoRA (Hu et al.) adds ``scale * B(A x)`` to a frozen layer ``W x``, with ``A`` random and ``B`` zero-initialised,
so training starts from the pre-trained model. For a convolution, ``A`` is a convolution with the layer's
kernel, stride and padding into ``rank`` channels and ``B`` a 1x1(x1) convolution back out.

ARENA (MICCAI'25) puts a learnable diagonal between them, ``Delta W = B diag(v) A``, adds ``lambda * ||v||_1``
to the loss and soft-thresholds ``v`` after each optimiser step, so each layer keeps only the rank it needs.

Either can be merged into the base weight (:func:`merge_lora`) for inference at no extra cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

AdaptableLayer = Union[nn.Linear, nn.Conv2d, nn.Conv3d]


class LoRALayer(nn.Module):
    """A frozen layer plus a trainable low-rank update (with ``diagonal``: ARENA's learnable ``v``)."""

    def __init__(self, base: AdaptableLayer, rank: int = 4, alpha: float | None = None,
                 diagonal: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, (nn.Conv2d, nn.Conv3d)):
            if base.groups != 1:
                raise ValueError("LoRA does not adapt grouped convolutions")
            conv = type(base)
            self.lora_A = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                               base.dilation, bias=False)
            self.lora_B = conv(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts Linear, Conv2d and Conv3d layers, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.device)
        self.lora_B.to(base.weight.device)
        self.diagonal = nn.Parameter(torch.ones(rank, device=base.weight.device)) if diagonal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.lora_A(x)
        if self.diagonal is not None:
            shape = (-1,) if isinstance(self.base, nn.Linear) else (1, -1) + (1,) * (low.dim() - 2)
            low = low * self.diagonal.view(shape).to(low.dtype)
        return self.base(x) + self.scale * self.lora_B(low)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B diag(v) A`` in the shape of the base weight."""
        a = self.lora_A.weight.reshape(self.rank, -1)
        b = self.lora_B.weight.reshape(-1, self.rank)
        if self.diagonal is not None:
            b = b * self.diagonal[None, :]
        return (self.scale * b @ a).reshape(self.base.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + Delta W``, for models that read a layer's weight directly (UniverSeg's
        split cross convolution does)."""
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def kept_rank(self) -> int:
        """The rank still in use: non-zero entries of ``v`` for ARENA, the full rank for LoRA."""
        if self.diagonal is None:
            return self.rank
        return int((self.diagonal.detach() != 0).sum())

    @torch.no_grad()
    def merged(self) -> AdaptableLayer:
        """The base layer with the update folded into its weight (the wrapper can then be dropped)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name`` (dotted path)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def matching_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of Linear/Conv2d/Conv3d layers (groups 1) whose name matches one of the regular expressions."""
    compiled = [re.compile(pattern) for pattern in patterns]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)) and getattr(module, "groups", 1) == 1:
            if any(pattern.search(name) for pattern in compiled):
                names.append(name)
    return names


def inject_lora(model: nn.Module, patterns: Sequence[str], rank: int = 4, alpha: float | None = None,
                diagonal: bool = False) -> list[str]:
    """Wrap every layer matching ``patterns`` in a :class:`LoRALayer` (in place); the wrapped names."""
    names = matching_layers(model, patterns)
    if not names:
        raise ValueError(f"no Linear/Conv layer matches {list(patterns)}")
    for name in names:
        replace_module(model, name, LoRALayer(model.get_submodule(name), rank, alpha, diagonal))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA/ARENA wrapper in the model, by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA/ARENA update into its base layer and drop the wrappers; how many were merged."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.merged())
    return len(layers)


def arena_penalty(model: nn.Module) -> torch.Tensor | None:
    """``sum ||v||_1`` over ARENA layers (None when there are none)."""
    terms = [layer.diagonal.abs().sum() for layer in lora_layers(model).values() if layer.diagonal is not None]
    return torch.stack(terms).sum() if terms else None


@torch.no_grad()
def arena_soft_threshold(model: nn.Module, threshold: float) -> None:
    """ARENA's proximal step after each optimiser step: ``v <- sign(v) max(|v| - threshold, 0)``."""
    for layer in lora_layers(model).values():
        if layer.diagonal is not None:
            v = layer.diagonal
            v.copy_(torch.sign(v) * F.relu(v.abs() - threshold))


def kept_ranks(model: nn.Module) -> dict[str, int]:
    """The rank each adapted layer keeps (ARENA prunes; LoRA keeps its full rank)."""
    return {name: layer.kept_rank() for name, layer in lora_layers(model).items()}
