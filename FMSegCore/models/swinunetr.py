"""Swin UNETR (Hatamizadeh et al., 2022) from MONAI, loadable from the published 3D CT checkpoints.

The architecture is :class:`monai.networks.nets.SwinUNETR` (3D, one input channel, ``feature_size=48`` for the
published weights: 62.2 M parameters). Its state_dict has two groups of keys:

- the backbone: ``swinViT.*`` (the Swin transformer encoder), ``encoder1..4``, ``encoder10`` and
  ``decoder1..5`` (the convolutional encoder and decoder);
- the head: ``out.conv.conv.weight`` ``(classes, feature_size, 1, 1, 1)`` and ``out.conv.conv.bias``.

The published checkpoints use the same module names inside other wrappers, so they load after renaming
(:func:`official_to_monai_keys`):

- SuPreM and the CLIP-Driven Universal Model save a DataParallel-wrapped ``Universal_model`` under ``"net"``:
  ``module.backbone.<monai key>``, plus their text-driven head (``module.organ_embedding``,
  ``module.controller.*``, ``module.precls_conv.*``, ``module.GAP.*``, ...) which is not part of Swin UNETR
  and is skipped. Their ``backbone.out`` head exists but is unused in pre-training: load the backbone and
  fine-tune a head.
- FSEFT (few-shot efficient fine-tuning) names the encoder ``swin_vit`` and the head ``classifier``.

:func:`load_swinunetr` loads every backbone key strictly (a missing, unexpected or mis-shaped backbone key is a
:class:`ModelError`) and the head only when its shape fits the requested class count; otherwise the head stays
freshly initialised. The :class:`LoadReport` says what was loaded and what was skipped.

Input: ``(B, 1, D, H, W)`` with every spatial size divisible by 32 (five 2x downsamplings) and at least one of
them 64 or more (the bottleneck instance norm needs more than one voxel); the checkpoints were trained on
96^3 sliding windows. Output: ``(B, classes, D, H, W)`` logits.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from FMSegCore.errors import ModelError

#: Parameters of the 48-feature backbone (encoder + decoder, no head); the head adds ``49 * classes``.
NUM_BACKBONE_PARAMETERS = 62_186_610

#: Keys of the output convolution in MONAI's layout.
HEAD_KEYS = ("out.conv.conv.weight", "out.conv.conv.bias")

#: Wrapper prefixes stripped from the front of checkpoint keys (DataParallel, Universal Model).
_WRAPPER_PREFIXES = ("module.", "backbone.")
#: Keys under which training scripts store the state_dict.
_STATE_KEYS = ("state_dict", "net", "model")
_BACKBONE_KEY = re.compile(r"^(swinViT|encoder\d+|decoder\d+)\.")
_PATCH_EMBED = "swinViT.patch_embed.proj.weight"


@dataclass
class LoadReport:
    """What :func:`load_swinunetr` did with each checkpoint tensor (keys in MONAI's layout)."""

    checkpoint: str
    out_channels: int
    feature_size: int
    #: model keys that received checkpoint tensors
    loaded: list[str] = field(default_factory=list)
    #: checkpoint keys not loaded -> why (head of another shape, not part of Swin UNETR)
    skipped: dict[str, str] = field(default_factory=dict)
    #: model keys left freshly initialised (the head, when missing or of another shape)
    initialised: list[str] = field(default_factory=list)

    @property
    def head_loaded(self) -> bool:
        """Whether the output convolution came from the checkpoint."""
        return all(key in self.loaded for key in HEAD_KEYS)

    def summary(self) -> str:
        """One line for logs."""
        head = "loaded" if self.head_loaded else "freshly initialised"
        return (f"{self.checkpoint}: Swin UNETR (feature_size {self.feature_size}, {self.out_channels} classes): "
                f"{len(self.loaded)} tensors loaded, {len(self.skipped)} skipped, head {head}")


def build_swinunetr(out_channels: int, feature_size: int = 48, in_channels: int = 1) -> nn.Module:
    """A randomly initialised 3D MONAI SwinUNETR (no gradient checkpointing)."""
    if importlib.util.find_spec("einops") is None:
        raise ModelError("Swin UNETR needs the einops package (pip install einops)")
    from monai.networks.nets import SwinUNETR

    if feature_size <= 0 or feature_size % 12:
        raise ModelError(f"Swin UNETR feature_size must be a positive multiple of 12, got {feature_size}")
    kwargs: dict[str, Any] = {}
    if "img_size" in inspect.signature(SwinUNETR.__init__).parameters:  # monai < 1.5 requires it (unused)
        kwargs["img_size"] = (96, 96, 96)
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                     spatial_dims=3, use_checkpoint=False, **kwargs)


