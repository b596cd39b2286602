"""A small 3-D refinement network (the nnInteractive recipe, sized for a CPU): it takes a cubic patch around a
structure with four channels, the normalised image, the current mask (the "prior", possibly empty) and maps of the
include and exclude clicks, and returns one logit channel: a better mask of the same structure.

The body is MONAI's ``UNet`` (residual units, instance normalisation, strided convolutions down, transposed
convolutions up). The prior also reaches the output directly, scaled by a learnt gain, so the untrained network
starts near "keep the prior" and learns the corrections; an empty prior then reads as background until the
clicks say otherwise.

Checkpoints hold ``{"config": {...plain types...}, "state_dict": {...tensors...}}`` and load with
``torch.load(..., weights_only=True)``; :func:`load_refiner` turns any wrong or damaged file into one
:class:`~FMSegCore.errors.InputError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from monai.networks.nets import UNet
from torch import nn

from FMSegCore.errors import InputError
from FMSegCore.models.network_config import NetworkConfig

#: Input channels, in order.
CHANNELS = ("image", "prior", "include", "exclude")


@dataclass
class RefinerConfig(NetworkConfig):
    """The network's shape: what a checkpoint must carry to rebuild it."""

    patch_size: int = 64
    features: tuple[int, ...] = (8, 16, 32, 64, 128)
    residual_units: int = 1
    prior_gain: float = 3.0  # initial value of the learnt gain of the prior's direct path


class Refiner3D(nn.Module):
    """``forward(x: (B, 4, P, P, P)) -> logits (B, 1, P, P, P)`` with P = ``patch_size`` (a multiple of
    2 ** (levels - 1)); channels as :data:`CHANNELS`."""

    def __init__(self, config: Optional[RefinerConfig] = None) -> None:
        super().__init__()
        config = config or RefinerConfig()
        self.config = config
        self.patch_size = int(config.patch_size)
        levels = len(config.features)
        if self.patch_size % (2 ** (levels - 1)):
            raise ValueError(f"patch size {self.patch_size} is not a multiple of {2 ** (levels - 1)}")
        self.unet = UNet(spatial_dims=3, in_channels=len(CHANNELS), out_channels=1,
                         channels=tuple(config.features), strides=(2,) * (levels - 1),
                         num_res_units=config.residual_units, norm="instance")
        self.prior_gain = nn.Parameter(torch.tensor(float(config.prior_gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = x[:, 1:2]
        return self.unet(x) + self.prior_gain * (prior - 0.5)


def checkpoint_dict(model: Refiner3D, half: bool = True) -> dict[str, Any]:
    """What :func:`save_refiner` writes: the config and the weights (fp16 by default, on the CPU)."""
    state = {key: (value.detach().cpu().half() if half and value.is_floating_point() else value.detach().cpu())
             for key, value in model.state_dict().items()}
    return {"config": model.config.to_dict(), "state_dict": state}


def save_refiner(model: Refiner3D, path: Union[str, Path], half: bool = True) -> None:
    torch.save(checkpoint_dict(model, half), path)


def load_refiner(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Refiner3D:
    """A refiner in eval mode from a checkpoint of :func:`save_refiner` (or a training checkpoint holding one
    under ``"model"`` with its ``"config"``); a missing, damaged or foreign file is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "refiner checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling and zip errors come in many types
        summary = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(path, f"cannot read the refiner checkpoint ({summary[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise InputError(path, "not a refiner checkpoint (no config)")
    state = data.get("state_dict", data.get("model"))
    if not isinstance(state, dict):
        raise InputError(path, "not a refiner checkpoint (no state_dict)")
    try:
        model = Refiner3D(RefinerConfig.from_dict(data["config"]))
        model.load_state_dict({key: value.float() if value.is_floating_point() else value
                               for key, value in state.items()}, strict=True)
    except (RuntimeError, ValueError, TypeError, AttributeError) as error:
        summary = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(path, f"not a refiner checkpoint ({summary[:120]})") from None
    return model.to(device).eval()
