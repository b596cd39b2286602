"""Few-shot adaptation end to end: train a method on labelled cases, validate, describe the result, and rebuild
an adapted model from an adapter file (checked against its base model).

Modes: ``prompt`` adapts the promptable model itself (it stays promptable); ``auto`` trains an automatic
segmenter (foundation encoder + head) for the labelled structures.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from FMSegCore import __version__
from FMSegCore.engines.adaptation.adapter_file import Adapter
from FMSegCore.engines.adaptation.auto_learner import (
    AutoLearner2D,
    AutoSegmenter2D,
    auto_parts,
    build_auto_segmenter,
)
from FMSegCore.engines.adaptation.cases import Structure, TrainingCase
from FMSegCore.engines.adaptation.defaults import (
    DEFAULT_VIEWS,
    ENCODER_METHODS,
    MODES,
    WARMED_MAX_RATE,
    default_head_steps,
    default_schedule,
    head_warmup_method,
)
from FMSegCore.engines.adaptation.evaluation import validate
from FMSegCore.engines.adaptation.geometry import SliceGeometry
from FMSegCore.engines.adaptation.lora import kept_ranks, merge_lora
from FMSegCore.engines.adaptation.methods import (
    LEARNING_RATES,
    MethodReport,
    MethodSettings,
    apply_method,
    trainable_state,
)
from FMSegCore.engines.adaptation.prompt_learner import (
    PromptLearner2D,
    build_prompt_model,
    prompt_parts,
)
from FMSegCore.engines.adaptation.trainer import FitResult, TrainSettings, autocast_dtype, fit
from FMSegCore.engines.adaptation.views import Augmentation
from FMSegCore.errors import InputError, ModelError
from FMSegCore.progress import ProgressCallback
from FMSegCore.zoo.registry import get_card


@dataclass
class AdaptationResult:
    """A trained adaptation: the model, what trained, how training went, and the adapter's content."""

    model: nn.Module
    report: MethodReport
    fit: FitResult
    validation: Optional[dict[str, float]]
    metadata: dict[str, Any]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def _adaptable_card(model_name: str) -> Any:
    """The zoo card of a model whose family implements :class:`AdaptableModel`."""
    from FMSegCore.zoo.families import families, family_of

    card = get_card(model_name)
    family = family_of(card)
    if family is None or "AdaptableModel" not in family.implements:
        adaptable = [f.name for f in families() if "AdaptableModel" in f.implements]
        raise ModelError(f"model '{model_name}' cannot be adapted (its family has no adaptable image encoder; "
                         f"adaptable families: {', '.join(adaptable)})")
    return card


def load_base(model_name: str, device: torch.device, allow_download: bool = True) -> tuple[nn.Module, str]:
    """A fresh, trainable copy of a zoo model (an :class:`AdaptableModel`), and its checkpoint's sha256."""
    from FMSegCore.models.factory import build_network
    from FMSegCore.zoo.cache import fetch, file_digest

    card = _adaptable_card(model_name)
    path = fetch(card, allow_download=allow_download)
    network = build_network(card, device, trainable=True, checkpoint=path)
    return network, card.sha256 or file_digest(path)


def cases_digest(cases: Sequence[TrainingCase]) -> str:
    """A hash of the training cases' pixels and labels (order-independent)."""
    return hashlib.sha256("".join(sorted(case.digest for case in cases)).encode()).hexdigest()


def split_validation(cases: Sequence[TrainingCase], holdout: int) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Hold out the last ``holdout`` cases for validation; at least one case must remain to train on."""
    if holdout <= 0:
        return list(cases), []
    if holdout >= len(cases):
        raise InputError(cases[-1].source if cases else None,
                         f"too few cases for a validation split: {len(cases)} case(s), {holdout} held out; "
                         f"give at least {holdout + 1} cases or pass --val IMAGE LABELS")
    return list(cases[:-holdout]), list(cases[-holdout:])


def _versions() -> dict[str, str]:
    import monai

    return {"fmseg": __version__, "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__}


def train_settings(mode: str, method: str, steps: Optional[int] = None, batch_size: Optional[int] = None,
                   **settings: Any) -> TrainSettings:
    """Training settings: the steps and batch given, else the mode's and method's defaults. Auto mode trains
    every step it is given (no early stop: rare structures are learnt late) and warms encoder methods' heads."""
    steps, batch_size = default_schedule(mode, method, steps, batch_size)
    if mode == "auto":
        settings = {"patience": None, "head_steps": default_head_steps(mode, method)} | settings
    return TrainSettings(steps=steps, batch_size=batch_size, **settings)