def _rename(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    if key.startswith("swin_vit."):
        key = "swinViT." + key[len("swin_vit."):]
    elif key in ("classifier.weight", "classifier.bias"):
        key = "out.conv.conv." + key[len("classifier."):]
    return key


def official_to_monai_keys(state: dict) -> dict:
    """Rename a SuPreM / FSEFT / Universal Model state_dict to MONAI SwinUNETR keys.

    Strips leading ``module.`` and ``backbone.`` (in any order, only at the front of a key), maps a leading
    ``swin_vit.`` to ``swinViT.`` and ``classifier.weight/bias`` to ``out.conv.conv.weight/bias``. Other keys
    keep their names. Raises ``ValueError`` if two keys end up with the same name.
    """
    renamed: dict = {}
    sources: dict = {}
    for key, value in state.items():
        new = _rename(key) if isinstance(key, str) else key
        if new in renamed:
            raise ValueError(f"keys {sources[new]!r} and {key!r} both map to {new!r}")
        renamed[new] = value
        sources[new] = key
    return renamed


def _describe(error: Exception) -> str:
    """A short reason for a failed ``torch.load`` (its weights-only refusal is a page of advice)."""
    text = str(error)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        return "refused by the weights-only loader: it pickles " + (found.group(1) if found else "Python objects")
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _read_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in MONAI's key layout, or a :class:`ModelError` naming the file."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ModelError(f"{checkpoint}: cannot load Swin UNETR checkpoint ({_describe(error)})") from None
    if isinstance(state, dict):
        for key in _STATE_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{checkpoint}: not a Swin UNETR checkpoint (no state_dict found)")
    bad = [key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise ModelError(f"{checkpoint}: not a Swin UNETR checkpoint ({len(bad)} entries are not named tensors, "
                         f"e.g. {bad[0]!r})")
    try:
        return official_to_monai_keys(state)
    except ValueError as error:
        raise ModelError(f"{checkpoint}: not a Swin UNETR checkpoint ({error})") from None


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def load_swinunetr(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                   out_channels: Optional[int] = None,
                   feature_size: Optional[int] = None) -> tuple[nn.Module, LoadReport]:
    """Build Swin UNETR and load a checkpoint (``weights_only=True``) in eval mode, with a :class:`LoadReport`.

    Accepts a plain state_dict or one wrapped under ``"state_dict"``, ``"net"`` or ``"model"``, in MONAI's or
    an official layout (see :func:`official_to_monai_keys`). ``feature_size`` and the input channels are read
    from the patch embedding (``feature_size``, if given, must agree); ``out_channels`` defaults to the
    checkpoint head's class count. Every backbone key must be present with its shape; the head is loaded only
    if its shape fits ``out_channels``, else it stays freshly initialised. Keys of other modules (e.g. the
    Universal Model's text-driven head) are skipped. Raises :class:`ModelError` with a one-line message.
    """
    checkpoint = Path(checkpoint)
    state = _read_state(checkpoint)
    embed = state.get(_PATCH_EMBED)
    if embed is None or embed.dim() != 5:
        raise ModelError(f"{checkpoint}: not a Swin UNETR checkpoint (no {_PATCH_EMBED})")
    found_features, in_channels = int(embed.shape[0]), int(embed.shape[1])
    if feature_size is not None and feature_size != found_features:
        raise ModelError(f"{checkpoint}: checkpoint has feature_size {found_features}, not {feature_size}")
    head_weight = state.get(HEAD_KEYS[0])
    if out_channels is None:
        if head_weight is None or head_weight.dim() != 5:
            raise ModelError(f"{checkpoint}: checkpoint has no output head to take the class count from; "
                             "pass out_channels")
        out_channels = int(head_weight.shape[0])
    if out_channels < 1:
        raise ModelError(f"{checkpoint}: out_channels must be at least 1, got {out_channels}")

    model = build_swinunetr(out_channels, found_features, in_channels)
    expected = model.state_dict()
    report = LoadReport(str(checkpoint), out_channels, found_features)
    backbone = {key: value for key, value in state.items() if _BACKBONE_KEY.match(key)}
    missing = sorted(key for key in expected if _BACKBONE_KEY.match(key) and key not in backbone)
    unexpected = sorted(key for key in backbone if key not in expected)
    mismatched = sorted(key for key in backbone if key in expected
                        and _shape(backbone[key]) != _shape(expected[key]))
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {kind} backbone key(s), e.g. {keys[0]}"
                 for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
                 if keys]
        raise ModelError(f"{checkpoint}: not a Swin UNETR checkpoint ({'; '.join(parts)})")

    to_load = dict(backbone)
    head = {key: state[key] for key in HEAD_KEYS if key in state}
    if len(head) == len(HEAD_KEYS) and all(_shape(value) == _shape(expected[key]) for key, value in head.items()):
        to_load.update(head)
    else:
        report.initialised = list(HEAD_KEYS)
        for key, value in head.items():
            report.skipped[key] = (f"head shape {_shape(value)} does not fit {_shape(expected[key])}"
                                   if _shape(value) != _shape(expected[key]) else "incomplete head")
    for key in state:
        if key not in to_load and key not in report.skipped:
            report.skipped[key] = "not part of Swin UNETR"

    try:
        model.load_state_dict(to_load, strict=False)
    except RuntimeError as error:
        summary = str(error).splitlines()[-1].strip() if str(error) else type(error).__name__
        raise ModelError(f"{checkpoint}: not a Swin UNETR checkpoint ({summary})") from None
    report.loaded = sorted(to_load)
    return model.eval().to(device), report


def load_swinunetr_model(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu",
                         trainable: bool = False) -> nn.Module:
    """Swin UNETR with the checkpoint's own head (the family's loader); see :func:`load_swinunetr`."""
    model, _ = load_swinunetr(checkpoint, device=device)
    return model
