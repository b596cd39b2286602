"""Adapting a promptable model (an :class:`~FMSegCore.models.interfaces.AdaptableModel`: LiteMedSAM today) on a few labelled cases, with box and point prompts sampled from
the labels, for domains where the zero-shot model is weak.

The adapted model keeps the :class:`~FMSegCore.models.interfaces.PromptableModel2D` interface, so the prompting
engine, CLI and benchmarks use it unchanged. Training windows follow the prompting session's rule (the whole
slice, or a crop around the structure on large slices), so the model trains on what it sees when prompted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from FMSegCore.engines.adaptation.cases import Structure, TrainingCase, case_targets
from FMSegCore.engines.adaptation.heads import SpatialAdapter
from FMSegCore.engines.adaptation.losses import dice_bce_loss
from FMSegCore.engines.adaptation.methods import (
    AdaptableParts,
    MethodReport,
    MethodSettings,
    apply_method,
    first_trainable_stage,
)
from FMSegCore.engines.adaptation.slice_inputs import WindowedSlice, windowed_slice
from FMSegCore.engines.prompting.windows import SliceWindow, box_window, full_window
from FMSegCore.models.interfaces import AdaptableModel, PromptBatch2D
from FMSegCore.preprocessing.slicing import mask_box_rc

#: Prompts per training batch: boxes (MedSAM's training prompt) or include/exclude points.
BOX_PROBABILITY = 0.7


class PromptAdaptedModel(nn.Module):
    """A promptable model with an optional black-box adapter on its image embeddings (spatial adapter)."""

    def __init__(self, base: AdaptableModel, embedding_adapter: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.base = base
        self.embedding_adapter = embedding_adapter or nn.Identity()
        self.input_size = base.input_size
        self.mask_size = base.mask_size

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return self.base.preprocess(image)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding_adapter(self.base.encode(images))

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.decode(embeddings, prompts)

    def decode_trainable(self, embeddings: torch.Tensor, prompts: PromptBatch2D) -> torch.Tensor:
        """Mask logits (B, 1, S, S) with gradients through the prompt encoder and mask decoder."""
        low_res = self.base.decode_trainable(embeddings, prompts)
        if low_res.shape[-1] != self.mask_size:
            low_res = nn.functional.interpolate(low_res.float(), size=(self.mask_size, self.mask_size),
                                                mode="bilinear", align_corners=False)
        return low_res


def build_prompt_model(base: AdaptableModel, method: str) -> PromptAdaptedModel:
    """The promptable model to adapt (a spatial adapter on the embeddings for that method)."""
    if method == "linear-probe":
        raise ValueError("a linear probe trains a head for automatic segmentation: use --mode auto")
    channels = base.image_encoder.out_channels
    adapter = SpatialAdapter(channels) if method == "spatial-adapter" else None
    model = PromptAdaptedModel(base, adapter)
    return model.to(next(base.parameters()).device)


def prompt_parts(root: PromptAdaptedModel) -> AdaptableParts:
    """How methods see a promptable model: encoder, pre-trained mask decoder, and the adapter."""
    encoder = root.base.image_encoder
    new = ["embedding_adapter"] if any(True for _ in root.embedding_adapter.parameters()) else []
    return AdaptableParts(root, "base.image_encoder", encoder.attention_patterns, encoder.mlp_patterns,
                          stages=encoder.stages, decoders=["base.mask_decoder"], new_modules=new)


def prompt_window(case: TrainingCase, index: int, box_rc: tuple[int, int, int, int], size: int) -> SliceWindow:
    """The window the prompting session uses: whole slice unless it is much larger than the model input."""
    shape = case.slice(index)[0].shape
    if max(shape) > 1.5 * size:
        return box_window(box_rc, shape, case.spacing_rc(), size)
    return full_window(shape, case.spacing_rc(), size)


class PromptLearner2D:
    """Batches of (slice, structure, prompt) and the mask loss, for :class:`PromptAdaptedModel`."""

    def __init__(self, base: AdaptableModel, cases: Sequence[TrainingCase], structures: Sequence[Structure],
                 settings: MethodSettings, device: torch.device, min_pixels: int = 5,
                 cache_dtype: torch.dtype = torch.float32, feature_cache: Optional[dict] = None) -> None:
        self.root = build_prompt_model(base, settings.method)
        self.settings = settings
        self.report: MethodReport = apply_method(prompt_parts(self.root), settings)
        self.cases, self.structures, self.device, self.cache_dtype = list(cases), list(structures), device, cache_dtype
        self.items: list[tuple[int, int, int, SliceWindow]] = []
        for c, case in enumerate(self.cases):
            for index in case.annotated_slices():
                masks, known = case_targets(case, case.slice(index)[1], self.structures)
                for k in range(len(self.structures)):
                    box = mask_box_rc(masks[k]) if known[k] and masks[k].sum() >= min_pixels else None
                    if box is not None:
                        window = prompt_window(case, index, box, self.root.input_size)
                        self.items.append((c, index, k, window))
        if not self.items:
            raise ValueError(f"no labelled structure of at least {min_pixels} pixels to prompt")
        # Stages before the first trainable one run once per window: their output is cached.
        self.first_trainable = first_trainable_stage(prompt_parts(self.root))
        self.frozen_encoder = self.first_trainable >= len(self.root.base.image_encoder.stages)
        self._inputs: dict[tuple, WindowedSlice] = {}
        # (case, slice, window, first trainable stage) -> cached encoder output; learners on the same cases may share it
        self._cached: dict[tuple, torch.Tensor] = feature_cache if feature_cache is not None else {}

    def parameter_groups(self, learning_rate: float, head_learning_rate: float) -> list[dict[str, Any]]:
        adapter = [p for p in self.root.embedding_adapter.parameters() if p.requires_grad]
        others = [p for n, p in self.root.named_parameters() if p.requires_grad and not n.startswith("embedding_adapter")]
        return [{"params": adapter, "lr": head_learning_rate}, {"params": others, "lr": learning_rate}]

    def _input(self, item: int) -> WindowedSlice:
        c, index, k, window = self.items[item]
        key = (c, index, window.key)
        if key not in self._inputs:
            self._inputs[key] = windowed_slice(self.cases[c], index, self.structures, window, self.root.preprocess)
        return self._inputs[key]

    @torch.no_grad()
    def _cache(self, item: int) -> torch.Tensor:
        c, index, _, window = self.items[item]
        key = (c, index, window.key, self.first_trainable)
        if key not in self._cached:
            image = self._input(item).image[None].to(self.device)
            encoder = self.root.base.image_encoder
            with torch.autocast(self.device.type, enabled=False):
                if self.frozen_encoder:
                    value = encoder(image)
                else:
                    value = encoder.run_stages(image, 0, self.first_trainable)
            self._cached[key] = value[0].to(self.cache_dtype)
        return self._cached[key]

    def embeddings(self, items: Sequence[int]) -> torch.Tensor:
        encoder = self.root.base.image_encoder
        if self.first_trainable == 0:
            embedding = encoder(torch.stack([self._input(i).image for i in items]).to(self.device))
        else:
            cached = torch.stack([self._cache(i) for i in items]).float()
            embedding = cached if self.frozen_encoder else encoder.forward_trunk(cached, self.first_trainable)
        return self.root.embedding_adapter(embedding)

    def sample(self, generator: torch.Generator, batch_size: int) -> dict[str, Any]:
        items = torch.randint(len(self.items), (batch_size,), generator=generator).tolist()
        use_box = bool(torch.rand((), generator=generator) < BOX_PROBABILITY)
        targets = torch.stack([self._input(i).targets[self.items[i][2]] for i in items])
        prompts = _box_prompts(targets, generator) if use_box else _point_prompts(targets, generator)
        return {"items": items, "targets": targets[:, None], "prompts": prompts}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        prompts = batch["prompts"]
        prompts = PromptBatch2D(torch.arange(len(batch["items"]), device=self.device),
                                boxes=None if prompts.get("boxes") is None else prompts["boxes"].to(self.device),
                                points=None if prompts.get("points") is None else prompts["points"].to(self.device),
                                point_labels=None if prompts.get("labels") is None else prompts["labels"].to(self.device))
        logits = self.root.decode_trainable(self.embeddings(batch["items"]), prompts)
        return dice_bce_loss(logits, batch["targets"].to(self.device))


def _box_prompts(targets: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Boxes (B, 4) as x0, y0, x1, y1 around each mask, each side moved by up to 10 % of the box (and 5 px)."""
    boxes = []
    for mask in targets:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        r0, r1, c0, c1 = (float(rows.min()), float(rows.max()), float(cols.min()), float(cols.max()))
        jitter = 0.1 * max(r1 - r0, c1 - c0) + 5.0
        shift = (torch.rand(4, generator=generator) * 2 - 1) * jitter
        x0, y0 = c0 + float(shift[0]), r0 + float(shift[1])
        x1, y1 = c1 + float(shift[2]), r1 + float(shift[3])
        size = mask.shape[-1] - 1
        boxes.append([max(0.0, min(x0, x1)), max(0.0, min(y0, y1)), min(size, max(x0, x1)), min(size, max(y0, y1))])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32)}


def _point_prompts(targets: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """1-3 include points inside each mask and one exclude point near it (label -1 pads a missing one)."""
    count = int(torch.randint(1, 4, (), generator=generator))
    points, labels = [], []
    for mask in targets:
        inside = torch.nonzero(mask)
        chosen = inside[torch.randint(len(inside), (count,), generator=generator)]
        rows, cols = inside[:, 0], inside[:, 1]
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
        margin = max(3, (r1 - r0) // 4)
        region = torch.zeros_like(mask)
        region[max(0, r0 - margin):r1 + margin + 1, max(0, c0 - margin):c1 + margin + 1] = True
        outside = torch.nonzero(region & ~mask)
        if len(outside):
            exclude, exclude_label = outside[torch.randint(len(outside), (1,), generator=generator)], 0
        else:
            exclude, exclude_label = torch.zeros(1, 2, dtype=torch.long), -1
        rc = torch.cat([chosen, exclude]).float()
        points.append(torch.stack([rc[:, 1], rc[:, 0]], dim=1))  # (x, y)
        labels.append([1] * count + [exclude_label])
    return {"points": torch.stack(points), "labels": torch.tensor(labels)}
