"""The adaptation methods: which parameters of a pre-trained model train, and which small modules are added.

Every method works on :class:`AdaptableParts`, a description of a model that any family can give: its
foundation encoder (with the name patterns of its attention projections and MLPs), its pre-trained decoder if
any, and the new modules that always train (a head for automatic segmentation, an adapter). Definitions and
default learning rates follow the few-shot fine-tuning benchmark (FSEFT) and ARENA; see the README.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

from torch import nn

from FMSegCore.engines.adaptation.adaptformer import ParallelAdapter, inject_adaptformer
from FMSegCore.engines.adaptation.defaults import DEFAULT_RANK, MAX_RANK, METHODS
from FMSegCore.engines.adaptation.lora import LoRALayer, inject_lora, matching_layers

#: Default learning rates (FSEFT: 1e-2 for probes, biases, norms and AdaptFormer; 1e-3 for LoRA; 1e-4 for full
#: fine-tuning, spatial adapters and tuned decoders). New heads train at ``TrainSettings.head_learning_rate``.
LEARNING_RATES = {"full": 1e-4, "decoder": 1e-4, "linear-probe": 1e-2, "spatial-adapter": 1e-4, "bitfit": 1e-2,
                  "affine": 1e-2, "lora": 1e-3, "arena": 1e-3, "adaptformer": 1e-2}


@dataclass
class MethodSettings:
    """A method and its settings (saved in the adapter file, so the same wrappers can be rebuilt)."""

    method: str = "decoder"
    rank: int = DEFAULT_RANK
    alpha: Optional[float] = None
    #: regular expressions naming the encoder layers LoRA/ARENA adapt; None: the model's attention projections
    targets: Optional[list[str]] = None
    bottleneck: int = 64
    arena_lambda: float = 1e-3
    #: the first encoder stage encoder methods adapt (index into the encoder's ``stages``); earlier stages stay
    #: frozen, so their output is computed once per training image (on TinyViT, 3: the last two stages)
    first_stage: int = 3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose one of {', '.join(METHODS)})")
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be between 1 and {MAX_RANK}, not {self.rank}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class AdaptableParts:
    """What a method needs to know about a model. Names are relative to ``root``."""

    root: nn.Module
    encoder: str
    attention_patterns: Sequence[str]
    mlp_patterns: Sequence[str]
    stages: Sequence[str] = ()  # the encoder's stages in order (names relative to the encoder)
    decoders: Sequence[str] = ()  # pre-trained decoder modules (tuned by the decoder and full methods)
    new_modules: Sequence[str] = ()

    def module(self, name: str) -> nn.Module:
        return self.root.get_submodule(name)


@dataclass
class MethodReport:
    """What a method did: trainable and total parameters, and the layers it wrapped."""

    method: str
    trainable: int
    total: int
    wrapped: list[str] = field(default_factory=list)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                               nn.modules.instancenorm._InstanceNorm)) or type(module).__name__.endswith("Norm2d")


def stage_of(name: str, stages: Sequence[str]) -> Optional[int]:
    """The index of the stage a module or parameter name (relative to the encoder) lies in, if any."""
    for index, stage in enumerate(stages):
        if name == stage or name.startswith(stage + "."):
            return index
    return None


def first_trainable_stage(parts: AdaptableParts) -> int:
    """The first encoder stage with a trainable parameter (``len(stages)``: the whole encoder is frozen)."""
    prefix = parts.encoder + "."
    found = len(parts.stages)
    for name, parameter in parts.root.named_parameters():
        if parameter.requires_grad and name.startswith(prefix):
            stage = stage_of(name[len(prefix):], parts.stages)
            found = min(found, stage if stage is not None else len(parts.stages))
    return found


def apply_method(parts: AdaptableParts, settings: MethodSettings) -> MethodReport:
    """Freeze the model, add the method's modules, and mark what trains; a report of the result."""
    root = parts.root
    for parameter in root.parameters():
        parameter.requires_grad_(False)
    method, wrapped = settings.method, []
    encoder = parts.module(parts.encoder)

    def frozen_stage(module_name: str) -> bool:
        stage = stage_of(module_name, parts.stages)
        return stage is not None and stage < settings.first_stage

    def train_encoder_where(keep) -> None:
        for module_name, module in encoder.named_modules():
            if frozen_stage(module_name):
                continue
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if keep(module, parameter_name):
                    parameter.requires_grad_(True)

    if method == "full":
        train_encoder_where(lambda module, name: True)
    elif method == "bitfit":
        train_encoder_where(lambda module, name: name == "bias")
    elif method == "affine":
        train_encoder_where(lambda module, name: _is_norm(module))
    elif method in ("lora", "arena"):
        patterns = settings.targets or list(parts.attention_patterns)
        names = [name for name in matching_layers(encoder, patterns) if not frozen_stage(name)]
        if not names:
            raise ValueError(f"no adaptable layer matches {patterns} from stage {settings.first_stage} on")
        inject_lora(encoder, [f"^{re.escape(name)}$" for name in names], settings.rank, settings.alpha,
                    diagonal=method == "arena")
        wrapped = [f"{parts.encoder}.{name}" for name in names]
    elif method == "adaptformer":
        mlps = [name for name, _ in encoder.named_modules()
                if name and any(re.search(p, name) for p in parts.mlp_patterns) and not frozen_stage(name)]
        names = inject_adaptformer(encoder, [f"^{re.escape(name)}$" for name in mlps], settings.bottleneck)
        wrapped = [f"{parts.encoder}.{name}" for name in names]
    if method in ("full", "decoder"):
        for name in parts.decoders:
            for parameter in parts.module(name).parameters():
                parameter.requires_grad_(True)
    for name in parts.new_modules:
        for parameter in parts.module(name).parameters():
            parameter.requires_grad_(True)
    for module in root.modules():
        if isinstance(module, LoRALayer):
            for added in (module.lora_A, module.lora_B):
                added.weight.requires_grad_(True)
            if module.diagonal is not None:
                module.diagonal.requires_grad_(True)
        elif isinstance(module, ParallelAdapter):
            for parameter in (*module.down.parameters(), *module.up.parameters()):
                parameter.requires_grad_(True)
    trainable = sum(p.numel() for p in root.parameters() if p.requires_grad)
    total = sum(p.numel() for p in root.parameters())
    return MethodReport(method, trainable, total, wrapped)


def trainable_state(root: nn.Module) -> dict:
    """The parameters that train, by name (what an adapter file stores)."""
    return {name: parameter.detach().cpu().clone() for name, parameter in root.named_parameters()
            if parameter.requires_grad}
