"""Automatic segmentation from a few labelled cases: a foundation encoder (frozen or adapted) plus a new head
with one output per structure, so new scans are segmented with no prompt at all.

Works with any promptable model whose image encoder is an
:class:`~FMSegCore.models.interfaces.AdaptableBackbone` (named stages, the stem feature map, the name patterns
of its attention projections and MLPs): LiteMedSAM's TinyViT today. When
the method leaves the whole encoder frozen, its outputs are computed once per training input; otherwise the
output of the stages before the first trainable one is (by a BatchNorm-folded copy of the frozen encoder).

Training inputs: with a :class:`~FMSegCore.engines.adaptation.geometry.SliceGeometry` (physical units, the
default of ``fmseg adapt``), a fixed number of augmented views, balanced over the structures and spread over the
slices that show each, in canonical orientation; without one (adapters from before physical units, and the same-scan benchmark), every
annotated slice once, whole, as stored.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from FMSegCore.engines.adaptation.cases import Structure, TrainingCase
from FMSegCore.engines.adaptation.defaults import DEFAULT_VIEWS
from FMSegCore.engines.adaptation.geometry import SliceGeometry, canonical_case
from FMSegCore.engines.adaptation.heads import HEAD_FOR_METHOD, build_head
from FMSegCore.engines.adaptation.losses import dice_bce_loss
from FMSegCore.engines.adaptation.methods import (
    AdaptableParts,
    MethodReport,
    MethodSettings,
    apply_method,
    first_trainable_stage,
)
from FMSegCore.engines.adaptation.slice_inputs import WindowedSlice, whole_slice_window, windowed_slice
from FMSegCore.engines.adaptation.views import Augmentation, ViewMaker, balanced_views
from FMSegCore.models.interfaces import AdaptableBackbone, AdaptableModel


class AutoSegmenter2D(nn.Module):
    """Encoder + head: (B, 3, S, S) images -> (B, K, S, S) logits, one sigmoid output per structure."""

    def __init__(self, encoder: AdaptableBackbone, head: nn.Module, input_size: int,
                 preprocess: Callable[[np.ndarray], torch.Tensor]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.input_size = input_size
        self.preprocess = preprocess

    def features(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None, start: int = 0,
                 stem_map: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, stem map) from images, or from the tokens entering stage ``start`` (with the stem map
        when ``start`` is past the stem)."""
        encoder = self.encoder
        x = images if tokens is None else tokens
        if start <= encoder.stem_stage:
            x = encoder.run_stages(x, start, encoder.stem_stage + 1)
            stem_map, start = encoder.stem_map(x), encoder.stem_stage + 1
        return encoder.forward_trunk(x, start), stem_map

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedding, stem_map = self.features(images)
        return self.head(embedding, stem_map, images)


def head_kind(method: str) -> str:
    """The head a method trains: a linear probe, a spatial adapter and probe, or a light decoder."""
    return HEAD_FOR_METHOD.get(method, "decoder")


def build_auto_segmenter(base: AdaptableModel, classes: int, method: str) -> AutoSegmenter2D:
    """An automatic segmenter on ``base``'s image encoder."""
    encoder = base.image_encoder
    head = build_head(head_kind(method), encoder.out_channels, encoder.stem_channels, classes, base.input_size)
    return AutoSegmenter2D(encoder, head.to(next(encoder.parameters()).device), base.input_size, base.preprocess)


def auto_parts(root: AutoSegmenter2D) -> AdaptableParts:
    """How methods see an automatic segmenter."""
    encoder = root.encoder
    return AdaptableParts(root, "encoder", encoder.attention_patterns, encoder.mlp_patterns,
                          stages=encoder.stages, new_modules=["head"])