def warmed_rates(training: TrainSettings, learning_rate: float) -> TrainSettings:
    """An encoder method's settings after its head's warm-up: encoder and warmed head at one rate, the one given
    or else the method's capped at :data:`WARMED_MAX_RATE` (LP-FT: a higher rate undoes the warm-up)."""
    rate = training.learning_rate or min(learning_rate, WARMED_MAX_RATE)
    return dataclasses.replace(training, learning_rate=rate, head_learning_rate=rate)


def _load_warm_head(head: nn.Module, warm: dict[str, torch.Tensor]) -> None:
    """Load a warmed head's weights into the method's head; the method may add modules of its own (the spatial
    adapter before the warmed probe), but every warmed weight must find its place."""
    missing, unexpected = head.load_state_dict(warm, strict=False)
    if unexpected or len(missing) + len(warm) != len(head.state_dict()):
        raise RuntimeError(f"the warmed head does not fit the method's head (unexpected {unexpected})")


def adapt(model_name: str, mode: str, cases: Sequence[TrainingCase], structures: Sequence[Structure],
          method: MethodSettings, training: TrainSettings, device: torch.device,
          val_cases: Sequence[TrainingCase] = (), modality: str = "auto", window: Union[str, Sequence[float]] = "abdomen",
          axis: str = "axial", progress: Optional[ProgressCallback] = None,
          cancel: Optional[Callable[[], bool]] = None, base: Optional[tuple[nn.Module, str]] = None,
          geometry: Optional[SliceGeometry] = None, views: int = DEFAULT_VIEWS,
          augmentation: Optional[Augmentation] = None) -> AdaptationResult:
    """Adapt ``model_name`` to the cases with one method; the trained model and the adapter's content.

    Auto mode with a ``geometry`` trains in physical units on ``views`` augmented views (see :mod:`.geometry`);
    the geometry's orientation becomes "stored" when some 3-D case has no known direction."""
    if mode not in MODES:
        raise InputError(None, f"unknown mode {mode!r} (use {' or '.join(MODES)})")
    if not cases:
        raise InputError(None, "no training cases: give at least one --train IMAGE LABELS pair")
    torch.manual_seed(training.seed)
    model, digest = base or load_base(model_name, device)
    cache_dtype = autocast_dtype(device, training.precision) or torch.float32
    if mode != "auto":
        geometry = None
    elif geometry is not None and any(c.image.ndim == 3 and c.direction is None for c in cases):
        geometry = dataclasses.replace(geometry, orientation="stored")
    if mode != "auto":
        training = dataclasses.replace(training, head_steps=0)
    head_steps, total = training.head_steps, training.total_steps
    began = time.perf_counter()

    def report(offset: int, message: str) -> Optional[ProgressCallback]:
        """One count over both phases (the head's warm-up, then the method's steps), saying which runs."""
        if progress is None:
            return None
        return lambda p: progress(dataclasses.replace(p, step=offset + p.step, total=total, message=message))

    # the warm-up's and the method's learners draw the same views: frozen encoder outputs are computed once
    features: dict = {}

    def learner_for(settings: MethodSettings) -> Any:
        try:
            if mode == "auto":
                return AutoLearner2D(model, cases, structures, settings, device, cache_dtype, feature_cache=features,
                                     geometry=geometry, views=views, augmentation=augmentation, seed=training.seed)
            return PromptLearner2D(model, cases, structures, settings, device, cache_dtype=cache_dtype)
        except ValueError as error:
            raise InputError(None, str(error)) from None

    warm_head = None
    if head_steps:  # the new head alone first, on the frozen encoder's cached features (cheap steps)
        warm_method = head_warmup_method(method.method)
        warm = learner_for(MethodSettings(warm_method))
        head_batch = max(default_schedule("auto", warm_method)[1], training.batch_size)
        fit(warm, dataclasses.replace(training, steps=head_steps, batch_size=head_batch, learning_rate=None),
            LEARNING_RATES[warm_method], device,
            progress=report(0, f"warming up the head ({warm_method})"), cancel=cancel)
        warm_head = warm.root.head.state_dict()
    learner = learner_for(method)
    learning_rate = training.learning_rate or LEARNING_RATES[method.method]
    if warm_head is not None:
        _load_warm_head(learner.root.head, warm_head)
        if method.method in ENCODER_METHODS:
            training = warmed_rates(training, learning_rate)
            learning_rate = training.learning_rate
    result = fit(learner, training, learning_rate, device,
                 arena_lambda=method.arena_lambda if method.method == "arena" else 0.0,
                 progress=report(head_steps, f"training ({method.method})"), cancel=cancel)
    result = dataclasses.replace(result, seconds=time.perf_counter() - began)  # the head's warm-up included
    root = learner.root
    validation = validate(root, mode, val_cases, structures, device, training.precision, geometry) \
        if val_cases else None
    metadata = {
        "base_model": model_name, "base_sha256": digest, "mode": mode, "method": method.to_json(),
        "training": training.to_json(), "structures": [s.to_json() for s in structures],
        "cases": len(cases), "cases_sha256": cases_digest(cases), "validation_cases": len(val_cases),
        "validation_dice": validation, "modality": modality,
        "window": window if isinstance(window, str) else list(window), "axis": axis,
        **({"geometry": geometry.to_json(), "views": len(learner.items)} if geometry is not None else {}),
        "trainable_parameters": learner.report.trainable, "kept_ranks": kept_ranks(root),
        "fit": {"steps": result.steps, "head_steps": head_steps, "seconds": round(result.seconds, 1),
                "final_loss": result.final_loss,
                "stopped_early": result.stopped_early},
        "versions": _versions(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return AdaptationResult(root, learner.report, result, validation, metadata, trainable_state(root))


# ------------------------------------------------------------------------------------------------ loading


def check_adapter_base(adapter: Adapter, digest: str) -> None:
    """Refuse an adapter trained on another checkpoint of its base model (by sha256)."""
    if adapter.metadata["base_sha256"] != digest:
        raise InputError(adapter.path, f"this adapter was trained on a different '{adapter.base_model}' checkpoint "
                                       f"(sha256 {str(adapter.metadata['base_sha256'])[:12]}..., installed "
                                       f"{digest[:12]}...)")


def build_adapted(adapter: Adapter, device: torch.device, model_name: Optional[str] = None,
                  allow_download: bool = True) -> nn.Module:
    """The adapted model of an adapter file, ready for inference (LoRA merged, BatchNorm folded)."""
    if model_name is not None and adapter.base_model != model_name:
        raise InputError(adapter.path, f"this adapter was trained on '{adapter.base_model}', not '{model_name}' "
                                       f"(use --model {adapter.base_model})")
    base, digest = load_base(adapter.base_model, device, allow_download)
    check_adapter_base(adapter, digest)
    try:
        settings = MethodSettings(**adapter.metadata["method"])
    except (TypeError, ValueError) as error:
        raise InputError(adapter.path, f"damaged adapter metadata ({error})") from None
    classes = len(adapter.metadata["structures"])
    if adapter.mode == "auto":
        root: nn.Module = build_auto_segmenter(base, classes, settings.method).to(device)
        parts = auto_parts(root)
    else:
        root = build_prompt_model(base, settings.method)
        parts = prompt_parts(root)
    apply_method(parts, settings)
    expected = {name: p.shape for name, p in root.named_parameters() if p.requires_grad}
    if set(expected) != set(adapter.state) or any(tuple(adapter.state[n].shape) != tuple(s) for n, s in expected.items()):
        raise InputError(adapter.path, "the adapter's weights do not fit its method and base model (damaged file?)")
    root.load_state_dict(adapter.state, strict=False)
    merge_lora(root)
    encoder = root.encoder if isinstance(root, AutoSegmenter2D) else root.base.image_encoder
    encoder.fuse_for_inference()
    root.eval()
    for parameter in root.parameters():
        parameter.requires_grad_(False)
    return root
