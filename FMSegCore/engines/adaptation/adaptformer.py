"""AdaptFormer: a bottleneck MLP in parallel with a transformer block's MLP (Chen et al., NeurIPS'22).

``y = mlp(x) + scale * up(relu(down(x)))`` with ``up`` zero-initialised (training starts from the pre-trained
model) and ``scale = 0.1``. The adapter reads the MLP's input, so it works for any MLP over tokens (B, N, C).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from FMSegCore.engines.adaptation.lora import replace_module


class ParallelAdapter(nn.Module):
    """A frozen MLP plus a trainable parallel bottleneck."""

    def __init__(self, mlp: nn.Module, channels: int, bottleneck: int = 64, scale: float = 0.1) -> None:
        super().__init__()
        self.mlp = mlp
        for parameter in mlp.parameters():
            parameter.requires_grad_(False)
        self.down = nn.Linear(channels, bottleneck)
        self.up = nn.Linear(bottleneck, channels)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        device = next(mlp.parameters()).device
        self.down.to(device)
        self.up.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.up(torch.relu(self.down(x)))


def _input_channels(mlp: nn.Module) -> int:
    first = next((module for module in mlp.modules() if isinstance(module, nn.Linear)), None)
    if first is None:
        raise ValueError(f"{type(mlp).__name__} has no Linear layer to size an adapter from")
    return first.in_features


def inject_adaptformer(model: nn.Module, patterns: Sequence[str], bottleneck: int = 64,
                       scale: float = 0.1) -> list[str]:
    """Put a :class:`ParallelAdapter` beside every MLP module whose name matches ``patterns``; their names."""
    compiled = [re.compile(pattern) for pattern in patterns]
    names = [name for name, module in model.named_modules()
             if name and any(p.search(name) for p in compiled) and not isinstance(module, ParallelAdapter)
             and any(isinstance(m, nn.Linear) for m in module.modules())]
    if not names:
        raise ValueError(f"no MLP module matches {list(patterns)}")
    for name in names:
        mlp = model.get_submodule(name)
        replace_module(model, name, ParallelAdapter(mlp, _input_channels(mlp), bottleneck, scale))
    return names