class AutoLearner2D:
    """Training batches and loss for :class:`AutoSegmenter2D` on the annotated slices of the cases."""

    def __init__(self, base: AdaptableModel, cases: Sequence[TrainingCase], structures: Sequence[Structure],
                 settings: MethodSettings, device: torch.device, cache_dtype: torch.dtype = torch.float32,
                 feature_cache: Optional[dict] = None, geometry: Optional[SliceGeometry] = None,
                 views: int = DEFAULT_VIEWS, augmentation: Optional[Augmentation] = None, seed: int = 0) -> None:
        self.root = build_auto_segmenter(base, len(structures), settings.method).to(device)
        self.settings = settings
        self.report: MethodReport = apply_method(auto_parts(self.root), settings)
        self.structures, self.device, self.cache_dtype = list(structures), device, cache_dtype
        self.geometry = geometry
        if geometry is not None and geometry.orientation == "LPS":
            cases = [canonical_case(case) for case in cases]
        self.cases = list(cases)
        self.items = [(c, i) for c, case in enumerate(self.cases) for i in case.annotated_slices()] \
            if geometry is None else balanced_views(self.cases, structures, views)
        self._views = None if geometry is None else ViewMaker(geometry, structures, self.root.preprocess,
                                                              augmentation, seed)
        # Stages before the first trainable one run once per slice: their output is cached.
        self.first_trainable = first_trainable_stage(auto_parts(self.root))
        self.frozen_encoder = self.first_trainable >= len(self.root.encoder.stages)
        if self.first_trainable <= self.root.encoder.stem_stage:
            self.first_trainable = 0  # nothing worth caching
        self._frozen: Optional[nn.Module] = None
        self._slices: dict[int, WindowedSlice] = {}
        # (item, first trainable stage) -> cached encoder output; may be shared by learners on the same cases
        self._cached: dict[tuple[int, int], tuple[torch.Tensor, ...]] = feature_cache if feature_cache is not None else {}

    def parameter_groups(self, learning_rate: float, head_learning_rate: float) -> list[dict[str, Any]]:
        head_rate = learning_rate if self.settings.method == "linear-probe" else head_learning_rate
        head = [p for p in self.root.head.parameters() if p.requires_grad]
        encoder = [p for p in self.root.encoder.parameters() if p.requires_grad]
        return [{"params": head, "lr": head_rate}, {"params": encoder, "lr": learning_rate}]

    def _slice(self, item: int) -> WindowedSlice:
        if item not in self._slices:
            case_index, index = self.items[item]
            case = self.cases[case_index]
            if self._views is not None:
                self._slices[item] = self._views.view(case, index, item)
            else:
                window = whole_slice_window(case, index, self.root.input_size)
                self._slices[item] = windowed_slice(case, index, self.structures, window, self.root.preprocess)
        return self._slices[item]

    def _frozen_encoder(self) -> nn.Module:
        """A BatchNorm-folded copy of the encoder for its frozen stages (same outputs, faster on CPU)."""
        if self._frozen is None:
            self._frozen = copy.deepcopy(self.root.encoder).fuse_for_inference()
        return self._frozen

    @torch.no_grad()
    def _cache(self, item: int) -> tuple[torch.Tensor, ...]:
        key = (item, self.first_trainable)
        if key not in self._cached:
            image = self._slice(item).image[None].to(self.device).contiguous(memory_format=torch.channels_last)
            encoder = self._frozen_encoder()
            with torch.autocast(self.device.type, enabled=False):
                stem = encoder.forward_stem(image)
                stem_map = encoder.stem_map(stem)
                if self.frozen_encoder:
                    first = encoder.forward_trunk(stem)
                else:
                    first = encoder.run_stages(stem, encoder.stem_stage + 1, self.first_trainable)
            self._cached[key] = (first[0].to(self.cache_dtype), stem_map[0].to(self.cache_dtype))
        return self._cached[key]

    def sample(self, generator: torch.Generator, batch_size: int) -> list[int]:
        return torch.randint(len(self.items), (batch_size,), generator=generator).tolist()

    def logits(self, items: Sequence[int]) -> torch.Tensor:
        images = torch.stack([self._slice(i).image for i in items]).to(self.device)
        if self.first_trainable == 0:
            embedding, stem_map = self.root.features(images)
        else:
            cached = [self._cache(i) for i in items]
            first = torch.stack([c[0] for c in cached]).float()
            stem_map = torch.stack([c[1] for c in cached]).float()
            if self.frozen_encoder:
                embedding = first
            else:
                embedding, _ = self.root.features(tokens=first, start=self.first_trainable, stem_map=stem_map)
        return self.root.head(embedding, stem_map, images)

    def loss(self, batch: list[int]) -> torch.Tensor:
        targets = torch.stack([self._slice(i).targets for i in batch]).to(self.device)
        known = torch.stack([self._slice(i).known for i in batch]).to(self.device)
        return dice_bce_loss(self.logits(batch), targets, known)
